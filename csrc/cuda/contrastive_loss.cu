// CUDA kernels of the contrastive-loss block operators mmfast::clip_loss_block, clip_loss_block_backward
// and siglip_loss_block (schemas in csrc/mmfast.cpp), and their launchers. The GEMMs run in cuBLAS
// (at::mm_out in contrastive_loss_api.cpp); these kernels do everything around them. The block is cut
// into column chunks [c0, c0 + W); per chunk cuBLAS writes the fp32 dot products rows @ cols_chunk^T
// into a scratch [Bi, W], then:
//
//   CLIP forward   clip_row_merge (one warp per row: online (max, sum-exp) of x = scale * dot merged into
//                  the row's running state, the positive logit when its column is in the chunk; the last
//                  chunk writes row_lse) -> clip_col_partial (threads over columns, so each warp reads 128
//                  contiguous bytes of a row; rows cut into slices: one (max, sum) per slice and column)
//                  -> clip_col_finish (merges the slices in order: col_lse of the chunk's columns is
//                  complete, since every row is in the chunk). 1 GEMM per chunk.
//   CLIP backward  the same GEMM again -> clip_backward_tile (dL/dx per the schema, written as the input
//                  dtype, + per-row fp64 partials of sum dL/dx * dot and sum dL/dx) -> cuBLAS
//                  grad_rows += dX @ cols_chunk and grad_cols[chunk] = dX^T @ rows (fp32 out) ->
//                  scale_to_dtype (times scale, in the input dtype). 3 GEMMs per chunk.
//   SigLIP         the same 3 GEMMs; siglip_tile writes the loss partials and dX = sigmoid(x) - [pos]
//                  in one pass (no row statistics needed), or only the loss when no gradient is wanted.
//   Scalars        sum_rows: one block sums the per-row fp64 partials in a fixed order.
//   Fused (fp16/bf16 on sm_80+, opt-in with MMFAST_CUDA_TENSOR_CORES=1 until a GPU run has validated and
//                  timed them): clip_forward_fused, clip_backward_fused and siglip_fused compute the chunk's
//                  dots on the tensor cores (mma.m16n8k16, 64-row stripes x 64-column tiles) and run the
//                  epilogues above on them in registers, in place of the first GEMM and its fp32 [Bi, W]
//                  scratch: 1 of 1 GEMMs fused in the forward, 1 of 3 in the backward (the gradient GEMMs
//                  stay in cuBLAS: a [Bi, D] accumulator of D = 768 does not fit one stripe's registers).
//
// Memory: W = min(Bt, 4096), halved while Bi * W > 2^26, so the fp32 scratch stays <= 256 MB and the
// extra memory is O(Bi * W + (Bi + Bt) * D), never Bi x Bt. At Bi = Bt = 65536, D = 768, bf16: W = 1024;
// forward 256 MB of scratch (+ 2 MB of column partials); backward 256 MB scratch + 128 MB dX (bf16) +
// 2 x 192 MB fp32 [Bi, D] (accumulator and one chunk's product: cuBLAS cannot add an fp32 output into
// an fp32 accumulator from bf16 inputs through at::mm_out) + 3 MB [W, D] + the 2 x 96 MB gradients:
// ~1.0 GB, where the B x B fp32 logits alone would be 16 GB. Why the chunk stays wide: a 4096-wide
// GEMM keeps cuBLAS near its peak, and each chunk costs a few launches.
// Estimated, not measured (no GPU here): per chunk at that size the GEMM is 2 * 65536 * 1024 * 768 =
// 103 GFLOP (~0.15-0.2 ms on an H100) and the forward's two epilogue passes read the 256 MB scratch
// twice (~0.17 ms at ~3 TB/s): the epilogue is the part left to fuse.
//
// dX in fp16 is scaled by a power of two (gradient_factor): CLIP's coefficients are ~1/B, below fp16's
// smallest normal (2^-14) from B = 16384 on, and SigLIP's negatives at open_clip's init (scale 10,
// bias -10) are sigmoid(-10) = 4.5e-5, also subnormal; the factor is undone exactly in scale_to_dtype.
//
// Numerics follow the CPU kernels (csrc/cpu/contrastive_loss.cpp): x = scale * dot rounded before it
// is compared or subtracted (__fmul_rn: a contracted fma(scale, dot, -max) would make exp(x - max) of
// the max itself differ from 1), lse = max + log(sum) + bias, the positive lane's CLIP gradient in the
// expm1 form and SigLIP's from e = exp(-|x|) (contrastive.h). log(sum) is log1p(sum - 1): logf is the
// approximate __logf under --use_fast_math, log1pf is not, and it is exactly 0 for a lone logit, so a
// 1 x 1 block's lse equals its positive logit bit for bit (the CLIP loss of one pair is exactly 0).
// Determinism: no floating-point atomics; every sum is a fixed tree or a fixed order.
#include "mmfast/contrastive_loss_cuda.h"
#include "mmfast/cuda_launch.cuh"
#include "mmfast/cuda_utils.cuh"
#include "mmfast/mma.cuh"

#include <algorithm>

