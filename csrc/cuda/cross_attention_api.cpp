// CUDA implementations of the cross_attention operators (schemas in csrc/mmfast.cpp): argument checks
// (shared with the CPU kernels, mmfast/cross_attention_checks.h), allocation and calls into the kernels'
// launchers (csrc/cuda/cross_attention.cu). Compiled by the host compiler: torch's headers stay out of
// nvcc's compile units. Operands are passed by strides (no copies unless the head dim is strided); no host
// synchronization.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "mmfast/checks.h"
#include "mmfast/cross_attention_checks.h"
#include "mmfast/cross_attention_cuda.h"
#include "mmfast/cuda_glue.h"

namespace mmfast {
namespace {

namespace kc = mmfast::cuda;
using namespace mmfast::cross_attention;
using cuda_glue::current_stream;
using cuda_glue::kernel_dtype;

kc::HeadRows rows_of(const at::Tensor& x) { return {x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)}; }

kc::MutableHeadRows mutable_rows_of(const at::Tensor& x) {
  return {x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)};
}

// fp16/bf16 on the tensor-core kernels where the device has them, once opted in (cuda_glue.h).
bool use_tensor_cores(kc::DType dtype) {
  return cuda_glue::tensor_cores_opted_in() && kc::attention_tensor_cores(dtype);
}

// What the kernels need beyond the shared checks: CUDA tensors, a block's shared memory that this
// device grants, and grids under 2^31 blocks (one block per 64 rows of each batch*head).
void check_launchable(const at::Tensor& q, const std::optional<at::Tensor>& k2, const at::Tensor& k) {
  MMFAST_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernels, got ", q.device());
  const int64_t need = kc::attention_smem_bytes(q.size(3));
  const int64_t have = kc::device_smem_limit();
  MMFAST_CHECK(need > 0 && need <= have, "head dim ", q.size(3), " needs ", need,
               " bytes of shared memory per block but this GPU grants ", have, "; use backend='reference'");
  const auto blocks = [&](int64_t len) { return q.size(0) * q.size(1) * ((len + 63) / 64); };
  const int64_t key_blocks = blocks(k.size(2)) + (k2.has_value() ? blocks(k2->size(2)) : 0);
  MMFAST_CHECK(blocks(q.size(2)) <= std::numeric_limits<int32_t>::max() &&
                   key_blocks <= std::numeric_limits<int32_t>::max(),
               "too many rows for the CUDA grid: B*H*ceil(L/64) must stay below 2^31 (q ", q.sizes(), ", k ",
               k.sizes(), ")");
}

// The key/value segments as the launchers take them (head dims made contiguous where they are not).
struct Segments {
  kc::AttentionShape shape{};
  at::Tensor k[2], v[2];
  kc::HeadRows k_rows[2]{}, v_rows[2]{};
};

Segments segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& k2,
                  const std::optional<at::Tensor>& v2) {
  Segments s;
  s.shape.batch = q.size(0);
  s.shape.heads = q.size(1);
  s.shape.q_len = q.size(2);
  s.shape.head_dim = q.size(3);
  s.shape.segments = k2.has_value() ? 2 : 1;
  for (int seg = 0; seg < s.shape.segments; ++seg) {
    s.k[seg] = head_dim_contiguous(seg == 0 ? k : *k2);
    s.v[seg] = head_dim_contiguous(seg == 0 ? v : *v2);
    s.shape.key_len[seg] = s.k[seg].size(2);
    s.k_rows[seg] = rows_of(s.k[seg]);
    s.v_rows[seg] = rows_of(s.v[seg]);
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor> cross_attention_cuda(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                                                        const std::optional<at::Tensor>& k2,
                                                        const std::optional<at::Tensor>& v2, double scale) {
  check_inputs(q_in, k, v, k2, v2, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_launchable(q_in, k2, k);
  const at::Tensor q = head_dim_contiguous(q_in);
  const Segments s = segments(q, k, v, k2, v2);
  at::Tensor out = empty_output(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const int splits = kc::attention_forward_splits(s.shape, kc::device_sm_count());
  at::Tensor scratch = at::empty({kc::attention_split_scratch_floats(s.shape, splits)}, lse.options());
  C10_CUDA_CHECK(kc::cross_attention_forward(kernel_dtype(q), s.shape, rows_of(q), s.k_rows, s.v_rows,
                                             static_cast<float>(scale), mutable_rows_of(out), lse.data_ptr<float>(),
                                             splits, scratch.data_ptr<float>(),
                                             use_tensor_cores(kernel_dtype(q)), current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& k2, const std::optional<at::Tensor>& v2, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale) {
  check_inputs(q_in, k, v, k2, v2, /*allow_double=*/false);
  check_backward_inputs(q_in, grad_out_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_launchable(q_in, k2, k);
  const at::Tensor q = head_dim_contiguous(q_in), grad_out = head_dim_contiguous(grad_out_in);
  const at::Tensor out = head_dim_contiguous(out_in), lse = lse_in.contiguous();
  const Segments s = segments(q, k, v, k2, v2);

  at::Tensor grad_q = grad_like(q_in);
  at::Tensor grad_k[2], grad_v[2];
  kc::MutableHeadRows grad_k_rows[2]{}, grad_v_rows[2]{};
  for (int seg = 0; seg < s.shape.segments; ++seg) {
    grad_k[seg] = grad_like(seg == 0 ? k : *k2);
    grad_v[seg] = grad_like(seg == 0 ? v : *v2);
    grad_k_rows[seg] = mutable_rows_of(grad_k[seg]);
    grad_v_rows[seg] = mutable_rows_of(grad_v[seg]);
  }
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(kc::cross_attention_backward(kernel_dtype(q), s.shape, rows_of(q), s.k_rows, s.v_rows, rows_of(out),
                                              rows_of(grad_out), lse.data_ptr<float>(), static_cast<float>(scale),
                                              delta.data_ptr<float>(), mutable_rows_of(grad_q), grad_k_rows,
                                              grad_v_rows, use_tensor_cores(kernel_dtype(q)),
                                              current_stream()));
  if (!k2.has_value()) {
    grad_k[1] = at::empty({0}, q.options());
    grad_v[1] = at::empty({0}, q.options());
  }
  return {grad_q, grad_k[0], grad_v[0], grad_k[1], grad_v[1]};
}

}  // namespace
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("cross_attention", &mmfast::cross_attention_cuda);
  m.impl("cross_attention_backward", &mmfast::cross_attention_backward_cuda);
}
