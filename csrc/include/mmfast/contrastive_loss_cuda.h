// Launchers of the contrastive-loss CUDA kernels (csrc/cuda/contrastive_loss.cu), called by the operator
// glue (csrc/cuda/contrastive_loss_api.cpp). Plain C++: no torch and no CUDA device headers.
//
// Contract for every launcher (as in similarity_softmax_cuda.h): device pointers on the current device;
// `dots` is the fp32 GEMM output rows @ cols[c0, c0 + width)^T of one column chunk, [rows, width]
// contiguous with a 16-byte aligned base; T-typed arrays (void*, dtype `dtype`) are contiguous;
// scale / bias / factor point to fp32 values on the device (bias and factor may be null: 0 and 1) and
// are read by the kernels, so no launch synchronizes the host. Chunks come in column order, the first
// with first = true. Each launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mmfast/cuda_types.h"

namespace mmfast::cuda {

// Column chunks are at most kLossMaxChunk wide (see contrastive_loss.cu for the memory bound).
inline constexpr int64_t kLossMaxChunk = 4096;

// The column log-sum-exp pass cuts the rows into slices of kColSliceRows rows (at most kMaxColSlices
// slices); each slice leaves one partial (max, sum-exp) per column. The glue sizes that scratch with it.
inline constexpr int64_t kColSliceRows = 256;
inline constexpr int64_t kMaxColSlices = 1024;
inline int64_t clip_col_slices(int64_t rows) {
  const int64_t s = (rows + kColSliceRows - 1) / kColSliceRows;
  return s < 1 ? 1 : (s > kMaxColSlices ? kMaxColSlices : s);
}

// ---- CLIP forward, per chunk ----------------------------------------------------------------------
// Row pass: merges x = scale * dots into each row's online (row_max, row_sum) (set when first); when
// last writes row_lse = lse(x) + bias instead. pos_logits[i] = scale * dots[i, i + label_offset - c0]
// + bias for the rows whose positive column lies in this chunk (other entries are left untouched).
cudaError_t clip_forward_rows(const float* dots, int64_t rows, int64_t width, int64_t c0, const float* scale,
                              const float* bias, int64_t label_offset, bool first, bool last, float* row_max,
                              float* row_sum, float* row_lse, float* pos_logits, cudaStream_t stream);

// Column pass: col_lse[j] = lse over all rows of scale * dots[:, j], + bias, for j < width (col_lse
// points at the chunk's first column). partial: scratch of 2 * clip_col_slices(rows) * width floats.
cudaError_t clip_forward_cols(const float* dots, int64_t rows, int64_t width, const float* scale, const float* bias,
                              float* partial, float* col_lse, cudaStream_t stream);

// ---- CLIP forward fused on the tensor cores (fp16/bf16, sm_80+) ----------------------------------------
// Both passes above and the chunk's GEMM in one kernel (+ the column merge): rows [n_rows, d] and cols
// [Bt, d] contiguous dtype features; the chunk is cols[c0, c0 + width). Same outputs and running state as
// clip_forward_rows + clip_forward_cols, with partial: scratch of 2 * clip_fused_stripes(n_rows) * width
// floats; no fp32 dots. fused_tiles_supported: whether the fused kernels (this one, clip_backward_fused and
// siglip_fused) run on this dtype and device.
inline constexpr int64_t kFusedStripeRows = 64;
inline int64_t clip_fused_stripes(int64_t rows) { return (rows + kFusedStripeRows - 1) / kFusedStripeRows; }
bool fused_tiles_supported(DType dtype);
cudaError_t clip_forward_fused(DType dtype, const void* rows, const void* cols, int64_t n_rows, int64_t d,
                               int64_t width, int64_t c0, const float* scale, const float* bias, int64_t label_offset,
                               bool first, bool last, float* row_max, float* row_sum, float* row_lse,
                               float* pos_logits, float* partial, float* col_lse, cudaStream_t stream);

// ---- gradients ----------------------------------------------------------------------------------
// factor[0] = f, factor[1] = 1 / f: the power of two by which the gradient tiles dX are multiplied
// before they are rounded to fp16 (5 exponent bits: CLIP's coefficients, ~1/B, are subnormal there at
// B >= 16384). f puts the bound max|a| + max|b| + max|c| + extra on |dX| just under 2^12; f = 1 when
// the bound is 0 or not finite. Null arrays (or n = 0) count as 0. One block.
cudaError_t gradient_factor(const float* a, int64_t na, const float* b, int64_t nb, const float* c, int64_t nc,
                            float extra, float* factor, cudaStream_t stream);

// CLIP backward, one chunk: dx [rows, width] (dtype) = factor * dL/dx with (x = scale * dots,
// shifts = lse - bias) dL/dx = grad_row[i] * exp(x - row_shift[i]) + grad_col[c0+j] * exp(x -
// col_shift[c0+j]) + grad_pos[i] * [c0 + j == i + label_offset]; null grads drop their term (and
// row_lse / col_lse are then not read). row_gdot[i] / row_g[i] (fp64, set when first) += the chunk's
// sum_j dL/dx * dots and sum_j dL/dx (partials of the scale and bias gradients).
cudaError_t clip_backward_tile(DType dtype, const float* dots, int64_t rows, int64_t width, int64_t c0,
                               const float* scale, const float* bias, int64_t label_offset, const float* row_lse,
                               const float* col_lse, const float* grad_row, const float* grad_col,
                               const float* grad_pos, const float* factor, void* dx, double* row_gdot,
                               double* row_g, bool first, cudaStream_t stream);

// clip_backward_tile and siglip_tile fused on the tensor cores (fp16/bf16, fused_tiles_supported): the chunk's
// dots from rows [n_rows, d] and cols [Bt, d] (contiguous; the chunk is cols[c0, c0 + width)) instead of an fp32
// scratch; the same outputs.
cudaError_t clip_backward_fused(DType dtype, const void* rows, const void* cols, int64_t n_rows, int64_t d,
                                int64_t width, int64_t c0, const float* scale, const float* bias, int64_t label_offset,
                                const float* row_lse, const float* col_lse, const float* grad_row,
                                const float* grad_col, const float* grad_pos, const float* factor, void* dx,
                                double* row_gdot, double* row_g, bool first, cudaStream_t stream);
cudaError_t siglip_fused(DType dtype, const void* rows, const void* cols, int64_t n_rows, int64_t d, int64_t width,
                         int64_t c0, const float* scale, const float* bias, bool has_positives, const float* factor,
                         void* dx, double* row_loss, double* row_gdot, double* row_g, bool first, cudaStream_t stream);

// SigLIP, one chunk: x = scale * dots + bias, y = +1 on (i, i) when has_positives else -1;
// row_loss[i] (fp64, set when first) += sum_j softplus(-y x). With dx non-null also dx = factor *
// (sigmoid(x) - [y = +1]) and the row_gdot / row_g partials as for CLIP (ignored when dx is null).
cudaError_t siglip_tile(DType dtype, const float* dots, int64_t rows, int64_t width, int64_t c0, const float* scale,
                        const float* bias, bool has_positives, const float* factor, void* dx, double* row_loss,
                        double* row_gdot, double* row_g, bool first, cudaStream_t stream);

// dst[k] = src[k] * scale / factor rounded to dtype, k < n (src is fp32; dst may be src when dtype is
// fp32). Turns the fp32 GEMM accumulators of dX @ features into the feature gradients.
cudaError_t scale_to_dtype(DType dtype, const float* src, int64_t n, const float* scale, const float* factor,
                           void* dst, cudaStream_t stream);

// out_k = sum of the n fp64 values of a_k, in one block and a fixed order (deterministic, no atomics),
// rounded to fp32; a null a_k is skipped.
cudaError_t sum_rows(const double* a0, const double* a1, const double* a2, int64_t n, float* out0, float* out1,
                     float* out2, cudaStream_t stream);

}  // namespace mmfast::cuda