namespace mmfast::cuda {
namespace {

// Grid sizes from counts the glue bounds (rows and columns < 2^31).
inline unsigned grid(int64_t n) { return static_cast<unsigned>(n); }

constexpr int kRowWarps = 8;  // row kernels: one warp per row, 8 rows per block
inline int64_t row_blocks(int64_t rows) { return (rows + kRowWarps - 1) / kRowWarps; }

__device__ __forceinline__ float lse_of(const SoftmaxState& st) { return st.max + log1pf(st.sum - 1.f); }

// W values rounded to T in one store of W * sizeof(T) bytes. dX rows sit at the same element offsets as
// the fp32 dot rows (both buffers have 16-byte aligned bases), so where for_each_chunk hands out a
// 16-byte aligned 4-float fragment of the dots, the 4 T of dX there are 4 * sizeof(T)-byte aligned.
template <typename T, int W>
struct alignas(W * sizeof(T)) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ void store_pack(T* p, const float (&x)[W]) {
  Pack<T, W> pk;
#pragma unroll
  for (int i = 0; i < W; ++i) pk.v[i] = from_float<T>(x[i]);
  *reinterpret_cast<Pack<T, W>*>(p) = pk;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ================================ CLIP forward ==================================================

// Row r's state over one chunk's columns, merged into its running state (row_max, row_sum) unless first;
// the last chunk writes row_lse = lse + bias instead.
__device__ __forceinline__ void merge_row_chunk(SoftmaxState st, int64_t r, bool first, bool last, float bias,
                                                float* row_max, float* row_sum, float* row_lse) {
  if (!first) st = softmax_merge(SoftmaxState{row_max[r], row_sum[r]}, st);
  if (last) {
    row_lse[r] = lse_of(st) + bias;
  } else {
    row_max[r] = st.max;
    row_sum[r] = st.sum;
  }
}

__global__ void __launch_bounds__(kRowWarps * 32)
    clip_row_merge_kernel(const float* __restrict__ dots, int64_t rows, int64_t width, int64_t c0,
                          const float* __restrict__ scale_p, const float* __restrict__ bias_p, int64_t label_offset,
                          bool first, bool last, float* __restrict__ row_max, float* __restrict__ row_sum,
                          float* __restrict__ row_lse, float* __restrict__ pos) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // the whole warp leaves; no block-wide barrier follows
  const float* d = dots + r * width;
  const float scale = *scale_p;
  const RowSplit sp = split_row(d, width);
  SoftmaxState st = empty_softmax_state();
  for_each_chunk<kVec<float>>(
      sp, width, lane, 32, [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(d + j); },
      [&](int64_t, const auto& f, auto w) {
        constexpr int W = decltype(w)::value;
        float l[W];
#pragma unroll
        for (int i = 0; i < W; ++i) l[i] = __fmul_rn(scale, f.f(i));
        softmax_add(st, l);
      });
  st = warp_reduce(st);
  if (lane != 0) return;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  merge_row_chunk(st, r, first, last, bias, row_max, row_sum, row_lse);
  const int64_t jp = r + label_offset - c0;  // the positive's column in this chunk
  if (jp >= 0 && jp < width) pos[r] = __fadd_rn(__fmul_rn(scale, d[jp]), bias);
}

// Column partials: a block is 32 columns x kColLanes row lanes; lane y takes rows y, y + kColLanes, ...
// of the block's slice, kColUnroll loads in flight; the lanes' states merge in lane order. A slice past
// the last row (possible when the slice count is capped) leaves the empty state {-inf, 0}.
constexpr int kColLanes = 8;
constexpr int kColUnroll = 4;

__global__ void __launch_bounds__(32 * kColLanes)
    clip_col_partial_kernel(const float* __restrict__ dots, int64_t rows, int64_t width, int64_t slice_rows,
                            const float* __restrict__ scale_p, float* __restrict__ part_max,
                            float* __restrict__ part_sum) {
  __shared__ float smax[kColLanes][32], ssum[kColLanes][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * slice_rows;
  const int64_t r1 = r0 + slice_rows < rows ? r0 + slice_rows : rows;
  const float scale = *scale_p;
  SoftmaxState st = empty_softmax_state();
  if (j < width) {  // no return: every thread reaches the barrier below
    const float* d = dots + j;
    int64_t r = r0 + ty;
    constexpr int64_t kStep = kColLanes * kColUnroll;
    for (; r + (kColUnroll - 1) * kColLanes < r1; r += kStep) {
      float l[kColUnroll];
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) l[u] = d[(r + u * kColLanes) * width];
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) l[u] = __fmul_rn(scale, l[u]);
      softmax_add(st, l);
    }
    for (; r < r1; r += kColLanes) {
      const float l[1] = {__fmul_rn(scale, d[r * width])};
      softmax_add(st, l);
    }
  }
  smax[ty][tx] = st.max;
  ssum[ty][tx] = st.sum;
  __syncthreads();
  if (ty == 0 && j < width) {
    for (int y = 1; y < kColLanes; ++y) st = softmax_merge(st, SoftmaxState{smax[y][tx], ssum[y][tx]});
    const int64_t k = static_cast<int64_t>(blockIdx.y) * width + j;
    part_max[k] = st.max;
    part_sum[k] = st.sum;
  }
}

__global__ void __launch_bounds__(256)
    clip_col_finish_kernel(const float* __restrict__ part_max, const float* __restrict__ part_sum, int64_t slices,
                           int64_t width, const float* __restrict__ bias_p, float* __restrict__ col_lse) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  SoftmaxState st = empty_softmax_state();
  for (int64_t s = 0; s < slices; ++s) {
    st = softmax_merge(st, SoftmaxState{part_max[s * width + j], part_sum[s * width + j]});
  }
  col_lse[j] = lse_of(st) + (bias_p != nullptr ? *bias_p : 0.f);
}

