// CUDA implementations of the fused SAM cross-attention blocks (schemas in csrc/mmfast.cpp): argument checks,
// allocation and one call into the kernels' launchers (csrc/cuda/sam_attention.cu). Compiled by the host
// compiler. An operand with batch 1 against a batch of B is read with batch stride 0 (one image shared by
// SAM's prompts: no copy). No host synchronization.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <limits>
#include <utility>

#include "mmfast/checks.h"
#include "mmfast/cross_attention_cuda.h"
#include "mmfast/cuda_glue.h"
#include "mmfast/sam_attention_cuda.h"

namespace mmfast {
namespace {

namespace kc = mmfast::cuda;
using cuda_glue::current_stream;
using cuda_glue::kernel_dtype;
using Named = std::pair<const char*, const at::Tensor*>;

// One floating dtype and one CUDA device for all operands; each has the rank given.
void check_operands(std::initializer_list<std::pair<Named, int64_t>> operands) {
  const auto& [first_name, first] = operands.begin()->first;
  MMFAST_CHECK(first->is_cuda(), first_name, " must be a CUDA tensor for the CUDA kernels, got ", first->device());
  kernel_dtype(*first);  // float32, float16 or bfloat16
  for (const auto& [named, dim] : operands) {
    const auto& [name, t] = named;
    MMFAST_CHECK(t->dim() == dim, name, " must have ", dim, " dimensions, got shape ", t->sizes());
    MMFAST_CHECK(t->scalar_type() == first->scalar_type(), name, " is ", t->scalar_type(), " but ", first_name, " is ",
                 first->scalar_type());
    MMFAST_CHECK(t->device() == first->device(), name, " is on ", t->device(), " but ", first_name, " is on ",
                 first->device());
  }
}

void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> want) {
  MMFAST_CHECK(t.sizes() == at::IntArrayRef(want), name, " has shape ", t.sizes(), ", expected ",
               at::IntArrayRef(want));
}

// Batch `batch`, or 1 shared by every batch entry: the batch stride the kernels read it with.
int64_t batch_stride(const at::Tensor& t, const char* name, int64_t batch) {
  MMFAST_CHECK(t.size(0) == batch || t.size(0) == 1, name, " has batch ", t.size(0), "; expected ", batch,
               " or 1 (shared)");
  return t.size(0) == 1 ? 0 : t.stride(0);
}

// The kernels index with int below 2^31 elements per operand and launch one grid row per batch entry.
void check_sizes(std::initializer_list<Named> operands, int64_t batch, int64_t smem_bytes) {
  for (const auto& [name, t] : operands) {
    MMFAST_CHECK(t->numel() / std::max<int64_t>(t->size(0), 1) < std::numeric_limits<int32_t>::max(), name,
                 " has too many elements per batch entry for the fused kernels: ", t->sizes());
  }
  MMFAST_CHECK(batch <= 65535, "the fused SAM kernels take at most 65535 batch entries, got ", batch);
  MMFAST_CHECK(smem_bytes <= kc::device_smem_limit(), "the fused SAM block needs ", smem_bytes,
               " bytes of shared memory but this GPU grants ", kc::device_smem_limit(),
               "; call mmfast.ops.sam_attention, which falls back to the unfused arrangement");
}

at::Tensor sam_image_to_token_cuda(const at::Tensor& x_in, const at::Tensor& key_folded_in,
                                   const at::Tensor& key_bias_in, const at::Tensor& value_folded_in,
                                   const at::Tensor& out_bias_in, const at::Tensor& residual_in,
                                   const at::Tensor& norm_weight_in, const at::Tensor& norm_bias_in, double scale,
                                   double eps, int64_t keys_per_head) {
  check_operands({{{"x", &x_in}, 3}, {{"key_folded", &key_folded_in}, 3}, {{"key_bias", &key_bias_in}, 2},
                  {{"value_folded", &value_folded_in}, 3}, {{"out_bias", &out_bias_in}, 1},
                  {{"residual", &residual_in}, 3},
                  {{"norm_weight", &norm_weight_in}, 1}, {{"norm_bias", &norm_bias_in}, 1}});
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t batch = key_folded_in.size(0), groups = key_folded_in.size(1), channels = x_in.size(2);
  const int64_t rows = x_in.size(1), out_channels = value_folded_in.size(2);
  MMFAST_CHECK(keys_per_head >= 1 && keys_per_head <= kc::kImageToTokenMaxKeys && groups % keys_per_head == 0,
               "keys_per_head must be in [1, ", kc::kImageToTokenMaxKeys, "] and divide key_folded's ", groups,
               " rows, got ", keys_per_head);
  check_shape(key_folded_in, "key_folded", {batch, groups, channels});
  check_shape(key_bias_in, "key_bias", {batch, groups});
  check_shape(value_folded_in, "value_folded", {batch, groups, out_channels});
  check_shape(out_bias_in, "out_bias", {out_channels});
  MMFAST_CHECK(residual_in.size(1) == rows && residual_in.size(2) == out_channels, "residual has shape ",
               residual_in.sizes(), ", expected [", batch, " or 1, ", rows, ", ", out_channels, "]");
  check_shape(norm_weight_in, "norm_weight", {out_channels});
  check_shape(norm_bias_in, "norm_bias", {out_channels});
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous();
  const at::Tensor key_folded = key_folded_in.contiguous(), key_bias = key_bias_in.contiguous();
  const at::Tensor value_folded = value_folded_in.contiguous(), out_bias = out_bias_in.contiguous();
  const at::Tensor norm_weight = norm_weight_in.contiguous(), norm_bias = norm_bias_in.contiguous();
  const kc::ImageToTokenShape shape{batch, rows, channels, out_channels, groups / keys_per_head, keys_per_head};
  const int64_t x_stride = batch_stride(x, "x", batch), residual_stride = batch_stride(residual, "residual", batch);
  check_sizes({{"x", &x}, {"key_folded", &key_folded}, {"value_folded", &value_folded}, {"residual", &residual}},
              batch, kc::image_to_token_smem_bytes(shape));
  at::Tensor out = at::empty({batch, rows, out_channels}, x.options());
  C10_CUDA_CHECK(kc::sam_image_to_token(kernel_dtype(x), shape, x.data_ptr(), x_stride, key_folded.data_ptr(),
                                        key_bias.data_ptr(), value_folded.data_ptr(), out_bias.data_ptr(),
                                        residual.data_ptr(), residual_stride, norm_weight.data_ptr(),
                                        norm_bias.data_ptr(), static_cast<float>(scale), static_cast<float>(eps),
                                        out.data_ptr(), current_stream()));
  return out;
}

at::Tensor sam_token_to_image_cuda(const at::Tensor& query_folded_in, const at::Tensor& query_bias_in,
                                   const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& v_weight_in,
                                   const at::Tensor& v_bias_in, const at::Tensor& out_weight_in,
                                   const at::Tensor& out_bias_in, const at::Tensor& residual_in,
                                   const at::Tensor& norm_weight_in, const at::Tensor& norm_bias_in, double scale,
                                   double eps, int64_t heads) {
  check_operands({{{"query_folded", &query_folded_in}, 3}, {{"query_bias", &query_bias_in}, 2}, {{"k", &k_in}, 3},
                  {{"v", &v_in}, 3}, {{"v_weight", &v_weight_in}, 2}, {{"v_bias", &v_bias_in}, 1},
                  {{"out_weight", &out_weight_in}, 2}, {{"out_bias", &out_bias_in}, 1},
                  {{"residual", &residual_in}, 3}, {{"norm_weight", &norm_weight_in}, 1},
                  {{"norm_bias", &norm_bias_in}, 1}});
  const c10::cuda::CUDAGuard guard(query_folded_in.device());
  const int64_t batch = query_folded_in.size(0), groups = query_folded_in.size(1), channels = k_in.size(2);
  const int64_t inner = v_weight_in.size(0), out_channels = out_weight_in.size(0), keys = k_in.size(1);
  MMFAST_CHECK(heads >= 1 && groups % heads == 0 && inner % heads == 0, "heads (", heads,
               ") must divide query_folded's ", groups, " rows and v_weight's ", inner, " rows");
  const int64_t queries = groups / heads;
  MMFAST_CHECK(groups <= kc::kTokenToImageMaxRows, "the fused token -> image block takes at most ",
               kc::kTokenToImageMaxRows, " heads x queries rows, got ", groups);
  MMFAST_CHECK(keys >= 1, "k must hold at least one key, got shape ", k_in.sizes());
  check_shape(query_folded_in, "query_folded", {batch, groups, channels});
  check_shape(query_bias_in, "query_bias", {batch, groups});
  MMFAST_CHECK(v_in.size(0) == k_in.size(0) && v_in.size(1) == keys && v_in.size(2) == channels, "v has shape ",
               v_in.sizes(), " but k has ", k_in.sizes());
  check_shape(v_weight_in, "v_weight", {inner, channels});
  check_shape(v_bias_in, "v_bias", {inner});
  check_shape(out_weight_in, "out_weight", {out_channels, inner});
  check_shape(out_bias_in, "out_bias", {out_channels});
  check_shape(residual_in, "residual", {batch, queries, out_channels});
  check_shape(norm_weight_in, "norm_weight", {out_channels});
  check_shape(norm_bias_in, "norm_bias", {out_channels});
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor query_folded = query_folded_in.contiguous(), query_bias = query_bias_in.contiguous();
  const at::Tensor v_weight = v_weight_in.contiguous(), v_bias = v_bias_in.contiguous();
  const at::Tensor out_weight = out_weight_in.contiguous(), out_bias = out_bias_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor norm_weight = norm_weight_in.contiguous(), norm_bias = norm_bias_in.contiguous();
  const kc::TokenToImageShape shape{batch, queries, keys, channels, heads, inner / heads, out_channels};
  const int64_t kv_stride = batch_stride(k, "k", batch);
  check_sizes({{"query_folded", &query_folded}, {"k", &k}, {"v_weight", &v_weight}, {"out_weight", &out_weight},
               {"residual", &residual}},
              batch, kc::token_to_image_smem_bytes(shape));
  MMFAST_CHECK(kc::token_to_image_chunks(shape) <= std::numeric_limits<int32_t>::max(), "too many keys: ", keys);
  at::Tensor out = at::empty({batch, queries, out_channels}, query_folded.options());
  at::Tensor scratch =
      at::empty({kc::token_to_image_scratch_floats(shape)}, query_folded.options().dtype(at::kFloat));
  at::Tensor tickets = at::zeros({batch}, query_folded.options().dtype(at::kInt));
  C10_CUDA_CHECK(kc::sam_token_to_image(kernel_dtype(k), shape, query_folded.data_ptr(), query_bias.data_ptr(),
                                        k.data_ptr(), v.data_ptr(), kv_stride, v_weight.data_ptr(), v_bias.data_ptr(),
                                        out_weight.data_ptr(), out_bias.data_ptr(), residual.data_ptr(),
                                        norm_weight.data_ptr(), norm_bias.data_ptr(), static_cast<float>(scale),
                                        static_cast<float>(eps),
                                        scratch.data_ptr<float>(), tickets.data_ptr<int>(), out.data_ptr(),
                                        current_stream()));
  return out;
}

}  // namespace
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("sam_image_to_token", &mmfast::sam_image_to_token_cuda);
  m.impl("sam_token_to_image", &mmfast::sam_token_to_image_cuda);
}
