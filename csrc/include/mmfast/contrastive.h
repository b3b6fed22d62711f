// Geometry of a contrastive-loss block and the math of its positive pairs, shared by the CPU kernels
// and meant for the CUDA/Triton ones (positive_rows is host+device; the two scalar formulas below are
// host code that device code repeats with its own math functions).
//
// A block pairs rows [Bi, D] (e.g. this rank's image features) with cols [Bt, D] (a block of text
// features); its logits are x_ij = scale * rows_i . cols_j + bias. The positive pairs are
// (i, i + label_offset): a single process has one block with offset 0; open_clip's local loss puts
// rank r's rows against all gathered columns with offset B * r; a ring exchange (Inf-CL) sees each
// column block with the offset of that block's owner. A pair outside the block is simply absent.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMFAST_CONTRASTIVE_HD __host__ __device__ __forceinline__
#else
#define MMFAST_CONTRASTIVE_HD inline
#endif

namespace mmfast::contrastive {

// Rows [begin, end) of a rows x cols block whose positive column i + label_offset lies inside it
// (empty when begin == end).
struct PositiveRows {
  int64_t begin;
  int64_t end;
};

MMFAST_CONTRASTIVE_HD PositiveRows positive_rows(int64_t rows, int64_t cols, int64_t label_offset) {
  const int64_t begin = std::min(rows, std::max<int64_t>(0, -label_offset));
  const int64_t end = std::max(begin, std::min(rows, cols - label_offset));
  return {begin, end};
}

// ---- the positive pair's gradient terms, written to keep small differences ------------------------
// A confident positive has probabilities near 1 (CLIP) or a sigmoid near 1 (SigLIP); computing its
// gradient as p - 1 leaves only rounding noise of 1 where the true value is ~e^-x. The forms below are
// the same quantities without that cancellation; kernels use them for the one positive lane of a row.

// CLIP: dL/dx = gr * P_row + gc * P_col + gp, with P = exp(x - shift) (shift = lse - bias), rewritten as
// gr * expm1(x - row_shift) + gc * expm1(x - col_shift) + (gr + gc + gp); in the symmetric loss
// gp = -(gr + gc) exactly. An absent term is passed with coefficient 0.
template <typename T>
inline T clip_positive_grad(T x, T gr, T row_shift, T gc, T col_shift, T gp) {
  T g = gr + gc + gp;
  if (gr != T(0)) g += gr * std::expm1(x - row_shift);
  if (gc != T(0)) g += gc * std::expm1(x - col_shift);
  return g;
}

// SigLIP positive pair with logit x: loss softplus(-x) = max(-x, 0) + log1p(e) and dL/dx =
// sigmoid(x) - 1 = -sigmoid(-x), both from e = exp(-|x|) (a negative pair: softplus(x), sigmoid(x)).
template <typename T>
struct LossAndGrad {
  T loss;
  T grad;
};

template <typename T>
inline LossAndGrad<T> siglip_positive(T x) {
  const T e = std::exp(-std::abs(x));
  const T r = T(1) / (T(1) + e);
  return {std::max(-x, T(0)) + std::log1p(e), x >= T(0) ? -e * r : -r};
}

}  // namespace mmfast::contrastive