// ---- fused on the tensor cores (fp16/bf16, sm_80+) -------------------------------------------------
// One kernel per chunk in place of cuBLAS + the two passes above: the dot products never leave the chip.
// Block = a stripe of 64 rows (4 warps x 16 rows) against the chunk's columns in tiles of 64: each tile's
// 64 x 64 dots come from mma.m16n8k16 (mmfast/mma.cuh) over the features in 64-wide slices staged in shared
// memory; then x = scale * dot (rounded, as above) feeds the rows' online states (kept in registers across
// the chunk) and one (max, sum-exp) per column of the stripe, merged warp by warp in a fixed order and
// written as the stripe's partial; clip_col_finish_kernel merges the stripes in order, as it merges slices.
// A lane holds rows g, g + 8 of its warp's 16 and columns 8j + 2t, 8j + 2t + 1 of the tile (g = lane / 4,
// t = lane % 4). Scratch: 2 * stripes * width floats; the GEMM's fp32 [rows, width] output is never made.
constexpr int kFusedRows = static_cast<int>(kFusedStripeRows), kFusedCols = 64, kFusedK = 64, kFusedThreads = 128;
static_assert(kFusedRows == kFusedThreads / 32 * 16, "4 warps of 16 rows make a stripe");
constexpr int kFusedPitch = kFusedK + 8;  // ldmatrix rows in 8 different bank groups

// x = the warp's 16 rows of the stripe [r0, r0 + 64) times the chunk's columns [j0, j0 + 64) (mma.cuh).
template <typename T>
__device__ __forceinline__ void stripe_dots(float (&x)[kFusedCols / 8][4], T* row_tile, T* col_tile, const T* rows,
                                            const T* cols, int64_t n_rows, int64_t d, int64_t width, int64_t r0,
                                            int64_t j0) {
  block_tile_dots<T, kFusedRows, kFusedCols, kFusedK, kFusedThreads>(x, row_tile, col_tile, rows, cols, d, r0, n_rows,
                                                                     j0, width);
}

template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
    clip_forward_fused_kernel(const T* __restrict__ rows, const T* __restrict__ cols, int64_t n_rows, int64_t d,
                              int64_t width, int64_t c0, const float* __restrict__ scale_p,
                              const float* __restrict__ bias_p, int64_t label_offset, bool first, bool last,
                              float* __restrict__ row_max, float* __restrict__ row_sum, float* __restrict__ row_lse,
                              float* __restrict__ pos, float* __restrict__ part_max, float* __restrict__ part_sum) {
  __shared__ __align__(16) T row_tile[kFusedRows * kFusedPitch];
  __shared__ __align__(16) T col_tile[kFusedCols * kFusedPitch];
  __shared__ float warp_col_max[kFusedThreads / 32][kFusedCols], warp_col_sum[kFusedThreads / 32][kFusedCols];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kFusedRows;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  SoftmaxState row_state[2] = {empty_softmax_state(), empty_softmax_state()};  // rows g, g + 8 of the warp

  for (int64_t j0 = 0; j0 < width; j0 += kFusedCols) {
    float x[kFusedCols / 8][4];
    stripe_dots(x, row_tile, col_tile, rows, cols, n_rows, d, width, r0, j0);
    // x = scale * dot; padding rows and columns become -inf, which every state below skips.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t r = r0 + warp * 16 + g + 8 * half;
      const int64_t jp = r + label_offset - c0 - j0;  // the positive's column in this tile
      float l[kFusedCols / 4];
#pragma unroll
      for (int j = 0; j < kFusedCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = 8 * j + 2 * t + e;
          float& v = x[j][2 * half + e];
          v = r < n_rows && j0 + c < width ? __fmul_rn(scale, v) : -INFINITY;
          l[2 * j + e] = v;
          if (c == jp && r < n_rows && j0 + c < width) pos[r] = __fadd_rn(v, bias);
        }
      SoftmaxState tile = empty_softmax_state();
      softmax_add(tile, l);
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {  // the row's 4 lanes
        tile = softmax_merge(tile, SoftmaxState{__shfl_xor_sync(0xffffffffu, tile.max, o),
                                                __shfl_xor_sync(0xffffffffu, tile.sum, o)});
      }
      row_state[half] = softmax_merge(row_state[half], tile);
    }
    // Columns: the lane's two rows, then the warp's 8 row groups (lanes g = 0..7 of one t), then the 4 warps.
#pragma unroll
    for (int j = 0; j < kFusedCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float two[2] = {x[j][e], x[j][2 + e]};
        SoftmaxState col = empty_softmax_state();
        softmax_add(col, two);
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) {
          col = softmax_merge(col, SoftmaxState{__shfl_xor_sync(0xffffffffu, col.max, o),
                                                __shfl_xor_sync(0xffffffffu, col.sum, o)});
        }
        if (g == 0) {
          warp_col_max[warp][8 * j + 2 * t + e] = col.max;
          warp_col_sum[warp][8 * j + 2 * t + e] = col.sum;
        }
      }
    __syncthreads();
    if (threadIdx.x < kFusedCols && j0 + threadIdx.x < width) {
      SoftmaxState col = empty_softmax_state();
      for (int w = 0; w < kFusedThreads / 32; ++w) {
        col = softmax_merge(col, SoftmaxState{warp_col_max[w][threadIdx.x], warp_col_sum[w][threadIdx.x]});
      }
      const int64_t k = static_cast<int64_t>(blockIdx.x) * width + j0 + threadIdx.x;
      part_max[k] = col.max;
      part_sum[k] = col.sum;
    }
  }
  if (t != 0) return;  // no barrier follows
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + warp * 16 + g + 8 * half;
    if (r < n_rows) merge_row_chunk(row_state[half], r, first, last, bias, row_max, row_sum, row_lse);
  }
}

