// Runs mmfast's CUDA kernels on the CPU: one std::thread per thread of a CUDA block, std::barrier for
// __syncthreads and a per-warp exchange for __shfl_xor_sync. Include it FIRST, then the .cu file, in a
// host-compiled test program (tests/test_cuda_emulation.py builds them with g++ -std=c++20 -O2 -pthread
// -ffp-contract=off -fno-strict-aliasing -I<cuda>/include): it tests the kernels' index math, bounds,
// barriers and shuffles where no GPU exists.
//
// Blocks run one at a time, in order (x fastest, then y, z): each std::thread (kept from launch to launch)
// runs its thread of every block in turn. The dynamic shared memory is filled with NaN before each block,
// so reading a slot the block never wrote poisons the result.
//
// Supported: 1-, 2- and 3-D grids and blocks (MMFAST_LAUNCH's grid and block are dim3 or integers; warps
// are formed from the linear thread index, as on a GPU; the block size must be a multiple of 32); dynamic
// shared memory declared with MMFAST_DYNAMIC_SMEM; static __shared__ arrays (function-local statics: one
// copy, right because blocks never overlap; not refilled with NaN, so a block reads what the previous
// block left there); __shfl_xor_sync of any type up to 8 bytes (float, double, int, uint64) with a full mask;
// __ballot_sync (full mask) and __syncwarp, which need the warp's lanes on the same path, as on a GPU;
// the intrinsics __fmul_rn, __fadd_rn, __frcp_rn (rounded as on the device where -ffp-contract=off keeps
// g++ from fusing them into an fma), __fsqrt_rn, __int_as_float, __uint_as_float, __float_as_uint, the int
// atomicAdd, __threadfence and the int min/max of device code; the tensor-core
// mma.m16n8k16 (bf16/fp16 -> fp32) and ldmatrix of mmfast/mma.cuh, with the PTX fragment layouts (the mma's
// fp32 summation order is fixed here, unspecified on the device: compare with a tolerance).
//
// What it cannot show: races that a real GPU's scheduling exposes, speed, and the device math library's
// rounding: expf, exp2f, log1pf ... run as the host's libm, not as --use_fast_math's approximations.
#pragma once

#include <cuda_bf16.h>  // under a host compiler: the types and their host conversions
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __launch_bounds__(...)
// Lets device headers pick the emulated version of what has no host equivalent (mmfast/mma.cuh).
#define MMFAST_EMULATION 1
// Static __shared__ arrays become function-local statics: one copy for the one block that runs.
#undef __shared__
#define __shared__ static

namespace mmfast_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Index thread_index, block_index;
inline Index block_dim, grid_dim;

// The dynamic shared memory of the running block (MMFAST_DYNAMIC_SMEM below points the kernels at it).
constexpr size_t kSmemBytes = 227 * 1024;  // H100's opt-in limit
alignas(16) inline unsigned char smem[kSmemBytes];

inline void poison_smem() noexcept {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (size_t i = 0; i + sizeof(float) <= kSmemBytes; i += sizeof(float)) std::memcpy(smem + i, &nan, sizeof(float));
}

// Between two blocks: the last thread to arrive refills the shared memory while the others wait.
struct NextBlock {
  void operator()() noexcept { poison_smem(); }
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads), next(threads, NextBlock{}) {
    for (auto& slots : exchange) slots.resize(threads);
    for (auto& slots : fragments) slots.resize(threads);
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> barrier;
  std::barrier<NextBlock> next;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange[2];  // shuffle slots, one per thread and wide enough for a double
  std::vector<std::array<uint32_t, 6>> fragments[2];  // mma's A and B registers, one set per thread
};

inline thread_local Block* current_block = nullptr;
inline thread_local unsigned linear_thread = 0;  // x + y * blockDim.x + z * blockDim.x * blockDim.y
inline thread_local unsigned shuffle_parity = 0;  // which exchange buffer the thread's next shuffle uses

inline void syncthreads() { current_block->barrier.arrive_and_wait(); }

// Two exchange buffers used alternately: a lane that writes shuffle k + 1 into one cannot disturb a lane
// still reading shuffle k from the other, and none writes shuffle k + 2 before every lane of its warp has
// passed shuffle k + 1 (all lanes run the same shuffles), so one warp barrier per shuffle suffices.
template <typename V>
V shfl_xor(V v, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= sizeof(uint64_t), "shuffles move up to 8 bytes");
  const unsigned t = linear_thread, w = t / 32, lane = t % 32;
  Block& b = *current_block;
  uint64_t* slots = b.exchange[shuffle_parity].data();
  shuffle_parity ^= 1;
  std::memcpy(&slots[t], &v, sizeof(V));
  b.warps[w]->arrive_and_wait();
  V r;
  std::memcpy(&r, &slots[w * 32 + (lane ^ static_cast<unsigned>(lane_mask))], sizeof(V));
  return r;
}

