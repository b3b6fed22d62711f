// Test-only kernels for mmfast/mma.cuh: a small tensor-core GEMM (shared-memory tiles, ldmatrix fragments,
// mma.m16n8k16) and two probes that expose the raw fragments. tests/native/mma_emulated.cpp runs them on CPU
// threads under tests/native/cuda_emulation.h; tests/test_mma_emulation.py also compiles this file with nvcc
// for sm_80 and sm_90a, which assembles mma.cuh's inline PTX.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mmfast/cuda_launch.cuh"
#include "mmfast/cuda_utils.cuh"
#include "mmfast/mma.cuh"

namespace mmfast::cuda::mma_test {

// C[M, N] (fp32, row-major) = A[M, K] @ B[K, N] (both row-major T). A block of 2x2 warps owns a 32x32 tile of
// C, each warp 16x16 of it (two m16n8 tiles); K advances 32 at a time through shared memory.
constexpr int kWarpsM = 2, kWarpsN = 2, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kTileM = 16 * kWarpsM, kTileN = 16 * kWarpsN, kTileK = 32;
// Rows padded by 8 elements (16 bytes): still 16-byte aligned for ldmatrix, and the 8 rows of one 8x8
// matrix start in different banks.
constexpr int kPitchA = kTileK + 8, kPitchB = kTileN + 8;

template <typename T>
constexpr size_t tile_gemm_smem_bytes() {
  return (kTileM * kPitchA + kTileK * kPitchB) * sizeof(T);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tile_gemm_kernel(const T* a, const T* b, float* c, int M, int N, int K) {
  MMFAST_DYNAMIC_SMEM(unsigned char, smem);  // one type for every kernel here: nvcc has one extern array
  T* sa = reinterpret_cast<T*>(smem);  // [kTileM][kPitchA]
  T* sb = sa + kTileM * kPitchA;       // [kTileK][kPitchB]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int m0 = blockIdx.y * kTileM, n0 = blockIdx.x * kTileN;
  const T zero = from_float<T>(0.f);
  float acc[2][4] = {};
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    // Element-wise staging, zeros outside the matrices: the ragged edges cost nothing in the mma loop.
    for (int i = tid; i < kTileM * kTileK; i += kThreads) {
      const int r = i / kTileK, k = i % kTileK, gm = m0 + r, gk = k0 + k;
      sa[r * kPitchA + k] = gm < M && gk < K ? a[static_cast<int64_t>(gm) * K + gk] : zero;
    }
    for (int i = tid; i < kTileK * kTileN; i += kThreads) {
      const int k = i / kTileN, n = i % kTileN, gk = k0 + k, gn = n0 + n;
      sb[k * kPitchB + n] = gk < K && gn < N ? b[static_cast<int64_t>(gk) * N + gn] : zero;
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; kk += 16) {
      // Lane l addresses row l % 16, column 8 * (l / 16) of the 16x16 block: matrices 0-3 are its quadrants
      // (rows 0-7 | 8-15) x (cols 0-7 | 8-15), in the order of the A fragment's registers. For B the same
      // addressing of the [k][n] tile, transposed, gives k 0-7 | 8-15 of n tile 0, then of n tile 1.
      uint32_t af[4], bf[4];
      ldmatrix_x4(af, &sa[(wm * 16 + lane % 16) * kPitchA + kk + 8 * (lane / 16)]);
      ldmatrix_x4_trans(bf, &sb[(kk + lane % 16) * kPitchB + wn * 16 + 8 * (lane / 16)]);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_m16n8k16<T>(acc[0], af, b0, acc[0]);
      mma_m16n8k16<T>(acc[1], af, b1, acc[1]);
    }
    __syncthreads();  // before the next stage overwrites the tiles
  }
  const int g = lane / 4, q = lane % 4;
  for (int t = 0; t < 2; ++t)
    for (int i = 0; i < 4; ++i) {
      const int row = m0 + wm * 16 + g + 8 * (i / 2), col = n0 + wn * 16 + 8 * t + 2 * q + i % 2;
      if (row < M && col < N) c[static_cast<int64_t>(row) * N + col] = acc[t][i];
    }
}

template <typename T>
cudaError_t tile_gemm(const T* a, const T* b, float* c, int M, int N, int K, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid((N + kTileN - 1) / kTileN, (M + kTileM - 1) / kTileM);
  MMFAST_LAUNCH(tile_gemm_kernel<T>, grid, kThreads, tile_gemm_smem_bytes<T>(), stream, a, b, c, M, N, K);
  return cudaGetLastError();
}

// One mma per warp on registers given lane by lane: a[4 * thread + i], b[2 * thread + i], c and d
// [4 * thread + i]. The caller builds the fragments, so the layouts are checked against its own table.
template <typename T>
__global__ void mma_probe_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int t = threadIdx.x;
  const uint32_t af[4] = {a[4 * t], a[4 * t + 1], a[4 * t + 2], a[4 * t + 3]}, bf[2] = {b[2 * t], b[2 * t + 1]};
  const float cf[4] = {c[4 * t], c[4 * t + 1], c[4 * t + 2], c[4 * t + 3]};
  float df[4];
  mma_m16n8k16<T>(df, af, bf, cf);
  for (int i = 0; i < 4; ++i) d[4 * t + i] = df[i];
}