// ================================ gradients =====================================================

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // a previous call's readers of scratch[32] are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < nwarps ? scratch[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, o));
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

__device__ __forceinline__ float abs_max(const float* a, int64_t n, float* scratch) {
  float m = 0.f;
  if (a != nullptr) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, fabsf(a[i]));
  }
  return block_max(m, scratch);  // every thread calls it: the barriers inside are reached by all
}

constexpr int kFactorExponent = 12;  // |f * dX| < 2^12: 16x below fp16's largest finite value

__global__ void __launch_bounds__(1024)
    gradient_factor_kernel(const float* __restrict__ a, int64_t na, const float* __restrict__ b, int64_t nb,
                           const float* __restrict__ c, int64_t nc, float extra, float* __restrict__ factor) {
  __shared__ float red[33];
  const float ma = abs_max(a, na, red);
  const float mb = abs_max(b, nb, red);
  const float mc = abs_max(c, nc, red);
  if (threadIdx.x != 0) return;
  const float bound = ma + mb + mc + extra;
  int k = 0;  // f = 2^k
  if (bound > 0.f && bound <= 3.4e38f) {  // not 0, inf or NaN
    int e;
    frexpf(bound, &e);  // bound < 2^e
    k = min(max(kFactorExponent - e, -100), 100);
  }
  factor[0] = ldexpf(1.f, k);
  factor[1] = ldexpf(1.f, -k);
}

// The positive pair's CLIP gradient without the cancellation of p - 1 (contrastive::clip_positive_grad).
__device__ __forceinline__ float clip_positive_grad(float x, float gr, float row_shift, float gc, float col_shift,
                                                   float gp) {
  float g = gr + gc + gp;
  if (gr != 0.f) g += gr * expm1f(x - row_shift);
  if (gc != 0.f) g += gc * expm1f(x - col_shift);
  return g;
}

// A non-positive pair's CLIP gradient: gr P_row + gc P_col, P = exp(x - shift) (shift = lse - bias).
__device__ __forceinline__ float clip_grad(float x, bool has_gr, float gr, float row_shift, bool has_gc, float gc,
                                           float col_shift) {
  float g = has_gr ? gr * fast_exp(x - row_shift) : 0.f;
  if (has_gc) g = fmaf(gc, fast_exp(x - col_shift), g);
  return g;
}

// One warp per row of the chunk. U = 2: each 4-wide fragment also loads grad_col and col_lse per column.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    clip_backward_tile_kernel(const float* __restrict__ dots, int64_t rows, int64_t width, int64_t c0,
                              const float* __restrict__ scale_p, const float* __restrict__ bias_p,
                              int64_t label_offset, const float* __restrict__ row_lse,
                              const float* __restrict__ col_lse, const float* __restrict__ grad_row,
                              const float* __restrict__ grad_col, const float* __restrict__ grad_pos,
                              const float* __restrict__ factor_p, T* __restrict__ dx, double* __restrict__ row_gdot,
                              double* __restrict__ row_g, bool first) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // the whole warp leaves; only warp shuffles follow
  const float* d = dots + r * width;
  T* out = dx + r * width;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  const float f = factor_p != nullptr ? *factor_p : 1.f;
  // P = exp(x + bias - lse) = exp(x - shift) with shift = lse - bias, as the CPU kernel forms it.
  const float gr = grad_row != nullptr ? grad_row[r] : 0.f;
  const float rs = grad_row != nullptr ? row_lse[r] - bias : 0.f;
  const float* gc = grad_col != nullptr ? grad_col + c0 : nullptr;
  const float* cl = col_lse + c0;
  // The positive's column in this chunk (only with grad_pos, as on the CPU) and its gradient, formed
  // once per row: expm1f is a subroutine call in SASS, whose spills stay out of the sweep this way.
  int64_t jp = grad_pos != nullptr ? r + label_offset - c0 : -1;
  if (jp >= width) jp = -1;
  float g_pos = 0.f;
  if (jp >= 0) {  // warp-uniform
    g_pos = clip_positive_grad(__fmul_rn(scale, d[jp]), gr, rs, gc != nullptr ? gc[jp] : 0.f,
                               gc != nullptr ? cl[jp] - bias : 0.f, grad_pos[r]);
  }
  const RowSplit sp = split_row(d, width);
  double sum_gd = 0.0, sum_g = 0.0;
  for_each_chunk<kVec<float>, 2>(
      sp, width, lane, 32, [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(d + j); },
      [&](int64_t j, const auto& frag, auto w) {
        constexpr int W = decltype(w)::value;
        float part_gd = 0.f, part_g = 0.f, o[W];
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const int64_t c = j + i;
          const float dot = frag.f(i);
          const float x = __fmul_rn(scale, dot);
          float g;
          if (c == jp) {
            g = g_pos;
          } else {
            g = clip_grad(x, grad_row != nullptr, gr, rs, gc != nullptr, gc != nullptr ? gc[c] : 0.f,
                          gc != nullptr ? cl[c] - bias : 0.f);
          }
          part_gd = fmaf(g, dot, part_gd);
          part_g += g;
          o[i] = g * f;
        }
        store_pack<T, W>(out + j, o);
        sum_gd += part_gd;
        sum_g += part_g;
      });
  sum_gd = warp_sum_f64(sum_gd);
  sum_g = warp_sum_f64(sum_g);
  if (lane == 0) {
    row_gdot[r] = first ? sum_gd : row_gdot[r] + sum_gd;
    row_g[r] = first ? sum_g : row_g[r] + sum_g;
  }
}

