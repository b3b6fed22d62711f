// Runs mmfast's CUDA kernels on the CPU: one std::thread per CUDA thread, std::barrier for
// __syncthreads and a per-warp exchange for __shfl_xor_sync. Include it FIRST, then the .cu file, in a
// host-compiled test program (g++ -std=c++20 -I<cuda>/include): it tests the kernels' index math, bounds,
// barriers and shuffles where no GPU exists (tests/test_cuda_emulation.py). What it cannot show: races
// that a real GPU's scheduling exposes, and speed. Blocks run one at a time; the dynamic shared memory is
// filled with NaN before each block, so reading a slot the block never wrote poisons the result.
//
// Supported: dynamic shared memory declared with MMFAST_DYNAMIC_SMEM (kernels that also declare static
// __shared__ arrays are not), 1-D grids and blocks, and __shfl_xor_sync with a full mask.
#pragma once

#include <cuda_bf16.h>  // under a host compiler: the types and their host conversions
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#define __launch_bounds__(...)

namespace mmfast_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Index thread_index, block_index;
inline Index block_dim, grid_dim;

struct Block {
  explicit Block(unsigned threads) : barrier(threads), exchange(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> exchange;
};

inline thread_local Block* current_block = nullptr;

// The dynamic shared memory of the running block (MMFAST_DYNAMIC_SMEM below points the kernels at it).
constexpr size_t kSmemBytes = 227 * 1024;  // H100's opt-in limit
alignas(16) inline unsigned char smem[kSmemBytes];

inline void syncthreads() { current_block->barrier.arrive_and_wait(); }

inline float shfl_xor(float v, int lane_mask) {
  const unsigned t = thread_index.x, w = t / 32, lane = t % 32;
  Block& b = *current_block;
  b.exchange[t] = v;
  b.warps[w]->arrive_and_wait();
  const float r = b.exchange[w * 32 + (lane ^ static_cast<unsigned>(lane_mask))];
  b.warps[w]->arrive_and_wait();  // everyone has read before the next exchange overwrites
  return r;
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t smem_bytes, const Args&... args) {
  if (smem_bytes > kSmemBytes || threads % 32 != 0 || threads > 1024) {
    std::fprintf(stderr, "emulated launch: bad config (threads %u, smem %zu)\n", threads, smem_bytes);
    std::abort();
  }
  grid_dim = {grid, 1, 1};
  block_dim = {threads, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (size_t i = 0; i + sizeof(float) <= kSmemBytes; i += sizeof(float)) std::memcpy(smem + i, &nan, sizeof(float));
    Block block(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_index = {t, 0, 0};
        block_index = {b, 0, 0};
        current_block = &block;
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace mmfast_emulation

#define threadIdx ::mmfast_emulation::thread_index
#define blockIdx ::mmfast_emulation::block_index
#define blockDim ::mmfast_emulation::block_dim
#define gridDim ::mmfast_emulation::grid_dim
#define __syncthreads() ::mmfast_emulation::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::mmfast_emulation::shfl_xor((v), (lane_mask))
#define MMFAST_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::mmfast_emulation::smem)
#define MMFAST_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::mmfast_emulation::launch(kernel, (grid), (block), (smem_bytes), __VA_ARGS__)
// No device: the runtime calls the launch helpers make succeed trivially.
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess
#define cudaGetDevice(dev) (*(dev) = 0, cudaSuccess)
#define cudaDeviceGetAttribute(value, attr, dev) (*(value) = static_cast<int>(::mmfast_emulation::kSmemBytes), cudaSuccess)
