// CUDA implementations of the similarity_softmax operators (schemas in csrc/mmfast.cpp): argument
// checks, allocation, the cuBLAS GEMMs (at::mm) and calls into the kernels' launchers
// (csrc/cuda/similarity_softmax.cu). Compiled by the host compiler: the torch headers stay out of
// nvcc's compile units.
//
// No host synchronization: logit_scale / logit_bias stay on the device and the kernels read them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "mmfast/checks.h"
#include "mmfast/cuda_glue.h"
#include "mmfast/similarity_softmax_cuda.h"

namespace mmfast {
namespace {

namespace kc = mmfast::cuda;
using cuda_glue::aligned;
using cuda_glue::current_stream;
using cuda_glue::kernel_dtype;
using cuda_glue::scalar_arg;

kc::Act kernel_act(Activation a) {
  switch (a) {
    case Activation::kSoftmax:
      return kc::Act::kSoftmax;
    case Activation::kSigmoid:
      return kc::Act::kSigmoid;
    case Activation::kNone:
      break;
  }
  return kc::Act::kNone;
}

// Shared memory a softmax row may be cached in (similarity_softmax.cu, softmax_rows_kernel). 96 KB
// caches a 21843-class fp32 row (87 KB) and still fits two blocks per H100 SM (228 KB) and one on
// A100 (163 KB per block). MMFAST_ROW_CACHE_BYTES overrides it (0: re-read rows from L2) so the
// GPU benchmark can compare both without a rebuild.
int64_t row_cache_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("MMFAST_ROW_CACHE_BYTES");
    return env != nullptr ? std::atoll(env) : int64_t{96 * 1024};
  }();
  return bytes;
}

// Top-k class chunk: the [N, W] fp32 scratch stays under 2^26 elements (256 MB) while W is as wide
// as kMaxChunk allows (a 4096-wide GEMM keeps cuBLAS efficient; narrower chunks mean more launches).
int64_t chunk_width(int64_t rows, int64_t cols) {
  int64_t w = kc::kMaxChunk;
  while (w > 128 && rows * w > (int64_t{1} << 26)) w /= 2;
  return std::min(w, cols);
}

const float* ptr(const at::Tensor& t) { return t.data_ptr<float>(); }
const float* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// ---- argument checks (the Python layer checks first; these guard direct torch.ops calls) ------

void check_features(const at::Tensor& image, const at::Tensor& text) {
  check_feature_pair(image, "image", text, "text", /*allow_double=*/false);
  MMFAST_CHECK(image.is_cuda(), "image must be a CUDA tensor for the CUDA kernels, got ", image.device());
  // One block per row (grid.x < 2^31) and class indices in 32 bits (the top-k keys).
  MMFAST_CHECK(image.size(0) <= std::numeric_limits<int32_t>::max(), "image has too many rows (", image.size(0), ")");
  MMFAST_CHECK(text.size(0) <= std::numeric_limits<int32_t>::max(), "text has too many rows (", text.size(0), ")");
}

std::optional<at::Tensor> bias_arg(const std::optional<at::Tensor>& bias, const at::Tensor& like) {
  if (!bias.has_value()) return std::nullopt;
  return scalar_arg(*bias, "logit_bias", like);
}

void check_vector(const at::Tensor& v, const char* name, int64_t n, const at::Tensor& like) {
  MMFAST_CHECK(v.dim() == 1 && v.size(0) == n, name, " must have shape [", n, "], got ", v.sizes());
  MMFAST_CHECK(v.scalar_type() == at::kFloat, name, " must be float32, got ", v.scalar_type());
  MMFAST_CHECK(v.device() == like.device(), name, " is on ", v.device(), " but the features are on ", like.device());
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like) {
  MMFAST_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  MMFAST_CHECK(t.scalar_type() == like.scalar_type(), name, " is ", t.scalar_type(), " but the features are ",
               like.scalar_type());
  MMFAST_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the features are on ", like.device());
}

void check_topk_k(int64_t k, int64_t classes) {
  MMFAST_CHECK(k >= 1 && k <= classes, "topk must be in [1, C=", classes, "], got ", k);
  MMFAST_CHECK(k <= kc::kMaxTopK, "topk on CUDA supports k <= ", kc::kMaxTopK,
               " (a per-row sorted list in shared memory), got topk=", k,
               "; use backend='reference' or take the full similarity_softmax and torch.topk");
}

// ---- the pieces shared by the four operators ------------------------------------------------------