// exp(y) for y <= 0 within ~1 ulp, without MUFU.EX2. SigLIP's fp32 scalar gradients are small differences
// of large sums (tests/test_contrastive_loss.py at B=128, D=768, scale 100, bias -10: dL/dbias = -0.35 of
// terms summing to 226 in magnitude), so a rounding shared by every term counts ~640x: fast_exp's rounded
// argument y * log2(e) (|y| up to ~30) put the bias gradient 4.1e-6 of its value off G of the same fp32
// logits (emulated), 2.1e-6 with this (the roundings of e, 1 + e, the reciprocal and the product: 2.6e-6
// with a correctly rounded exp instead). Cody-Waite: y = k ln2 + r, |r| <= ln2 / 2, k * ln2_hi exact (15
// significant bits); exp(r) by Taylor to r^8 (truncation < 2e-10 relative); 2^k from the exponent bits.
// Below ln(2^-126) it gives 0, as ex2.approx.ftz does; NaN stays NaN. ~16 FMA-pipe instructions instead
// of 2, in a pass bound by memory (siglip_tile_kernel<float>: 50 registers, was 52; no spills; sm_90a).
__device__ __forceinline__ float exp_nonpositive(float y) {
  const float k = fmaxf(rintf(y * 1.44269504f), -126.f);  // fmaxf(NaN, -126) = -126: the int below is defined
  float r = fmaf(k, -0.693145751953125f, y);
  r = fmaf(k, -1.42860677e-6f, r);
  float p = 1.f / 40320.f;
  p = fmaf(p, r, 1.f / 5040.f);
  p = fmaf(p, r, 1.f / 720.f);
  p = fmaf(p, r, 1.f / 120.f);
  p = fmaf(p, r, 1.f / 24.f);
  p = fmaf(p, r, 1.f / 6.f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.f);
  p = fmaf(p, r, 1.f);
  return y < -87.33654f ? 0.f : p * __int_as_float((static_cast<int>(k) + 127) << 23);
}

// SigLIP: a negative pair costs softplus(x) with gradient sigmoid(x), both from e = exp(-|x|); the
// positive (column == row, has_positives) costs softplus(-x) with gradient -sigmoid(-x)
// (contrastive::siglip_positive).
__device__ __forceinline__ float siglip_pair_loss(float x, float e, bool positive) {
  return fmaxf(positive ? -x : x, 0.f) + log1pf(e);
}

__device__ __forceinline__ float siglip_pair_grad(float x, float e, bool positive) {
  const float q = __frcp_rn(1.f + e);  // sigmoid(|x|)
  if (positive) return x >= 0.f ? -e * q : -q;
  return x >= 0.f ? q : e * q;
}

// dx null: the loss only.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32)
    siglip_tile_kernel(const float* __restrict__ dots, int64_t rows, int64_t width, int64_t c0,
                       const float* __restrict__ scale_p, const float* __restrict__ bias_p, bool has_positives,
                       const float* __restrict__ factor_p, T* __restrict__ dx, double* __restrict__ row_loss,
                       double* __restrict__ row_gdot, double* __restrict__ row_g, bool first) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (r >= rows) return;  // the whole warp leaves; only warp shuffles follow
  const float* d = dots + r * width;
  T* out = dx != nullptr ? dx + r * width : nullptr;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  const float f = factor_p != nullptr ? *factor_p : 1.f;
  const int64_t jp = has_positives ? r - c0 : -1;
  const RowSplit sp = split_row(d, width);
  double sum_loss = 0.0, sum_gd = 0.0, sum_g = 0.0;
  for_each_chunk<kVec<float>, 2>(
      sp, width, lane, 32, [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(d + j); },
      [&](int64_t j, const auto& frag, auto w) {
        constexpr int W = decltype(w)::value;
        float part_loss = 0.f, part_gd = 0.f, part_g = 0.f, o[W];
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const int64_t c = j + i;
          const float dot = frag.f(i);
          const float x = fmaf(dot, scale, bias);
          // fp32 features get the accurate exponential; fp16/bf16 ones, whose bound is the error of the
          // reference in that precision, keep MUFU.EX2.
          const float e = std::is_same_v<T, float> ? exp_nonpositive(-fabsf(x)) : fast_exp(-fabsf(x));
          const bool positive = c == jp;
          part_loss += siglip_pair_loss(x, e, positive);
          if (out != nullptr) {
            const float g = siglip_pair_grad(x, e, positive);
            part_gd = fmaf(g, dot, part_gd);
            part_g += g;
            o[i] = g * f;
          }
        }
        if (out != nullptr) store_pack<T, W>(out + j, o);
        sum_loss += part_loss;
        sum_gd += part_gd;
        sum_g += part_g;
      });
  sum_loss = warp_sum_f64(sum_loss);
  if (out != nullptr) {  // warp-uniform
    sum_gd = warp_sum_f64(sum_gd);
    sum_g = warp_sum_f64(sum_g);
  }
  if (lane != 0) return;
  row_loss[r] = first ? sum_loss : row_loss[r] + sum_loss;
  if (out != nullptr) {
    row_gdot[r] = first ? sum_gd : row_gdot[r] + sum_gd;
    row_g[r] = first ? sum_g : row_g[r] + sum_g;
  }
}

