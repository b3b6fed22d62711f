// CUDA implementations of the contrastive-loss block operators (schemas and block semantics in
// csrc/mmfast.cpp): argument checks, allocation, the cuBLAS GEMMs (at::mm_out with fp32 output) and
// calls into the kernels' launchers (csrc/cuda/contrastive_loss.cu, which explains the passes and the
// memory bound). Compiled by the host compiler: the torch headers stay out of nvcc's compile units.
//
// No host synchronization: logit_scale / logit_bias stay on the device and the kernels read them.
// fp32, fp16 and bf16 features (float64 runs on the CPU kernels, for gradcheck).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "mmfast/checks.h"
#include "mmfast/contrastive_loss_cuda.h"
#include "mmfast/cuda_glue.h"

namespace mmfast {
namespace {

namespace kc = mmfast::cuda;
using at::Tensor;

using cuda_glue::aligned;
using cuda_glue::current_stream;
using cuda_glue::kernel_dtype;
using cuda_glue::scalar_arg;

float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
double* dptr(const Tensor& t) { return t.defined() ? t.data_ptr<double>() : nullptr; }

// Column chunk width: W = min(Bt, 4096), halved while the fp32 scratch [Bi, W] exceeds 2^26 elements
// (256 MB); see contrastive_loss.cu.
int64_t chunk_width(int64_t rows, int64_t cols) {
  int64_t w = std::min(cols, kc::kLossMaxChunk);
  while (w > 1 && rows * w > (int64_t{1} << 26)) w /= 2;
  return w;
}

// ---- argument checks (messages as the CPU op's, csrc/cpu/contrastive_loss.cpp) ---------------------
void check_block(const Tensor& rows, const Tensor& cols) {
  check_feature_pair(rows, "rows", cols, "cols", /*allow_double=*/false);
  MMFAST_CHECK(rows.is_cuda(), "rows must be a CUDA tensor for the CUDA kernels, got ", rows.device());
  // Row kernels put 8 rows per block (grid.x < 2^31) and cuBLAS takes 32-bit sizes.
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  MMFAST_CHECK(rows.size(0) <= kMax && cols.size(0) <= kMax && rows.size(1) <= kMax,
               "rows / cols are too large for the CUDA kernels (", rows.sizes(), ", ", cols.sizes(), ")");
}

Tensor bias_arg(const std::optional<Tensor>& bias, const Tensor& rows) {
  return bias.has_value() ? scalar_arg(*bias, "logit_bias", rows) : Tensor();
}

void check_vector(const Tensor& x, const char* name, int64_t size, const Tensor& rows) {
  MMFAST_CHECK(x.dim() == 1 && x.size(0) == size, name, " must have shape [", size, "], got ", x.sizes());
  MMFAST_CHECK(x.scalar_type() == at::kFloat, name, " must be ", at::kFloat, ", got ", x.scalar_type());
  MMFAST_CHECK(x.device() == rows.device(), name, " is on ", x.device(), " but rows is on ", rows.device());
}

Tensor optional_grad(const std::optional<Tensor>& grad, const char* name, int64_t size, const Tensor& rows) {
  if (!grad.has_value()) return Tensor();
  check_vector(*grad, name, size, rows);
  return grad->contiguous();
}

// ---- the chunk loop shared by the three operators --------------------------------------------------
// Features as GEMM operands, the chunk width and the fp32 scratch of one chunk's dot products.
struct Block {
  Tensor rows, cols, scale, bias;
  int64_t bi, bt, d, width;
  Tensor dots_buf;

  Block(const Tensor& r, const Tensor& c, const Tensor& logit_scale, const std::optional<Tensor>& logit_bias)
      : rows(aligned(r)),
        cols(aligned(c)),
        scale(scalar_arg(logit_scale, "logit_scale", r)),
        bias(bias_arg(logit_bias, r)),
        bi(r.size(0)),
        bt(c.size(0)),
        d(r.size(1)),
        width(chunk_width(bi, bt)) {}

  Tensor cols_chunk(int64_t c0, int64_t w) const { return cols.narrow(0, c0, w); }

  // dots [Bi, w] = rows @ cols[c0, c0 + w)^T in fp32 (cuBLAS, fp32 accumulation for every dtype); the
  // scratch is made on first use (the fused CLIP forward needs none).
  Tensor dots(int64_t c0, int64_t w) {
    if (!dots_buf.defined()) dots_buf = at::empty({bi * width}, rows.options().dtype(at::kFloat));
    Tensor out = dots_buf.narrow(0, 0, bi * w).view({bi, w});
    at::mm_out(out, rows, cols_chunk(c0, w).t(), at::kFloat);
    return out;
  }

