// Launchers of the similarity_softmax CUDA kernels (csrc/cuda/similarity_softmax.cu), called by the
// operator glue (csrc/cuda/similarity_softmax_api.cpp). Plain C++: no torch and no CUDA device
// headers, so the .cu compiles without torch and the .cpp without nvcc.
//
// Contract for every launcher: pointers are device pointers on the current device; every T-typed
// array (void* below, dtype `dtype`) is contiguous with a 16-byte aligned base (the glue copies the
// rare misaligned view); scale/bias point to one fp32 value on the device (bias may be null) and are
// read by the kernels, so no launch synchronizes the host. Each returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mmfast/cuda_types.h"

namespace mmfast::cuda {

enum class Act { kSoftmax, kSigmoid, kNone };

// Top-k limits: k <= kMaxTopK; class chunks of at most kMaxChunk columns (the top-k backward keeps
// a per-chunk slot table of kMaxChunk shorts in shared memory).
inline constexpr int kMaxTopK = 128;
inline constexpr int64_t kMaxChunk = 4096;

// inv[r] = 1 / max(||src_r||, eps) when compute_inv, else inv is read; dst_r = src_r * inv[r]
// rounded to dtype (dst may be null when only inv is wanted). src, dst: [rows, dim].
cudaError_t normalize_rows(DType dtype, const void* src, int64_t rows, int64_t dim, float* inv, bool compute_inv,
                           float eps, void* dst, cudaStream_t stream);

// out [rows, cols] = x [rows, dim] . y [cols, dim]^T in dtype (fp32 accumulation) on the tensor cores, in place
// of the cuBLAS GEMM; fp16/bf16 where similarity_dots_fused_supported (sm_80+, cols within the grid).
bool similarity_dots_fused_supported(DType dtype, int64_t cols);
cudaError_t similarity_dots_fused(DType dtype, const void* x, const void* y, int64_t rows, int64_t cols, int64_t dim,
                                  void* out, cudaStream_t stream);

// In place on out [rows, cols], which holds dot products d: softmax rows (act = kSoftmax), or
// sigmoid / identity of scale * d + bias elementwise. max_cache_bytes bounds the shared memory a
// softmax row may be cached in (0: never cache, re-read the row from L2).
cudaError_t similarity_epilogue(DType dtype, void* out, int64_t rows, int64_t cols, const float* scale,
                                const float* bias, Act act, int64_t max_cache_bytes, cudaStream_t stream);

// ds = dL/d(logits) from grad_out and out [rows, cols] (softmax: p * (g - sum(g * p)); sigmoid:
// g * p * (1 - p)); act = kNone writes no ds (ds is grad_out itself), ds may then be null.
// row_sum_ds[r] = sum_c ds[r, c] in fp32 (the per-row partials of grad_logit_bias).
// ds's rows are ds_stride >= cols elements apart (the glue pads them to 16 bytes for cuBLAS).
cudaError_t activation_backward(DType dtype, const void* grad_out, const void* out, void* ds, int64_t ds_stride,
                                int64_t rows, int64_t cols, Act act, float* row_sum_ds, int64_t max_cache_bytes,
                                cudaStream_t stream);

// The gradient through scale * normalize(src): g = grad_unit [rows, dim] (fp32, = d(loss)/d(scale *
// normalized row) / scale, i.e. ds @ y or ds^T @ x). With normalize: x = src * inv,
// grad_src = scale * inv * (g - [||src|| >= eps] * x * (x . g)); without: grad_src = scale * g.
// row_dot[r] = x . g (or src . g) in fp32 when row_dot is not null (per-row partials of grad_scale).
cudaError_t normalize_backward(DType dtype, const float* grad_unit, const void* src, const float* inv, int64_t rows,
                               int64_t dim, const float* scale, bool normalize, float eps, void* grad_src,
                               float* row_dot, cudaStream_t stream);

// out_a = sum(a[0..na)), out_b = sum(b[0..nb)) in one block, fixed order (deterministic, no atomics).
cudaError_t sum_pair(const float* a, int64_t na, const float* b, int64_t nb, float* out_a, float* out_b,
                     cudaStream_t stream);

// Top-k forward, one chunk of classes [c0, c0 + width): dots [rows, width] fp32 (x @ y_chunk^T).
// Updates each row's running top-k keys [rows, k] (sorted, see the .cu) and online-softmax state
// row_max/row_sum [rows]. Chunks must come in order, starting at c0 = 0 (which initialises them).
cudaError_t topk_merge_chunk(const float* dots, int64_t rows, int64_t width, int64_t c0, const float* scale,
                             const float* bias, int k, uint64_t* keys, float* row_max, float* row_sum,
                             cudaStream_t stream);

// Top-k forward on the tensor cores in place of the chunks above (fp16/bf16, sm_80+, k <= 32: see
// similarity_topk_fused_supported): x [rows, dim] . y [cols, dim]^T tile by tile, never written to global memory.
// Column tiles of 128 are split into `groups` consecutive ranges (1 <= groups <= 2048 / k), each (128-row tile,
// group) block keeps its rows' top-k and (max, sum-exp) on chip and writes them to part_keys [groups, rows, k],
// part_max / part_sum [groups, rows]; a second kernel merges the groups in a fixed order into keys [rows, k],
// row_max and row_sum [rows], as topk_merge_chunk leaves them for topk_finalize.
bool similarity_topk_fused_supported(DType dtype, int k, int64_t cols);
// How many groups fill a device of sm_count SMs (2 blocks each) without leaving a group empty; the second form
// asks the current device.
int topk_fused_groups(int64_t rows, int64_t cols, int k, int sm_count);
int topk_fused_groups(int64_t rows, int64_t cols, int k);
cudaError_t similarity_topk_fused(DType dtype, const void* x, const void* y, int64_t rows, int64_t cols, int64_t dim,
                                  const float* scale, const float* bias, int k, int groups, uint64_t* part_keys,
                                  float* part_max, float* part_sum, uint64_t* keys, float* row_max, float* row_sum,
                                  cudaStream_t stream);

// values [rows, k] (act applied; softmax exp(l - max) / sum), indices [rows, k] int64 and
// row_lse [rows] = max + log(sum) from the final keys and state.
cudaError_t topk_finalize(DType dtype, const uint64_t* keys, const float* row_max, const float* row_sum, int64_t rows,
                          int k, Act act, void* values, int64_t* indices, float* row_lse, cudaStream_t stream);

// Top-k backward, one chunk [c0, c0 + width): writes ds_tile [rows, width] (dtype) =
// dL/d(logits) of the chunk. softmax: -p_j * r plus values_t * (g_t - r) at top-k slots (r =
// sum_t g_t * values_t, p_j = exp(scale * dots_j + bias - row_lse)); sigmoid / none: g_t * v_t *
// (1 - v_t) (sigmoid) or g_t (none) at top-k slots, 0 elsewhere (dots unused, may be null).
// row_sum_ds [rows] += the chunk's row sums of ds (set when first).
cudaError_t topk_backward_tile(DType dtype, const float* dots, int64_t rows, int64_t width, int64_t c0,
                               const float* scale, const float* bias, const float* row_lse, const int64_t* indices,
                               const void* values, const void* grad_values, int k, Act act, void* ds_tile,
                               float* row_sum_ds, bool first, cudaStream_t stream);

// topk_backward_tile's ds of one chunk on the tensor cores (fp16/bf16, sm_80+: topk_backward_fused_supported), the
// chunk's logits recomputed from x [rows, dim] and y_chunk [width, dim] in registers (no fp32 dots): writes
// ds [rows, width] with rows ds_stride >= width elements apart (the glue pads them to 16 bytes for cuBLAS), and
// row_sum_ds (+)= its row sums through tile_row_sums [ceil(width / 128), rows] (scratch).
bool topk_backward_fused_supported(DType dtype);
cudaError_t topk_backward_fused(DType dtype, const void* x, const void* y_chunk, int64_t rows, int64_t width,
                                int64_t dim, int64_t c0, const float* scale, const float* bias, const float* row_lse,
                                const int64_t* indices, const void* values, const void* grad_values, int k, Act act,
                                void* ds, int64_t ds_stride, float* tile_row_sums, float* row_sum_ds, bool first,
                                cudaStream_t stream);

}  // namespace mmfast::cuda