// The GEMM operands: x = normalize(image), y = normalize(text) rounded to the input dtype (or the
// inputs themselves), and the fp32 inverse norms. In the backward the saved norms are reused
// (given_inv), so x and y are the forward's operands bit for bit.
struct Operands {
  at::Tensor image, text, x, y, inv_image, inv_text;
};

Operands make_operands(const at::Tensor& image_in, const at::Tensor& text_in, bool normalize,
                       const at::Tensor* inv_image, const at::Tensor* inv_text) {
  Operands o;
  o.image = aligned(image_in);
  o.text = aligned(text_in);
  const int64_t n = o.image.size(0), c = o.text.size(0), d = o.image.size(1);
  const auto f32 = o.image.options().dtype(at::kFloat);
  if (!normalize) {
    o.x = o.image;
    o.y = o.text;
    o.inv_image = inv_image != nullptr ? *inv_image : at::ones({n}, f32);
    o.inv_text = inv_text != nullptr ? *inv_text : at::ones({c}, f32);
    return o;
  }
  const bool given = inv_image != nullptr;
  o.inv_image = given ? inv_image->contiguous() : at::empty({n}, f32);
  o.inv_text = given ? inv_text->contiguous() : at::empty({c}, f32);
  o.x = at::empty_like(o.image);
  o.y = at::empty_like(o.text);
  const auto dt = kernel_dtype(o.image);
  const auto stream = current_stream();
  C10_CUDA_CHECK(kc::normalize_rows(dt, o.image.data_ptr(), n, d, o.inv_image.data_ptr<float>(), !given,
                                    kNormalizeEps, o.x.data_ptr(), stream));
  C10_CUDA_CHECK(kc::normalize_rows(dt, o.text.data_ptr(), c, d, o.inv_text.data_ptr<float>(), !given,
                                    kNormalizeEps, o.y.data_ptr(), stream));
  return o;
}

// From G = ds @ y [N, D] and H = ds^T @ x [C, D] (fp32) to the four gradients; row_sum_ds [N] holds
// the per-row sums of ds (grad_logit_bias partials).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_backward(const Operands& o, const at::Tensor& g_img,
                                                                           const at::Tensor& h_txt,
                                                                           const at::Tensor& scale, bool normalize,
                                                                           const at::Tensor& row_sum_ds) {
  const int64_t n = o.image.size(0), c = o.text.size(0), d = o.image.size(1);
  const auto dt = kernel_dtype(o.image);
  const auto stream = current_stream();
  const auto f32 = o.image.options().dtype(at::kFloat);
  at::Tensor grad_image = at::empty_like(o.image);
  at::Tensor grad_text = at::empty_like(o.text);
  at::Tensor row_dot = at::empty({n}, f32);
  C10_CUDA_CHECK(kc::normalize_backward(dt, ptr(g_img), o.image.data_ptr(), ptr(o.inv_image), n, d, ptr(scale),
                                        normalize, kNormalizeEps, grad_image.data_ptr(), row_dot.data_ptr<float>(),
                                        stream));
  C10_CUDA_CHECK(kc::normalize_backward(dt, ptr(h_txt), o.text.data_ptr(), ptr(o.inv_text), c, d, ptr(scale),
                                        normalize, kNormalizeEps, grad_text.data_ptr(), nullptr, stream));
  at::Tensor grad_scale = at::empty({}, f32);
  at::Tensor grad_bias = at::empty({}, f32);
  // grad_scale = sum_i x_i . G_i (= d loss / d scale without dividing by scale); grad_bias = sum ds.
  C10_CUDA_CHECK(kc::sum_pair(row_dot.data_ptr<float>(), n, row_sum_ds.data_ptr<float>(), n,
                              grad_scale.data_ptr<float>(), grad_bias.data_ptr<float>(), stream));
  return {grad_image, grad_text, grad_scale, grad_bias};
}