  const float* scale_ptr() const { return fptr(scale); }
  const float* bias_ptr() const { return fptr(bias); }
};

// fp16/bf16 on sm_80+, opted in: each chunk's dots come from the fused tensor-core kernels (on chip), not cuBLAS
// into the fp32 scratch.
bool fused_tiles(const Block& b) {
  return cuda_glue::tensor_cores_opted_in() && kc::fused_tiles_supported(kernel_dtype(b.rows));
}

// The two gradient GEMMs per chunk and the final scaling: grad_rows = scale / f * sum_chunks dX @
// cols_chunk, grad_cols[chunk] = scale / f * dX^T @ rows, in the input dtype. dX (the input dtype) holds
// f * dL/dx; f (gradient_factor) is 1 except for fp16.
struct GradGemms {
  const Block& b;
  bool fp32;
  Tensor factor;      // [2] fp32 on the device (fp16 only)
  Tensor dx_buf;      // [Bi * W] input dtype
  Tensor acc;         // [Bi, D] fp32: the grad_rows accumulator (the output itself for fp32)
  Tensor part;        // [Bi, D] fp32: one chunk's dX @ cols_chunk (fp16/bf16, more than one chunk)
  Tensor cols_tmp;    // [W, D] fp32: one chunk's dX^T @ rows (fp16/bf16)
  Tensor grad_cols;   // [Bt, D] input dtype

  explicit GradGemms(const Block& block) : b(block), fp32(block.rows.scalar_type() == at::kFloat) {
    const auto f32 = b.rows.options().dtype(at::kFloat);
    if (b.rows.scalar_type() == at::kHalf) factor = at::empty({2}, f32);
    dx_buf = at::empty({b.bi * b.width}, b.rows.options());
    acc = at::empty({b.bi, b.d}, f32);
    if (!fp32 && b.bt > b.width) part = at::empty({b.bi, b.d}, f32);
    if (!fp32) cols_tmp = at::empty({b.width * b.d}, f32);
    grad_cols = at::empty({b.bt, b.d}, b.rows.options());
  }

  Tensor dx(int64_t w) const { return dx_buf.narrow(0, 0, b.bi * w).view({b.bi, w}); }
  const float* factor_ptr() const { return fptr(factor); }

  void add_chunk(int64_t c0, int64_t w) {
    const Tensor g = dx(w);
    const Tensor cc = b.cols_chunk(c0, w);
    if (c0 == 0) {
      at::mm_out(acc, g, cc, at::kFloat);
    } else if (fp32) {
      acc.addmm_(g, cc);
    } else {
      at::mm_out(part, g, cc, at::kFloat);
      acc.add_(part);
    }
    const auto stream = current_stream();
    Tensor out = grad_cols.narrow(0, c0, w);
    if (fp32) {
      at::mm_out(out, g.t(), b.rows, at::kFloat);
      C10_CUDA_CHECK(kc::scale_to_dtype(kc::DType::kFloat32, out.data_ptr<float>(), w * b.d, b.scale_ptr(),
                                        factor_ptr(), out.data_ptr(), stream));
    } else {
      Tensor tmp = cols_tmp.narrow(0, 0, w * b.d).view({w, b.d});
      at::mm_out(tmp, g.t(), b.rows, at::kFloat);
      C10_CUDA_CHECK(kc::scale_to_dtype(kernel_dtype(out), tmp.data_ptr<float>(), w * b.d, b.scale_ptr(),
                                        factor_ptr(), out.data_ptr(), stream));
    }
  }