// ---- fused on the tensor cores (fp16/bf16, sm_80+): the backward's tiles --------------------------------
// clip_backward_tile / siglip_tile with the chunk's dots made by stripe_dots (as clip_forward_fused_kernel:
// 64-row stripes x 64-column tiles) instead of read from cuBLAS's fp32 scratch. A lane's elements are rows
// g, g + 8 of its warp's 16 and columns 8j + 2t, 8j + 2t + 1 of the tile; dX goes out as one 4-byte pair where
// aligned (store_pair). Per-row sums: fp32 over a tile's 16 elements of the lane, fp64 across tiles, then the
// row's 4 lanes in a fixed order (xor 1, then 2); the chunk's sum is added to the row's running one as the row
// kernels do.

// The row's 4 lanes (t = 0..3 of one g) in a fixed order; every lane gets the sum.
__device__ __forceinline__ double quad_sum_f64(double v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The sweep's sums of rows row0 and row0 + 8 (the t == 0 lane writes) added to the rows' running sums (set when
// first); null outputs are skipped.
__device__ __forceinline__ void add_row_sums(const double (&sums)[3][2], int64_t row0, int64_t n_rows, bool first,
                                             double* row_loss, double* row_gdot, double* row_g) {
  if (threadIdx.x % 4 != 0) return;
  double* out[3] = {row_loss, row_gdot, row_g};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = row0 + 8 * half;
    if (r >= n_rows) continue;
    for (int k = 0; k < 3; ++k) {
      if (out[k] != nullptr) out[k][r] = first ? sums[k][half] : out[k][r] + sums[k][half];
    }
  }
}

// The sweep both fused backward kernels share: for each element (r, c) of the block's stripe and the chunk,
// v = element(half, c, dot, loss) is dL/dx (and adds the pair's loss to loss where the op has one); dX = f * v
// goes out when dx is given. Then sums[k][half] (k: loss, sum v * dot, sum v) of row r0 + 16 warp + g + 8 half
// are the row's over the chunk, in every lane of the row.
template <typename T, typename Element>
__device__ __forceinline__ void fused_gradient_sweep(T* row_tile, T* col_tile, const T* rows, const T* cols,
                                                     int64_t n_rows, int64_t d, int64_t width, float f, T* dx,
                                                     Element&& element, double (&sums)[3][2]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kFusedRows;
  for (int k = 0; k < 3; ++k) sums[k][0] = sums[k][1] = 0.0;
  for (int64_t j0 = 0; j0 < width; j0 += kFusedCols) {
    float x[kFusedCols / 8][4];
    stripe_dots(x, row_tile, col_tile, rows, cols, n_rows, d, width, r0, j0);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t r = r0 + warp * 16 + g + 8 * half;
      float part[3] = {0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kFusedCols / 8; ++j) {
        const int64_t c = j0 + 8 * j + 2 * t;
        float o[2] = {0.f, 0.f};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (r >= n_rows || c + e >= width) continue;
          const float dot = x[j][2 * half + e];
          const float v = element(half, c + e, dot, part[0]);
          part[1] = fmaf(v, dot, part[1]);
          part[2] += v;
          o[e] = v * f;
        }
        if (dx != nullptr && r < n_rows && c < width) store_pair(dx + r * width, width, c, o[0], o[1]);
      }
      for (int k = 0; k < 3; ++k) sums[k][half] += part[k];
    }
  }
  for (int k = 0; k < 3; ++k) {
    sums[k][0] = quad_sum_f64(sums[k][0]);
    sums[k][1] = quad_sum_f64(sums[k][1]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
    clip_backward_fused_kernel(const T* __restrict__ rows, const T* __restrict__ cols, int64_t n_rows, int64_t d,
                               int64_t width, int64_t c0, const float* __restrict__ scale_p,
                               const float* __restrict__ bias_p, int64_t label_offset,
                               const float* __restrict__ row_lse,
                               const float* __restrict__ col_lse, const float* __restrict__ grad_row,
                               const float* __restrict__ grad_col, const float* __restrict__ grad_pos,
                               const float* __restrict__ factor_p, T* __restrict__ dx, double* __restrict__ row_gdot,
                               double* __restrict__ row_g, bool first) {
  __shared__ __align__(16) T row_tile[kFusedRows * kFusedPitch];
  __shared__ __align__(16) T col_tile[kFusedCols * kFusedPitch];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFusedRows + threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  const float* gc = grad_col != nullptr ? grad_col + c0 : nullptr;
  const float* cl = col_lse + c0;
  float gr[2], rs[2], gp[2];
  int64_t jp[2];  // the positive's column in the chunk (only with grad_pos, as the row kernel)
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = row0 + 8 * half;
    const bool ok = r < n_rows;
    gr[half] = grad_row != nullptr && ok ? grad_row[r] : 0.f;
    rs[half] = grad_row != nullptr && ok ? row_lse[r] - bias : 0.f;
    gp[half] = grad_pos != nullptr && ok ? grad_pos[r] : 0.f;
    jp[half] = grad_pos != nullptr ? r + label_offset - c0 : -1;
  }
  double sums[3][2];
  fused_gradient_sweep(
      row_tile, col_tile, rows, cols, n_rows, d, width, factor_p != nullptr ? *factor_p : 1.f, dx,
      [&](int half, int64_t c, float dot, float&) {
        const float xs = __fmul_rn(scale, dot);
        const float gcj = gc != nullptr ? gc[c] : 0.f, csj = gc != nullptr ? cl[c] - bias : 0.f;
        if (c == jp[half]) {  // one lane of one tile per row: expm1f stays off the common path
          return clip_positive_grad(xs, gr[half], rs[half], gcj, csj, gp[half]);
        }
        return clip_grad(xs, grad_row != nullptr, gr[half], rs[half], gc != nullptr, gcj, csj);
      },
      sums);
  add_row_sums(sums, row0, n_rows, first, nullptr, row_gdot, row_g);
}

// dx null: the loss only (row_gdot and row_g unused).
template <typename T>
__global__ void __launch_bounds__(kFusedThreads)
    siglip_fused_kernel(const T* __restrict__ rows, const T* __restrict__ cols, int64_t n_rows, int64_t d,
                        int64_t width, int64_t c0, const float* __restrict__ scale_p, const float* __restrict__ bias_p,
                        bool has_positives, const float* __restrict__ factor_p, T* __restrict__ dx,
                        double* __restrict__ row_loss, double* __restrict__ row_gdot, double* __restrict__ row_g,
                        bool first) {
  __shared__ __align__(16) T row_tile[kFusedRows * kFusedPitch];
  __shared__ __align__(16) T col_tile[kFusedCols * kFusedPitch];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFusedRows + threadIdx.x / 32 * 16 + threadIdx.x % 32 / 4;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  const int64_t jp[2] = {has_positives ? row0 - c0 : -1, has_positives ? row0 + 8 - c0 : -1};
  double sums[3][2];
  fused_gradient_sweep(
      row_tile, col_tile, rows, cols, n_rows, d, width, factor_p != nullptr ? *factor_p : 1.f, dx,
      [&](int half, int64_t c, float dot, float& loss) {
        const float xs = fmaf(dot, scale, bias);
        const float e = fast_exp(-fabsf(xs));  // fp16/bf16 features: MUFU.EX2, as siglip_tile_kernel
        const bool positive = c == jp[half];
        loss += siglip_pair_loss(xs, e, positive);
        return dx != nullptr ? siglip_pair_grad(xs, e, positive) : 0.f;
      },
      sums);
  add_row_sums(sums, row0, n_rows, first, row_loss, dx != nullptr ? row_gdot : nullptr,
               dx != nullptr ? row_g : nullptr);
}

// Grid-stride, one element per step (src fp32 and dst T advance at different byte rates; the pass
// moves (Bi + Bt) x D elements, small next to the chunk passes).
template <typename T>
__global__ void __launch_bounds__(256)
    scale_to_dtype_kernel(const float* src, int64_t n, const float* __restrict__ scale_p,
                          const float* __restrict__ factor_p, T* dst) {
  // 1 / f is a power of two: alpha is scale times it exactly.
  const float alpha = __fmul_rn(*scale_p, factor_p != nullptr ? factor_p[1] : 1.f);
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[k] = from_float<T>(src[k] * alpha);
  }
}