// rows[n_rows][8] (16-bit) copied to shared memory; thread t passes the address of row row_of_thread[t] to
// ldmatrix x4, x2, x1, x4.trans, x2.trans and x1.trans and writes the 14 registers to out[15 * t ...] in that
// order, then the thread index of lane t ^ 1, shuffled between the loads (shuffles and ldmatrix share the
// emulator's exchange buffers). shift moves lane 3's address by that many elements (a misaligned row).
constexpr int kLdmatrixProbeWords = 15;

__global__ void ldmatrix_probe_kernel(const uint16_t* rows, int n_rows, const int* row_of_thread, int shift,
                                      uint32_t* out) {
  MMFAST_DYNAMIC_SMEM(unsigned char, smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);
  const int t = threadIdx.x;
  for (int i = t; i < 8 * n_rows; i += blockDim.x) s[i] = rows[i];
  __syncthreads();
  const uint16_t* row = s + 8 * row_of_thread[t] + (t == 3 ? shift : 0);
  uint32_t x4[4], x2[2], x1[1], x4t[4], x2t[2], x1t[1];
  ldmatrix_x4(x4, row);
  ldmatrix_x2(x2, row);
  const uint32_t neighbour = __shfl_xor_sync(0xffffffffu, static_cast<uint32_t>(t), 1);
  ldmatrix<1, false>(x1, row);
  ldmatrix_x4_trans(x4t, row);
  ldmatrix_x2_trans(x2t, row);
  ldmatrix<1, true>(x1t, row);
  uint32_t* o = out + kLdmatrixProbeWords * t;
  for (int i = 0; i < 4; ++i) o[i] = x4[i];
  for (int i = 0; i < 2; ++i) o[4 + i] = x2[i];
  o[6] = x1[0];
  for (int i = 0; i < 4; ++i) o[7 + i] = x4t[i];
  for (int i = 0; i < 2; ++i) o[11 + i] = x2t[i];
  o[13] = x1t[0];
  o[14] = neighbour;
}

template <typename T>
cudaError_t mma_probe(const uint32_t* a, const uint32_t* b, const float* c, float* d, int warps, cudaStream_t stream) {
  MMFAST_LAUNCH(mma_probe_kernel<T>, 1, 32 * warps, 0, stream, a, b, c, d);
  return cudaGetLastError();
}

inline cudaError_t ldmatrix_probe(const uint16_t* rows, int n_rows, const int* row_of_thread, int shift, uint32_t* out,
                                  int warps, cudaStream_t stream) {
  MMFAST_LAUNCH(ldmatrix_probe_kernel, 1, 32 * warps, static_cast<size_t>(16) * n_rows, stream, rows, n_rows,
                row_of_thread, shift, out);
  return cudaGetLastError();
}

// Instantiated here so that an nvcc compile of this file alone assembles every kernel.
template cudaError_t tile_gemm<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, float*, int, int, int,
                                              cudaStream_t);
template cudaError_t tile_gemm<__half>(const __half*, const __half*, float*, int, int, int, cudaStream_t);
template cudaError_t mma_probe<__nv_bfloat16>(const uint32_t*, const uint32_t*, const float*, float*, int,
                                              cudaStream_t);
template cudaError_t mma_probe<__half>(const uint32_t*, const uint32_t*, const float*, float*, int, cudaStream_t);

}  // namespace mmfast::cuda::mma_test