// __ballot_sync(full mask, pred): bit l of the result is lane l's pred. The same exchange as shfl_xor.
inline unsigned ballot(bool pred) {
  const unsigned t = linear_thread, w = t / 32;
  Block& b = *current_block;
  uint64_t* slots = b.exchange[shuffle_parity].data();
  shuffle_parity ^= 1;
  slots[t] = pred ? 1 : 0;
  b.warps[w]->arrive_and_wait();
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= static_cast<unsigned>(slots[w * 32 + l]) << l;
  return bits;
}

// __syncwarp(): the warp's lanes meet; their shared-memory writes before it are visible after it.
inline void syncwarp() { current_block->warps[linear_thread / 32]->arrive_and_wait(); }

// ---- tensor cores: mma.m16n8k16 and ldmatrix (mmfast/mma.cuh calls these under emulation) --------------
// Both follow the PTX ISA's fragment layouts (spelled out in mmfast/mma.cuh) and the shuffle's exchange:
// every lane publishes its registers (or its row address) in its slot, the warp meets at its barrier, and
// each lane reads the slots it needs. They take the next buffer of the same alternation as shfl_xor, so the
// argument above covers any mix of shuffles, mma and ldmatrix. All 32 lanes must call them (.sync.aligned).

// Element h (0: lower 16 bits, 1: upper) of a register holding a pair of T, as a float (exact).
template <typename T>
float fragment_element(uint32_t reg, unsigned h) {
  const auto bits = static_cast<uint16_t>(reg >> (16 * h));
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
  } else {
    static_assert(std::is_same_v<T, __half>, "mma inputs are bf16 or fp16");
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
}

// d = a @ b + c for the warp's 16x8x16 tile. The warp's A and B are rebuilt from all lanes' registers by the
// layout table, then each lane computes its four outputs as ((c + p0) + p1) + ... + p15 in fp32, k in order.
// The products of fp16/bf16 inputs are exact in fp32 (barring bf16 under/overflow); the hardware's summation
// order and internal rounding are unspecified (and differ between architectures), so tests compare GPU and
// emulated results with a tolerance of a few fp32 roundings of the sum of |products|.
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  const unsigned t = linear_thread, w = t / 32, lane = t % 32;
  Block& blk = *current_block;
  std::array<uint32_t, 6>* slots = blk.fragments[shuffle_parity].data();
  shuffle_parity ^= 1;
  slots[t] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  blk.warps[w]->arrive_and_wait();
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const std::array<uint32_t, 6>& s = slots[w * 32 + l];
    const unsigned g = l >> 2, q = l % 4;
    for (unsigned h = 0; h < 2; ++h) {
      A[g][2 * q + h] = fragment_element<T>(s[0], h);
      A[g + 8][2 * q + h] = fragment_element<T>(s[1], h);
      A[g][2 * q + 8 + h] = fragment_element<T>(s[2], h);
      A[g + 8][2 * q + 8 + h] = fragment_element<T>(s[3], h);
      B[2 * q + h][g] = fragment_element<T>(s[4], h);
      B[2 * q + 8 + h][g] = fragment_element<T>(s[5], h);
    }
  }
  const unsigned g = lane >> 2, q = lane % 4;
  float out[4];
  for (unsigned i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * q + i % 2;
    float acc = c[i];
    for (unsigned k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    out[i] = acc;
  }
  for (unsigned i = 0; i < 4; ++i) d[i] = out[i];  // after reading c: d may alias it
}

// ldmatrix.sync.aligned.m8n8.x{Count}{.trans}.shared.b16: lanes 8j .. 8j+7 address rows 0..7 of matrix j.
// A second warp barrier after the reads: on a GPU the warp's load completes before any lane's next
// instruction, so a lane may overwrite the rows right after it (a misaligned row address aborts, as the
// device would fault).
template <int Count, bool Trans>
void ldmatrix(uint32_t (&r)[Count], const void* row) {
  const unsigned t = linear_thread, w = t / 32, lane = t % 32;
  if (lane < 8 * Count && reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    std::fprintf(stderr, "emulated ldmatrix: lane %u of warp %u passes a row address %p not 16-byte aligned\n", lane,
                 w, row);
    std::abort();
  }
  Block& blk = *current_block;
  uint64_t* slots = blk.exchange[shuffle_parity].data();
  shuffle_parity ^= 1;
  static_assert(sizeof(row) <= sizeof(uint64_t));
  std::memcpy(&slots[t], &row, sizeof(row));
  blk.warps[w]->arrive_and_wait();
  auto element = [&](unsigned matrix, unsigned i, unsigned j) {  // (row i, col j) of the matrix
    const unsigned char* p;
    std::memcpy(&p, &slots[w * 32 + 8 * matrix + i], sizeof(p));
    uint16_t e;
    std::memcpy(&e, p + 2 * j, sizeof(e));
    return static_cast<uint32_t>(e);
  };
  for (unsigned m = 0; m < static_cast<unsigned>(Count); ++m) {
    const unsigned i = lane / 4, j = 2 * (lane % 4);  // the lane's pair in the (transposed) matrix
    r[m] = Trans ? element(m, j, i) | element(m, j + 1, i) << 16 : element(m, i, j) | element(m, i, j + 1) << 16;
  }
  blk.warps[w]->arrive_and_wait();
}