// Fixed-order fp64 sum of one array by the whole block; every thread gets it. scratch: 33 doubles.
__device__ __forceinline__ double block_sum_f64(const double* a, int64_t n, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += a[i];
  v = warp_sum_f64(v);
  __syncthreads();  // a previous call's readers of scratch[32] are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double w = lane < nwarps ? scratch[lane] : 0.0;
    w = warp_sum_f64(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

__global__ void __launch_bounds__(1024)
    sum_rows_kernel(const double* __restrict__ a0, const double* __restrict__ a1, const double* __restrict__ a2,
                    int64_t n, float* __restrict__ out0, float* __restrict__ out1, float* __restrict__ out2) {
  __shared__ double red[33];
  const double* in[3] = {a0, a1, a2};
  float* out[3] = {out0, out1, out2};
  for (int k = 0; k < 3; ++k) {
    if (in[k] == nullptr) continue;  // kernel arguments: uniform across the block
    const double s = block_sum_f64(in[k], n, red);
    if (threadIdx.x == 0) *out[k] = static_cast<float>(s);
  }
}

}  // namespace

// ================================ launchers ====================================================

cudaError_t clip_forward_rows(const float* dots, int64_t rows, int64_t width, int64_t c0, const float* scale,
                              const float* bias, int64_t label_offset, bool first, bool last, float* row_max,
                              float* row_sum, float* row_lse, float* pos_logits, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  MMFAST_LAUNCH(clip_row_merge_kernel, grid(row_blocks(rows)), kRowWarps * 32, 0, stream, dots, rows, width, c0, scale,
                bias, label_offset, first, last, row_max, row_sum, row_lse, pos_logits);
  return cudaGetLastError();
}

cudaError_t clip_forward_cols(const float* dots, int64_t rows, int64_t width, const float* scale, const float* bias,
                              float* partial, float* col_lse, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  const int64_t slices = clip_col_slices(rows);  // <= kMaxColSlices: within grid.y's 65535
  const int64_t slice_rows = (rows + slices - 1) / slices;
  float* part_max = partial;
  float* part_sum = partial + slices * width;
  const dim3 blocks(grid((width + 31) / 32), grid(slices));
  MMFAST_LAUNCH(clip_col_partial_kernel, blocks, dim3(32, kColLanes), 0, stream, dots, rows, width, slice_rows, scale,
                part_max, part_sum);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  MMFAST_LAUNCH(clip_col_finish_kernel, grid((width + 255) / 256), 256, 0, stream, part_max, part_sum, slices, width,
                bias, col_lse);
  return cudaGetLastError();
}

bool fused_tiles_supported(DType dtype) { return tensor_core_dtype(dtype); }

cudaError_t clip_forward_fused(DType dtype, const void* rows, const void* cols, int64_t n_rows, int64_t d,
                               int64_t width, int64_t c0, const float* scale, const float* bias, int64_t label_offset,
                               bool first, bool last, float* row_max, float* row_sum, float* row_lse,
                               float* pos_logits, float* partial, float* col_lse, cudaStream_t stream) {
  if (n_rows == 0 || width == 0) return cudaSuccess;
  const int64_t stripes = clip_fused_stripes(n_rows);
  float* part_max = partial;
  float* part_sum = partial + stripes * width;
  const cudaError_t e = dispatch_tensor_core_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(clip_forward_fused_kernel<T>, grid(stripes), kFusedThreads, 0, stream, static_cast<const T*>(rows),
                  static_cast<const T*>(cols) + c0 * d, n_rows, d, width, c0, scale, bias, label_offset, first, last,
                  row_max, row_sum, row_lse, pos_logits, part_max, part_sum);
  });
  if (e != cudaSuccess) return e;
  MMFAST_LAUNCH(clip_col_finish_kernel, grid((width + 255) / 256), 256, 0, stream, part_max, part_sum, stripes, width,
                bias, col_lse);
  return cudaGetLastError();
}