  // (grad_rows, grad_cols) in the input dtype.
  std::pair<Tensor, Tensor> finish() {
    Tensor grad_rows = fp32 ? acc : at::empty_like(b.rows);
    C10_CUDA_CHECK(kc::scale_to_dtype(kernel_dtype(grad_rows), acc.data_ptr<float>(), b.bi * b.d, b.scale_ptr(),
                                      factor_ptr(), grad_rows.data_ptr(), current_stream()));
    return {grad_rows, grad_cols};
  }
};

// ---- operators ----------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> clip_loss_block_cuda(const Tensor& rows, const Tensor& cols,
                                                        const Tensor& logit_scale,
                                                        const std::optional<Tensor>& logit_bias,
                                                        int64_t label_offset) {
  check_block(rows, cols);
  c10::cuda::CUDAGuard guard(rows.device());
  Block b(rows, cols, logit_scale, logit_bias);
  const auto f32 = rows.options().dtype(at::kFloat);
  const auto stream = current_stream();
  Tensor row_lse = at::empty({b.bi}, f32), col_lse = at::empty({b.bt}, f32);
  Tensor pos_logits = at::zeros({b.bi}, f32);  // 0 for rows whose positive is outside the block
  // Running row state; not needed when one chunk covers the block (the row pass writes row_lse directly).
  const bool chunked = b.bt > b.width;
  Tensor row_max = chunked ? at::empty({b.bi}, f32) : Tensor();
  Tensor row_sum = chunked ? at::empty({b.bi}, f32) : Tensor();
  // fp16/bf16 on sm_80+: the chunk's GEMM and both passes in one tensor-core kernel (no fp32 dots).
  const bool fused = fused_tiles(b);
  Tensor partial =
      at::empty({2 * (fused ? kc::clip_fused_stripes(b.bi) : kc::clip_col_slices(b.bi)) * b.width}, f32);
  for (int64_t c0 = 0; c0 < b.bt; c0 += b.width) {
    const int64_t w = std::min(b.width, b.bt - c0);
    if (fused) {
      C10_CUDA_CHECK(kc::clip_forward_fused(kernel_dtype(b.rows), b.rows.data_ptr(), b.cols.data_ptr(), b.bi, b.d, w,
                                            c0, b.scale_ptr(), b.bias_ptr(), label_offset, c0 == 0, c0 + w == b.bt,
                                            fptr(row_max), fptr(row_sum), fptr(row_lse), fptr(pos_logits),
                                            fptr(partial), fptr(col_lse) + c0, stream));
      continue;
    }
    const Tensor dots = b.dots(c0, w);
    C10_CUDA_CHECK(kc::clip_forward_rows(fptr(dots), b.bi, w, c0, b.scale_ptr(), b.bias_ptr(), label_offset, c0 == 0,
                                         c0 + w == b.bt, fptr(row_max), fptr(row_sum), fptr(row_lse),
                                         fptr(pos_logits), stream));
    C10_CUDA_CHECK(kc::clip_forward_cols(fptr(dots), b.bi, w, b.scale_ptr(), b.bias_ptr(), fptr(partial),
                                         fptr(col_lse) + c0, stream));
  }
  return {row_lse, col_lse, pos_logits};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> clip_loss_block_backward_cuda(
    const Tensor& rows, const Tensor& cols, const Tensor& logit_scale, const std::optional<Tensor>& logit_bias,
    int64_t label_offset, const Tensor& row_lse, const Tensor& col_lse, const std::optional<Tensor>& grad_row_lse,
    const std::optional<Tensor>& grad_col_lse, const std::optional<Tensor>& grad_pos_logits) {
  check_block(rows, cols);
  c10::cuda::CUDAGuard guard(rows.device());
  check_vector(row_lse, "row_lse", rows.size(0), rows);
  check_vector(col_lse, "col_lse", cols.size(0), rows);
  const Tensor gr = optional_grad(grad_row_lse, "grad_row_lse", rows.size(0), rows);
  const Tensor gc = optional_grad(grad_col_lse, "grad_col_lse", cols.size(0), rows);
  const Tensor gp = optional_grad(grad_pos_logits, "grad_pos_logits", rows.size(0), rows);
  Block b(rows, cols, logit_scale, logit_bias);
  const auto f32 = rows.options().dtype(at::kFloat);
  const auto stream = current_stream();
  const Tensor rl = row_lse.contiguous(), cl = col_lse.contiguous();
  GradGemms gemms(b);
  if (gemms.factor.defined()) {  // |dL/dx| <= |grad_row| + |grad_col| + |grad_pos| (probabilities <= 1)
    C10_CUDA_CHECK(kc::gradient_factor(fptr(gr), b.bi, fptr(gc), b.bt, fptr(gp), b.bi, 0.f, fptr(gemms.factor),
                                       stream));
  }
  const auto f64 = rows.options().dtype(at::kDouble);
  Tensor row_gdot = at::empty({b.bi}, f64), row_g = at::empty({b.bi}, f64);
  const bool fused = fused_tiles(b);
  for (int64_t c0 = 0; c0 < b.bt; c0 += b.width) {
    const int64_t w = std::min(b.width, b.bt - c0);
    if (fused) {
      C10_CUDA_CHECK(kc::clip_backward_fused(kernel_dtype(b.rows), b.rows.data_ptr(), b.cols.data_ptr(), b.bi, b.d, w,
                                             c0, b.scale_ptr(), b.bias_ptr(), label_offset, fptr(rl), fptr(cl),
                                             fptr(gr), fptr(gc), fptr(gp), gemms.factor_ptr(), gemms.dx(w).data_ptr(),
                                             dptr(row_gdot), dptr(row_g), c0 == 0, stream));
    } else {
      const Tensor dots = b.dots(c0, w);
      C10_CUDA_CHECK(kc::clip_backward_tile(kernel_dtype(b.rows), fptr(dots), b.bi, w, c0, b.scale_ptr(),
                                            b.bias_ptr(), label_offset, fptr(rl), fptr(cl), fptr(gr), fptr(gc),
                                            fptr(gp), gemms.factor_ptr(), gemms.dx(w).data_ptr(), dptr(row_gdot),
                                            dptr(row_g), c0 == 0, stream));
    }
    gemms.add_chunk(c0, w);
  }
  auto [grad_rows, grad_cols] = gemms.finish();
  // dL/d(scale) = sum dL/dx * dot, dL/d(bias) = sum dL/dx.
  Tensor grad_scale = at::empty({}, f32), grad_bias = at::empty({}, f32);
  C10_CUDA_CHECK(kc::sum_rows(dptr(row_gdot), dptr(row_g), nullptr, b.bi, fptr(grad_scale), fptr(grad_bias), nullptr,
                              stream));
  return {grad_rows, grad_cols, grad_scale, grad_bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip_loss_block_cuda(const Tensor& rows, const Tensor& cols,
                                                                          const Tensor& logit_scale,
                                                                          const std::optional<Tensor>& logit_bias,
                                                                          bool has_positives, bool compute_grad) {
  check_block(rows, cols);
  c10::cuda::CUDAGuard guard(rows.device());
  Block b(rows, cols, logit_scale, logit_bias);
  const auto f32 = rows.options().dtype(at::kFloat);
  const auto f64 = rows.options().dtype(at::kDouble);
  const auto stream = current_stream();
  std::optional<GradGemms> gemms;
  Tensor row_loss = at::empty({b.bi}, f64), row_gdot, row_g;
  if (compute_grad) {
    gemms.emplace(b);
    if (gemms->factor.defined()) {  // |sigmoid(x) - [positive]| <= 1
      C10_CUDA_CHECK(kc::gradient_factor(nullptr, 0, nullptr, 0, nullptr, 0, 1.f, fptr(gemms->factor), stream));
    }
    row_gdot = at::empty({b.bi}, f64);
    row_g = at::empty({b.bi}, f64);
  }
  const bool fused = fused_tiles(b);
  for (int64_t c0 = 0; c0 < b.bt; c0 += b.width) {
    const int64_t w = std::min(b.width, b.bt - c0);
    const float* factor = gemms ? gemms->factor_ptr() : nullptr;
    void* dx = gemms ? gemms->dx(w).data_ptr() : nullptr;
    if (fused) {
      C10_CUDA_CHECK(kc::siglip_fused(kernel_dtype(b.rows), b.rows.data_ptr(), b.cols.data_ptr(), b.bi, b.d, w, c0,
                                      b.scale_ptr(), b.bias_ptr(), has_positives, factor, dx, dptr(row_loss),
                                      dptr(row_gdot), dptr(row_g), c0 == 0, stream));
    } else {
      const Tensor dots = b.dots(c0, w);
      C10_CUDA_CHECK(kc::siglip_tile(kernel_dtype(b.rows), fptr(dots), b.bi, w, c0, b.scale_ptr(), b.bias_ptr(),
                                     has_positives, factor, dx, dptr(row_loss), dptr(row_gdot), dptr(row_g), c0 == 0,
                                     stream));
    }
    if (gemms) gemms->add_chunk(c0, w);
  }
  Tensor loss_sum = at::empty({}, f32);
  if (!compute_grad) {
    C10_CUDA_CHECK(kc::sum_rows(dptr(row_loss), nullptr, nullptr, b.bi, fptr(loss_sum), nullptr, nullptr, stream));
    // Four distinct empty tensors (as the CPU op): outputs must not alias one another.
    auto none = [&](at::ScalarType dtype) { return at::empty({0}, rows.options().dtype(dtype)); };
    return {loss_sum, none(rows.scalar_type()), none(rows.scalar_type()), none(at::kFloat), none(at::kFloat)};
  }
  auto [grad_rows, grad_cols] = gemms->finish();
  Tensor grad_scale = at::empty({}, f32), grad_bias = at::empty({}, f32);
  C10_CUDA_CHECK(kc::sum_rows(dptr(row_loss), dptr(row_gdot), dptr(row_g), b.bi, fptr(loss_sum), fptr(grad_scale),
                              fptr(grad_bias), stream));
  return {loss_sum, grad_rows, grad_cols, grad_scale, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("clip_loss_block", &clip_loss_block_cuda);
  m.impl("clip_loss_block_backward", &clip_loss_block_backward_cuda);
  m.impl("siglip_loss_block", &siglip_loss_block_cuda);
}

}  // namespace mmfast