// ---- operators ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> similarity_softmax_cuda(const at::Tensor& image,
                                                                       const at::Tensor& text,
                                                                       const at::Tensor& logit_scale,
                                                                       const std::optional<at::Tensor>& logit_bias,
                                                                       bool normalize, c10::string_view activation) {
  check_features(image, text);
  const Activation act = parse_activation(activation);
  c10::cuda::CUDAGuard guard(image.device());
  const at::Tensor scale = scalar_arg(logit_scale, "logit_scale", image);
  const std::optional<at::Tensor> bias = bias_arg(logit_bias, image);
  Operands o = make_operands(image, text, normalize, nullptr, nullptr);
  // cuBLAS (or, opted in, the tensor-core tile kernel) writes the dot products (fp32 accumulation) straight into
  // the output; the epilogue then turns them into probabilities in place: one read + one write of the N x C
  // matrix after the GEMM.
  const auto dt = kernel_dtype(o.x);
  at::Tensor out;
  if (cuda_glue::tensor_cores_opted_in() && kc::similarity_dots_fused_supported(dt, o.y.size(0))) {
    out = at::empty({o.x.size(0), o.y.size(0)}, o.x.options());
    C10_CUDA_CHECK(kc::similarity_dots_fused(dt, o.x.data_ptr(), o.y.data_ptr(), o.x.size(0), o.y.size(0),
                                             o.x.size(1), out.data_ptr(), current_stream()));
  } else {
    out = at::mm(o.x, o.y.t());
  }
  C10_CUDA_CHECK(kc::similarity_epilogue(kernel_dtype(out), out.data_ptr(), out.size(0), out.size(1), ptr(scale),
                                         ptr(bias), kernel_act(act), row_cache_bytes(), current_stream()));
  return {out, o.inv_image, o.inv_text};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_softmax_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& image, const at::Tensor& text,
    const at::Tensor& inv_norm_image, const at::Tensor& inv_norm_text, const at::Tensor& logit_scale, bool normalize,
    c10::string_view activation) {
  check_features(image, text);
  const Activation act = parse_activation(activation);
  const int64_t n = image.size(0), c = text.size(0);
  check_like(grad_out, "grad_out", {n, c}, image);
  check_like(out, "out", {n, c}, image);
  check_vector(inv_norm_image, "inv_norm_image", n, image);
  check_vector(inv_norm_text, "inv_norm_text", c, image);
  c10::cuda::CUDAGuard guard(image.device());
  const at::Tensor scale = scalar_arg(logit_scale, "logit_scale", image);
  Operands o = make_operands(image, text, normalize, &inv_norm_image, &inv_norm_text);
  const auto stream = current_stream();

  const at::Tensor g = aligned(grad_out);
  at::Tensor row_sum_ds = at::empty({n}, image.options().dtype(at::kFloat));
  // ds [N, C] with rows padded to 16 bytes (a view of [N, ld]): cuBLAS takes its fast tensor-core GEMMs only for
  // aligned leading dimensions, and an odd class count left the H200's two gradient GEMMs at 138 TFLOP/s (1.99 ms
  // at fp16 N=4096, C=21843, D=768: RESULTS.md's floor-gemm backward row, which multiplies unpadded operands).
  const int64_t per_16_bytes = 16 / static_cast<int64_t>(g.element_size());
  const int64_t ld = (c + per_16_bytes - 1) / per_16_bytes * per_16_bytes;
  at::Tensor ds = g;  // activation "none": ds is grad_out itself, copied into padded rows where C needs them
  if (act == Activation::kNone) {
    C10_CUDA_CHECK(kc::activation_backward(kernel_dtype(g), g.data_ptr(), nullptr, nullptr, 0, n, c, kc::Act::kNone,
                                           row_sum_ds.data_ptr<float>(), 0, stream));
    if (ld != c) ds = at::empty({n, ld}, g.options()).narrow(1, 0, c).copy_(g);
  } else {
    const at::Tensor p = aligned(out);
    ds = at::empty({n, ld}, g.options()).narrow(1, 0, c);
    C10_CUDA_CHECK(kc::activation_backward(kernel_dtype(g), g.data_ptr(), p.data_ptr(), ds.data_ptr(), ld, n, c,
                                           kernel_act(act), row_sum_ds.data_ptr<float>(), row_cache_bytes(), stream));
  }
  // fp32 outputs (mm.dtype): the normalization backward reads unrounded G and H.
  const at::Tensor g_img = at::mm(ds, o.y, at::kFloat);      // [N, D]
  const at::Tensor h_txt = at::mm(ds.t(), o.x, at::kFloat);  // [C, D]
  return finish_backward(o, g_img, h_txt, scale, normalize, row_sum_ds);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_topk_cuda(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale,
    const std::optional<at::Tensor>& logit_bias, bool normalize, c10::string_view activation, int64_t k) {
  check_features(image, text);
  const Activation act = parse_activation(activation);
  const int64_t n = image.size(0), c = text.size(0);
  check_topk_k(k, c);
  c10::cuda::CUDAGuard guard(image.device());
  const at::Tensor scale = scalar_arg(logit_scale, "logit_scale", image);
  const std::optional<at::Tensor> bias = bias_arg(logit_bias, image);
  Operands o = make_operands(image, text, normalize, nullptr, nullptr);
  const auto stream = current_stream();
  const auto f32 = image.options().dtype(at::kFloat);

  // Running state per row: the sorted top-k keys (uint64 in an int64 tensor) and (max, sum-exp).
  at::Tensor keys = at::empty({n, k}, image.options().dtype(at::kLong));
  at::Tensor row_max = at::empty({n}, f32), row_sum = at::empty({n}, f32);
  auto* keys_ptr = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  const auto dt = kernel_dtype(o.x);
  if (cuda_glue::tensor_cores_opted_in() && kc::similarity_topk_fused_supported(dt, static_cast<int>(k), c)) {
    // Logit tiles on the tensor cores, top-k and (max, sum-exp) on chip: scratch is the groups' lists and states,
    // O(groups * N * k), e.g. 9 x 4096 x 32 keys (9.4 MB) at N=4096, C=21843 on 132 SMs.
    const int groups = kc::topk_fused_groups(n, c, static_cast<int>(k));
    at::Tensor part_keys = at::empty({groups, n, k}, image.options().dtype(at::kLong));
    at::Tensor part_state = at::empty({2, groups, n}, f32);
    C10_CUDA_CHECK(kc::similarity_topk_fused(
        dt, o.x.data_ptr(), o.y.data_ptr(), n, c, o.x.size(1), ptr(scale), ptr(bias), static_cast<int>(k), groups,
        reinterpret_cast<uint64_t*>(part_keys.data_ptr<int64_t>()), part_state[0].data_ptr<float>(),
        part_state[1].data_ptr<float>(), keys_ptr, row_max.data_ptr<float>(), row_sum.data_ptr<float>(), stream));
  } else {
    const int64_t width = chunk_width(n, c);
    at::Tensor scratch = at::empty({n * width}, f32);  // O(N * chunk), never N x C
    for (int64_t c0 = 0; c0 < c; c0 += width) {
      const int64_t w = std::min(width, c - c0);
      at::Tensor dots = scratch.narrow(0, 0, n * w).view({n, w});
      at::mm_out(dots, o.x, o.y.narrow(0, c0, w).t(), at::kFloat);
      C10_CUDA_CHECK(kc::topk_merge_chunk(ptr(dots), n, w, c0, ptr(scale), ptr(bias), static_cast<int>(k), keys_ptr,
                                          row_max.data_ptr<float>(), row_sum.data_ptr<float>(), stream));
    }
  }
  at::Tensor values = at::empty({n, k}, image.options());
  at::Tensor indices = at::empty({n, k}, image.options().dtype(at::kLong));
  at::Tensor row_lse = at::empty({n}, f32);
  C10_CUDA_CHECK(kc::topk_finalize(kernel_dtype(values), reinterpret_cast<const uint64_t*>(keys.data_ptr<int64_t>()),
                                   ptr(row_max), ptr(row_sum), n, static_cast<int>(k), kernel_act(act),
                                   values.data_ptr(), indices.data_ptr<int64_t>(), row_lse.data_ptr<float>(),
                                   stream));
  return {values, indices, row_lse, o.inv_image, o.inv_text};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> similarity_topk_backward_cuda(
    const at::Tensor& grad_values, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& row_lse,
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& inv_norm_image,
    const at::Tensor& inv_norm_text, const at::Tensor& logit_scale, const std::optional<at::Tensor>& logit_bias,
    bool normalize, c10::string_view activation) {
  check_features(image, text);
  const Activation act = parse_activation(activation);
  const int64_t n = image.size(0), c = text.size(0);
  MMFAST_CHECK(values.dim() == 2 && values.size(0) == n, "values must have shape [N=", n, ", k], got ",
               values.sizes());
  const int64_t k = values.size(1);
  check_topk_k(k, c);
  check_like(values, "values", {n, k}, image);
  check_like(grad_values, "grad_values", {n, k}, image);
  MMFAST_CHECK(indices.sizes() == values.sizes() && indices.scalar_type() == at::kLong,
               "indices must be int64 of shape ", values.sizes(), ", got ", indices.scalar_type(), " ",
               indices.sizes());
  MMFAST_CHECK(indices.device() == image.device(), "indices is on ", indices.device(), " but the features are on ",
               image.device());
  check_vector(row_lse, "row_lse", n, image);
  check_vector(inv_norm_image, "inv_norm_image", n, image);
  check_vector(inv_norm_text, "inv_norm_text", c, image);
  c10::cuda::CUDAGuard guard(image.device());
  const at::Tensor scale = scalar_arg(logit_scale, "logit_scale", image);
  const std::optional<at::Tensor> bias = bias_arg(logit_bias, image);
  Operands o = make_operands(image, text, normalize, &inv_norm_image, &inv_norm_text);
  const auto stream = current_stream();
  const auto f32 = image.options().dtype(at::kFloat);
  const auto dt = kernel_dtype(o.image);
  const at::Tensor gv = grad_values.contiguous(), v = values.contiguous(), idx = indices.contiguous();
  const at::Tensor lse = row_lse.contiguous();

  // ds is recomputed chunk by chunk ([N, W] tiles), then enters the same two GEMMs as the dense
  // backward: G accumulates over chunks, each chunk writes its own rows of H. Opted in (fp16/bf16), the chunk's
  // logits come from tensor-core tiles inside the ds kernel (no fp32 [N, W] dots), and ds rows are padded to 16
  // bytes so cuBLAS sees an aligned leading dimension in an odd last chunk too.
  const int64_t width = std::min(chunk_width(n, c), kc::kMaxChunk);
  const bool fused = cuda_glue::tensor_cores_opted_in() && kc::topk_backward_fused_supported(dt);
  const int64_t per_16_bytes = 16 / static_cast<int64_t>(o.image.element_size());
  auto padded = [&](int64_t w) { return fused ? (w + per_16_bytes - 1) / per_16_bytes * per_16_bytes : w; };
  at::Tensor ds_buf = at::empty({n * padded(width)}, image.options());
  at::Tensor dots_buf = act == Activation::kSoftmax && !fused ? at::empty({n * width}, f32) : at::Tensor();
  at::Tensor tile_sums = fused ? at::empty({(width + 127) / 128 * n}, f32) : at::Tensor();
  at::Tensor g_img = at::empty({n, o.image.size(1)}, f32);
  at::Tensor g_part = c > width ? at::empty_like(g_img) : at::Tensor();
  at::Tensor h_txt = at::empty({c, o.image.size(1)}, f32);
  at::Tensor row_sum_ds = at::empty({n}, f32);
  for (int64_t c0 = 0; c0 < c; c0 += width) {
    const int64_t w = std::min(width, c - c0);
    const at::Tensor y_chunk = o.y.narrow(0, c0, w);
    const at::Tensor ds = ds_buf.narrow(0, 0, n * padded(w)).view({n, padded(w)}).narrow(1, 0, w);
    if (fused) {
      C10_CUDA_CHECK(kc::topk_backward_fused(dt, o.x.data_ptr(), y_chunk.data_ptr(), n, w, o.x.size(1), c0,
                                             ptr(scale), ptr(bias), ptr(lse), idx.data_ptr<int64_t>(), v.data_ptr(),
                                             gv.data_ptr(), static_cast<int>(k), kernel_act(act), ds.data_ptr(),
                                             padded(w), tile_sums.data_ptr<float>(), row_sum_ds.data_ptr<float>(),
                                             c0 == 0, stream));
    } else {
      const float* dots_ptr = nullptr;
      if (act == Activation::kSoftmax) {  // p over all classes needs the chunk's logits again
        at::Tensor dots = dots_buf.narrow(0, 0, n * w).view({n, w});
        at::mm_out(dots, o.x, y_chunk.t(), at::kFloat);
        dots_ptr = ptr(dots);
      }
      C10_CUDA_CHECK(kc::topk_backward_tile(dt, dots_ptr, n, w, c0, ptr(scale), ptr(bias), ptr(lse),
                                            idx.data_ptr<int64_t>(), v.data_ptr(), gv.data_ptr(), static_cast<int>(k),
                                            kernel_act(act), ds.data_ptr(), row_sum_ds.data_ptr<float>(), c0 == 0,
                                            stream));
    }
    if (c0 == 0) {
      at::mm_out(g_img, ds, y_chunk, at::kFloat);
    } else {
      at::mm_out(g_part, ds, y_chunk, at::kFloat);
      g_img.add_(g_part);
    }
    at::Tensor h_rows = h_txt.narrow(0, c0, w);
    at::mm_out(h_rows, ds.t(), o.x, at::kFloat);
  }
  return finish_backward(o, g_img, h_txt, scale, normalize, row_sum_ds);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("similarity_softmax", &similarity_softmax_cuda);
  m.impl("similarity_softmax_backward", &similarity_softmax_backward_cuda);
  m.impl("similarity_topk", &similarity_topk_cuda);
  m.impl("similarity_topk_backward", &similarity_topk_backward_cuda);
}

}  // namespace mmfast