cudaError_t clip_backward_fused(DType dtype, const void* rows, const void* cols, int64_t n_rows, int64_t d,
                                int64_t width, int64_t c0, const float* scale, const float* bias, int64_t label_offset,
                                const float* row_lse, const float* col_lse, const float* grad_row,
                                const float* grad_col, const float* grad_pos, const float* factor, void* dx,
                                double* row_gdot, double* row_g, bool first, cudaStream_t stream) {
  if (n_rows == 0 || width == 0) return cudaSuccess;
  return dispatch_tensor_core_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(clip_backward_fused_kernel<T>, grid(clip_fused_stripes(n_rows)), kFusedThreads, 0, stream,
                  static_cast<const T*>(rows), static_cast<const T*>(cols) + c0 * d, n_rows, d, width, c0, scale, bias,
                  label_offset, row_lse, col_lse, grad_row, grad_col, grad_pos, factor, static_cast<T*>(dx), row_gdot,
                  row_g, first);
  });
}

cudaError_t siglip_fused(DType dtype, const void* rows, const void* cols, int64_t n_rows, int64_t d, int64_t width,
                         int64_t c0, const float* scale, const float* bias, bool has_positives, const float* factor,
                         void* dx, double* row_loss, double* row_gdot, double* row_g, bool first, cudaStream_t stream) {
  if (n_rows == 0 || width == 0) return cudaSuccess;
  return dispatch_tensor_core_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(siglip_fused_kernel<T>, grid(clip_fused_stripes(n_rows)), kFusedThreads, 0, stream,
                  static_cast<const T*>(rows), static_cast<const T*>(cols) + c0 * d, n_rows, d, width, c0, scale, bias,
                  has_positives, factor, static_cast<T*>(dx), row_loss, row_gdot, row_g, first);
  });
}

cudaError_t gradient_factor(const float* a, int64_t na, const float* b, int64_t nb, const float* c, int64_t nc,
                            float extra, float* factor, cudaStream_t stream) {
  MMFAST_LAUNCH(gradient_factor_kernel, 1, 1024, 0, stream, a, na, b, nb, c, nc, extra, factor);
  return cudaGetLastError();
}

cudaError_t clip_backward_tile(DType dtype, const float* dots, int64_t rows, int64_t width, int64_t c0,
                               const float* scale, const float* bias, int64_t label_offset, const float* row_lse,
                               const float* col_lse, const float* grad_row, const float* grad_col,
                               const float* grad_pos, const float* factor, void* dx, double* row_gdot,
                               double* row_g, bool first, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(clip_backward_tile_kernel<T>, grid(row_blocks(rows)), kRowWarps * 32, 0, stream, dots, rows, width,
                  c0, scale, bias, label_offset, row_lse, col_lse, grad_row, grad_col, grad_pos, factor,
                  static_cast<T*>(dx), row_gdot, row_g, first);
    return cudaGetLastError();
  });
}

cudaError_t siglip_tile(DType dtype, const float* dots, int64_t rows, int64_t width, int64_t c0, const float* scale,
                        const float* bias, bool has_positives, const float* factor, void* dx, double* row_loss,
                        double* row_gdot, double* row_g, bool first, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(siglip_tile_kernel<T>, grid(row_blocks(rows)), kRowWarps * 32, 0, stream, dots, rows, width, c0,
                  scale, bias, has_positives, factor, static_cast<T*>(dx), row_loss, row_gdot, row_g, first);
    return cudaGetLastError();
  });
}

cudaError_t scale_to_dtype(DType dtype, const float* src, int64_t n, const float* scale, const float* factor,
                           void* dst, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 16384);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(scale_to_dtype_kernel<T>, grid(blocks), 256, 0, stream, src, n, scale, factor, static_cast<T*>(dst));
    return cudaGetLastError();
  });
}

cudaError_t sum_rows(const double* a0, const double* a1, const double* a2, int64_t n, float* out0, float* out1,
                     float* out2, cudaStream_t stream) {
  MMFAST_LAUNCH(sum_rows_kernel, 1, 1024, 0, stream, a0, a1, a2, n, out0, out1, out2);
  return cudaGetLastError();
}

}  // namespace mmfast::cuda
