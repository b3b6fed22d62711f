// Tensor-core building blocks for mmfast's CUDA kernels: the warp-wide mma.m16n8k16 (fp16/bf16 inputs, fp32
// accumulate) and ldmatrix, as inline PTX for sm_80 and later. Under tests/native/cuda_emulation.h (which
// defines MMFAST_EMULATION) they call its CPU versions instead, which implement the same fragment layouts, so
// a kernel's fragment bookkeeping is tested without a GPU.
//
// Every lane of a warp must call each of these together (they are .sync.aligned: full warp, no mask).
// Notation of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"):
// g = lane >> 2 (the group), t = lane % 4 (the thread in the group). A 32-bit register holds two 16-bit
// elements, the lower-indexed one (column, or k for B) in its lower 16 bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace mmfast::cuda {

// d = a @ b + c on one 16x8 tile, k = 16; T is __nv_bfloat16 or __half (a and b hold T pairs). d may alias c.
//   a (16x16, row-major "row"): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//                               a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   b (16x8, "col": pairs run along k): b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   c, d (16x8 fp32): [0] = (g, 2t), [1] = (g, 2t+1), [2] = (g+8, 2t), [3] = (g+8, 2t+1)
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma inputs are bf16 or fp16");
#if defined(MMFAST_EMULATION)
  ::mmfast_emulation::mma_m16n8k16<T>(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Not volatile: a pure register operation the compiler may schedule freely.
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // no bf16 mma before sm_80: kernels using it must not run there
#endif
}

// ldmatrix: Count (1, 2 or 4) 8x8 matrices of 16-bit elements from shared memory. Lanes 8j .. 8j+7 pass the
// addresses of rows 0..7 of matrix j (16 bytes each, 16-byte aligned; the other lanes' addresses are
// ignored). Lane l receives in r[j] the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j, or with
// Trans of its transpose: (rows 2(l%4), 2(l%4)+1, col l/4), which turns a row-major [k][n] tile into mma's
// "col" B fragment.
template <int Count, bool Trans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[Count], const void* smem_row) {
  static_assert(Count == 1 || Count == 2 || Count == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(MMFAST_EMULATION)
  ::mmfast_emulation::ldmatrix<Count, Trans>(r, smem_row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const auto addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  // volatile: it reads shared memory, so it must stay between the barriers that order the writes.
  if constexpr (Count == 4 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else if constexpr (Count == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else if constexpr (Count == 2 && !Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  } else if constexpr (Count == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
  } else if constexpr (!Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // ldmatrix needs sm_75
#endif
}

// The usual shapes: an A fragment (four 8x8 quadrants: rows 0-7/8-15 x cols 0-7/8-15, lane l addressing row
// l % 16, col 8 * (l / 16)), and B fragments of a row-major [k][n] tile with .trans (x4: k 0-7/8-15 x two
// 8-column n tiles, same addressing; x2: one n tile).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ldmatrix<4, false>(r, smem_row); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) { ldmatrix<2, false>(r, smem_row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  ldmatrix<4, true>(r, smem_row);
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  ldmatrix<2, true>(r, smem_row);
}


// Two floats rounded to T and packed as one mma register (lo in the lower 16 bits).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma inputs are bf16 or fp16");
  uint16_t l, h;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    l = static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(lo)).x;
    h = static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(hi)).x;
  } else {
    l = static_cast<__half_raw>(__float2half_rn(lo)).x;
    h = static_cast<__half_raw>(__float2half_rn(hi)).x;
  }
  return static_cast<uint32_t>(l) | static_cast<uint32_t>(h) << 16;
}

// Copies rows [r0, r0 + ROWS) of a row-major T matrix (row r at src + r * row_stride) into shared memory
// (tile[(r - r0) * ld + c], ld a multiple of 8), zero-filling tile rows >= n_rows and columns >= n_cols so that
// padding adds nothing to a product. Whole block (THREADS threads), in 16-byte chunks of 8 elements: one load
// each where the source chunk is whole and 16-byte aligned, element by element otherwise (odd widths or
// strides). The index arithmetic is the attention kernels' original: hoisting src + r0 * row_stride or a
// 64-bit n_cols made ptxas spill 32-116 bytes in the d=64/128 attention forward on sm_90a.
template <int ROWS, int COLS, int THREADS, typename T>
__device__ __forceinline__ void load_rows_tile(T* tile, int ld, const T* src, int64_t row_stride, int64_t r0,
                                               int64_t n_rows, int n_cols) {
  static_assert(sizeof(T) == 2 && COLS % 8 == 0, "T tiles: 16-bit, in chunks of 8");
  T zero;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    zero = __float2bfloat16_rn(0.f);
  } else {
    zero = __float2half_rn(0.f);
  }
  for (int e = threadIdx.x; e < ROWS * COLS / 8; e += THREADS) {
    const int r = e / (COLS / 8), c = e % (COLS / 8) * 8;
    const T* from = src + (r0 + r) * row_stride + c;
    T* to = tile + r * ld + c;
    if (r < n_rows && c + 8 <= n_cols && reinterpret_cast<uintptr_t>(from) % 16 == 0) {
      *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(from);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) to[i] = r < n_rows && c + i < n_cols ? from[i] : zero;
    }
  }
}

