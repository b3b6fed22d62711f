// Argument checks and layout rules of the cross_attention operators, shared by the CPU kernels
// (csrc/cpu/cross_attention.cpp) and the CUDA glue (csrc/cuda/cross_attention_api.cpp). The Python
// layer (mmfast/ops/cross_attention.py) checks first; these guard direct torch.ops.mmfast.* calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <optional>

#include "mmfast/checks.h"

namespace mmfast::cross_attention {

// The head dims every kernel backend takes (mirrored by HEAD_DIMS in mmfast/ops/cross_attention.py).
constexpr int64_t kMinHeadDim = 16;
constexpr int64_t kMaxHeadDim = 128;

// k (and v) must be [B, H, L >= 1, d] matching q; the names say which arguments.
inline void check_keys(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* kname,
                       const char* vname) {
  MMFAST_CHECK(k.dim() == 4, kname, " must have 4 dimensions [B, H, Lk, d], got shape ", k.sizes());
  MMFAST_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) && k.size(2) >= 1,
               kname, " must have shape [B, H, Lk >= 1, d] = [", q.size(0), ", ", q.size(1), ", Lk, ", q.size(3),
               "] (from q), got ", k.sizes());
  MMFAST_CHECK(v.sizes() == k.sizes(), vname, " must have ", kname, "'s shape ", k.sizes(), ", got ", v.sizes());
  for (const at::Tensor* x : {&k, &v}) {
    MMFAST_CHECK(x->scalar_type() == q.scalar_type(), kname, "/", vname, " are ", x->scalar_type(), " but q is ",
                 q.scalar_type());
    MMFAST_CHECK(x->device() == q.device(), kname, "/", vname, " are on ", x->device(), " but q is on ", q.device());
  }
}

// q [B, H, Lq, d] in a kernel dtype (float64 only where allow_double: the CPU kernels take it for
// gradcheck), then the key/value segments.
inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2, bool allow_double) {
  MMFAST_CHECK_DIM(q, 4);
  const auto dt = q.scalar_type();
  MMFAST_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (allow_double && dt == at::kDouble),
               "q must be float32, float16, bfloat16", allow_double ? " (or float64)" : "", ", got ", dt);
  MMFAST_CHECK(q.size(0) >= 1 && q.size(1) >= 1 && q.size(2) >= 1, "q must not be empty, got shape ", q.sizes());
  MMFAST_CHECK(q.size(3) >= kMinHeadDim && q.size(3) <= kMaxHeadDim, "head dim d (q.size(3)) must be in [",
               kMinHeadDim, ", ", kMaxHeadDim, "], got ", q.size(3));
  check_keys(q, k, v, "k", "v");
  MMFAST_CHECK(k2.has_value() == v2.has_value(), "k2 and v2 must be given together (got ",
               k2.has_value() ? "k2 without v2" : "v2 without k2", ")");
  if (k2.has_value()) check_keys(q, *k2, *v2, "k2", "v2");
}

inline at::ScalarType stats_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The backward's extra arguments: grad_out and out like q, lse [B, H, Lq] in the stats dtype.
inline void check_backward_inputs(const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out,
                                  const at::Tensor& lse) {
  for (const at::Tensor* x : {&grad_out, &out}) {
    MMFAST_CHECK(x->sizes() == q.sizes() && x->scalar_type() == q.scalar_type() && x->device() == q.device(),
                 "grad_out and out must match q (shape ", q.sizes(), ", ", q.scalar_type(), "), got shape ",
                 x->sizes(), ", ", x->scalar_type());
  }
  MMFAST_CHECK(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == stats_dtype(q) &&
                   lse.device() == q.device(),
               "lse must be [B, H, Lq] = ", q.sizes().slice(0, 3), " in ", stats_dtype(q), ", got shape ", lse.sizes(),
               ", ", lse.scalar_type());
}

// The kernels need a unit stride on the head dim only.
inline at::Tensor head_dim_contiguous(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

// A gradient in its input's layout when that is dense with a contiguous head dim, else contiguous
// (mirrored by the fake impl in mmfast/ops/cross_attention.py).
inline at::Tensor grad_like(const at::Tensor& x) {
  at::Tensor g = at::empty_like(x);
  return g.stride(3) == 1 ? g : at::empty(x.sizes(), x.options());
}

// out is allocated [B, Lq, H, d] and returned as the [B, H, Lq, d] view, so merging the heads
// afterwards (out.transpose(1, 2).reshape(B, Lq, H * d)) is a view, as in ATen's flash attention.
inline at::Tensor empty_output(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

}  // namespace mmfast::cross_attention