// The std::threads persist across launches: creating one costs ~40 us (a 1024-thread launch 40 ms), waking
// a waiting one a few us. run(n, body) runs body(0) ... body(n - 1) on n of them and returns when all are done.
class Workers {
 public:
  void run(unsigned n, const std::function<void(unsigned)>& body) {
    for (unsigned t = static_cast<unsigned>(workers_.size()); t < n; ++t) {
      workers_.push_back(std::make_unique<Worker>(this, t));
    }
    body_ = &body;
    remaining_.store(n);
    for (unsigned t = 0; t < n; ++t) workers_[t]->start();
    for (unsigned r; (r = remaining_.load()) != 0;) remaining_.wait(r);
  }
  ~Workers() {
    stop_.store(true);
    for (auto& w : workers_) w->start();
    for (auto& w : workers_) w->thread.join();
  }

 private:
  struct Worker {
    Worker(Workers* pool, unsigned index) : thread([this, pool, index] { pool->serve(*this, index); }) {}
    void start() {
      go.fetch_add(1);
      go.notify_one();
    }
    std::atomic<uint32_t> go{0};  // bumped once per job
    std::thread thread;           // declared last: starts once `go` exists
  };

  void serve(Worker& self, unsigned index) {
    for (uint32_t seen = 0;;) {
      self.go.wait(seen);
      seen = self.go.load();
      if (stop_.load()) return;
      (*body_)(index);
      if (remaining_.fetch_sub(1) == 1) remaining_.notify_one();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* body_ = nullptr;
  std::atomic<uint32_t> remaining_{0};
  std::atomic<bool> stop_{false};
};

inline Workers workers;

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (smem_bytes > kSmemBytes || threads == 0 || threads % 32 != 0 || threads > 1024 || block.z > 64 ||
      grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "emulated launch: bad config (block %ux%ux%u, grid %ux%ux%u, smem %zu)\n", block.x, block.y,
                 block.z, grid.x, grid.y, grid.z, smem_bytes);
    std::abort();
  }
  grid_dim = {grid.x, grid.y, grid.z};
  block_dim = {block.x, block.y, block.z};
  poison_smem();
  Block state(threads);
  workers.run(threads, [&](unsigned t) {
    thread_index = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
    linear_thread = t;
    shuffle_parity = 0;
    current_block = &state;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          block_index = {bx, by, bz};
          kernel(args...);
          state.next.arrive_and_wait();  // the block is done before the next one starts
        }
  });
}

}  // namespace mmfast_emulation

// Device intrinsics the kernels use, as host functions (IEEE round-to-nearest, like the device's _rn).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __int_as_float(int bits) { return std::bit_cast<float>(bits); }
inline float __uint_as_float(unsigned bits) { return std::bit_cast<float>(bits); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }  // IEEE sqrt is correctly rounded, as on the device
// Integer atomics on shared or global memory (a CUDA thread is a std::thread here): returns the old value.
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
// Blocks run one after another here, so every earlier block's writes are visible: a fence orders nothing more.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
using std::max;  // device code's min(int, int) / max(int, int)
using std::min;

#define threadIdx ::mmfast_emulation::thread_index
#define blockIdx ::mmfast_emulation::block_index
#define blockDim ::mmfast_emulation::block_dim
#define gridDim ::mmfast_emulation::grid_dim
#define __syncthreads() ::mmfast_emulation::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::mmfast_emulation::shfl_xor((v), (lane_mask))
#define __ballot_sync(mask, pred) ::mmfast_emulation::ballot(pred)
#define __syncwarp() ::mmfast_emulation::syncwarp()
#define MMFAST_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::mmfast_emulation::smem)
#define MMFAST_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::mmfast_emulation::launch(kernel, dim3(grid), dim3(block), (smem_bytes), __VA_ARGS__)
// No device: the runtime calls the launch helpers make succeed trivially.
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess
#define cudaGetDevice(dev) (*(dev) = 0, cudaSuccess)
// The emulated device: an sm_90 with H100's opt-in shared memory (the only attributes the kernels ask for).
#define cudaDeviceGetAttribute(value, attr, dev)                                                             \
  (*(value) = (attr) == cudaDevAttrComputeCapabilityMajor ? 9 : static_cast<int>(::mmfast_emulation::kSmemBytes), \
   cudaSuccess)