// ---- warp tiles: one warp's 16 rows against a shared-memory tile -----------------------------------------
// An accumulator float acc[N / 8][4] holds a 16 x N fp32 tile as N / 8 mma C fragments: acc[j] covers
// columns 8j .. 8j + 7 in the C layout above (lane g, t: rows g and g + 8, columns 8j + 2t and 8j + 2t + 1).
// Shared tiles are row-major T with a pitch `ld` (elements) whose rows are 16-byte aligned; a pitch of
// (multiple of 64) + 8 elements keeps ldmatrix's eight row reads in eight different bank groups.

// acc += A @ B^T: A = the warp's 16 rows of a [.][K] tile (a points at its row 0), B = an [N][K] tile (the
// N rows are the output columns), K and N multiples of 16. S = Q K^T in attention.
template <typename T, int N, int K>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[N / 8][4], const T* a, int lda, const T* b, int ldb,
                                             int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "warp tiles are multiples of 16");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane % 16) * lda + kk * 16 + 8 * (lane / 16));
#pragma unroll
    for (int j2 = 0; j2 < N / 16; ++j2) {
      // Matrices (rows 0-7, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 0-7), (rows 8-15, k 8-15) of B's 16
      // rows: without .trans a row-major [n][k] tile is already mma's "col" B fragment.
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (j2 * 16 + lane % 8 + 8 * (lane / 16)) * ldb + kk * 16 + 8 * (lane / 8 % 2));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_m16n8k16<T>(acc[2 * j2], af, b0, acc[2 * j2]);
      mma_m16n8k16<T>(acc[2 * j2 + 1], af, b1, acc[2 * j2 + 1]);
    }
  }
}

// acc += P @ X: P = a 16 x K fp32 tile held as C fragments (p[K / 8][4], e.g. the probabilities just
// computed from S), rounded to T and reused in registers as A fragments; X = a row-major [K][N] tile.
// O += P V in attention. K and N multiples of 16.
template <typename T, int K, int N>
__device__ __forceinline__ void warp_mma_cb(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const T* x, int ldx,
                                            int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "warp tiles are multiples of 16");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    // C fragments of columns 16kk .. 16kk + 7 and 16kk + 8 .. 16kk + 15 are exactly the A fragment's
    // (rows g / g + 8) x (k 2t, 2t + 1 / 2t + 8, 2t + 9): no shuffle needed.
    const uint32_t af[4] = {pack_pair<T>(p[2 * kk][0], p[2 * kk][1]), pack_pair<T>(p[2 * kk][2], p[2 * kk][3]),
                            pack_pair<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack_pair<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int j2 = 0; j2 < N / 16; ++j2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, x + (kk * 16 + lane % 16) * ldx + j2 * 16 + 8 * (lane / 16));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_m16n8k16<T>(acc[2 * j2], af, b0, acc[2 * j2]);
      mma_m16n8k16<T>(acc[2 * j2 + 1], af, b1, acc[2 * j2 + 1]);
    }
  }
}

// ---- block tiles: a block's ROWS x COLS dot products, features streamed through shared memory -------------
// acc (warp w's C fragments) = rows[r0 + 16w, r0 + 16w + 16) . cols[j0, j0 + COLS)^T over all d features, 0 for
// rows >= n_rows and columns >= n_cols: K-wide feature slices of both operands go through row_tile
// [ROWS][K + 8] and col_tile [COLS][K + 8] (the pitch keeps ldmatrix conflict-free). Both operands are
// row-major with row stride d. Whole block (THREADS = 32 * ROWS / 16); the first barrier also orders the
// previous call's readers of the tiles, so a kernel may call it in a loop and read acc in between.
template <typename T, int ROWS, int COLS, int K, int THREADS>
__device__ __forceinline__ void block_tile_dots(float (&acc)[COLS / 8][4], T* row_tile, T* col_tile, const T* rows,
                                                const T* cols, int64_t d, int64_t r0, int64_t n_rows, int64_t j0,
                                                int64_t n_cols) {
  static_assert(THREADS == 32 * ROWS / 16, "one warp per 16 rows");
  constexpr int kPitch = K + 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < COLS / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int64_t k0 = 0; k0 < d; k0 += K) {
    const int slice = static_cast<int>(d - k0 < K ? d - k0 : K);
    __syncthreads();  // the previous slice's readers are done
    load_rows_tile<ROWS, K, THREADS>(row_tile, kPitch, rows + k0, d, r0, n_rows - r0, slice);
    load_rows_tile<COLS, K, THREADS>(col_tile, kPitch, cols + k0, d, j0, n_cols - j0, slice);
    __syncthreads();
    warp_mma_abt<T, COLS, K>(acc, row_tile + warp * 16 * kPitch, kPitch, col_tile, kPitch, lane);
  }
}

// Stores the pair (v0, v1) rounded to T at row[c], row[c + 1] (c + 1 < n_cols): one 4-byte store where aligned,
// element stores otherwise (odd row lengths).
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int64_t n_cols, int64_t c, float v0, float v1) {
  T* to = row + c;
  const uint32_t packed = pack_pair<T>(v0, v1);
  if (c + 1 < n_cols && reinterpret_cast<uintptr_t>(to) % 4 == 0) {
    *reinterpret_cast<uint32_t*>(to) = packed;
  } else {
    reinterpret_cast<uint16_t*>(to)[0] = static_cast<uint16_t>(packed);
    if (c + 1 < n_cols) reinterpret_cast<uint16_t*>(to)[1] = static_cast<uint16_t>(packed >> 16);
  }
}

}  // namespace mmfast::cuda
