// Autograd of the native mmfast operators, registered under the Autograd dispatch key.
//
// Each forward operator's derivative is a torch::autograd::Function whose forward runs the operator below
// autograd and whose backward calls the fused backward operator through the dispatcher (so CPU and CUDA
// kernels, and the fake impls under torch.compile, are picked as for any call). The Python register_autograd
// it replaces ran an autograd.Function in Python on every call: torch.ops.mmfast.cross_attention on tiny
// inputs, one thread, 2-core dev CPU, took 11.5 us per call with it and 6.0 us with this (the overhead guard:
// tests/test_overhead.py). The Triton operators (mmfast/triton) keep their Python autograd (mmfast/ops).
// Schemas: csrc/mmfast.cpp.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "mmfast/operators.h"

namespace mmfast {
namespace {

using namespace mmfast::ops;  // NOLINT: the operator handles and signature types
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether autograd must see an argument: it requires grad (in grad mode), or carries a forward-mode tangent
// (which Function::apply rejects with an error, rather than the tangent being dropped).
bool tracked(const Tensor& t, bool grad_mode) {
  return t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
}
bool tracked(const optional<Tensor>& t, bool grad_mode) { return t.has_value() && tracked(*t, grad_mode); }
template <class T>
bool tracked(const T&, bool) { return false; }

optional<Tensor> maybe(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

// Runs Fn's forward operator below autograd (its CPU/CUDA/Meta kernel) and returns its outputs as a list.
template <class Fn, class... A>
variable_list forward_below_autograd(const A&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return std::apply([](auto&&... out) { return variable_list{std::move(out)...}; },
                    Fn::Forward::handle().call(args...));
}

// The Autograd kernel of Fn::Forward (signature R(A...), R a tuple of tensors). With nothing for autograd to
// record it goes straight below autograd (no graph node); otherwise through Function<Fn>.
template <class Fn, class Sig = typename Fn::Forward::Signature>
struct AutogradKernel;
template <class Fn, class R, class... A>
struct AutogradKernel<Fn, R(A...)> {
  static R call(A... args) {
    const bool grad_mode = at::GradMode::is_enabled();
    if (!(tracked(args, grad_mode) || ...)) {
      at::AutoDispatchBelowADInplaceOrView guard;
      return Fn::Forward::handle().call(args...);
    }
    variable_list out = torch::autograd::Function<Fn>::apply(args...);
    return [&]<size_t... I>(std::index_sequence<I...>) { return R(std::move(out[I])...); }(
        std::make_index_sequence<std::tuple_size_v<R>>());
  }
};

// ---- similarity_softmax / similarity_topk --------------------------------------------------------------
struct SimilaritySoftmaxFn : torch::autograd::Function<SimilaritySoftmaxFn> {
  using Forward = SimilaritySoftmax;
  static variable_list forward(AutogradContext* ctx, const Tensor& image, const Tensor& text, const Tensor& scale,
                               OptTensor bias, bool normalize, c10::string_view activation) {
    variable_list out = forward_below_autograd<SimilaritySoftmaxFn>(image, text, scale, bias, normalize, activation);
    ctx->save_for_backward({out[0], image, text, out[1], out[2], scale});
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({out[1], out[2]});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto [gi, gt, gs, gb] = SimilaritySoftmaxBackward::handle().call(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["normalize"].toBool(),
        ctx->saved_data["activation"].toStringRef());
    return {gi, gt, gs.to(s[5].scalar_type()), ctx->saved_data["has_bias"].toBool() ? gb : Tensor(), Tensor(),
            Tensor()};
  }
};

struct SimilarityTopkFn : torch::autograd::Function<SimilarityTopkFn> {
  using Forward = SimilarityTopk;
  static variable_list forward(AutogradContext* ctx, const Tensor& image, const Tensor& text, const Tensor& scale,
                               OptTensor bias, bool normalize, c10::string_view activation, int64_t k) {
    variable_list out = forward_below_autograd<SimilarityTopkFn>(image, text, scale, bias, normalize, activation, k);
    ctx->save_for_backward({out[0], out[1], out[2], image, text, out[3], out[4], scale, bias.value_or(Tensor())});
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({out[1], out[2], out[3], out[4]});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const optional<Tensor> bias = maybe(s[8]);
    auto [gi, gt, gs, gb] = SimilarityTopkBackward::handle().call(
        grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], bias, ctx->saved_data["normalize"].toBool(),
        ctx->saved_data["activation"].toStringRef());
    return {gi, gt, gs.to(s[7].scalar_type()), bias ? gb : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---- cross_attention ------------------------------------------------------------------------------------
struct CrossAttentionFn : torch::autograd::Function<CrossAttentionFn> {
  using Forward = CrossAttention;
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v, OptTensor k2,
                               OptTensor v2, double scale) {
    variable_list out = forward_below_autograd<CrossAttentionFn>(q, k, v, k2, v2, scale);
    ctx->save_for_backward({q, k, v, k2.value_or(Tensor()), v2.value_or(Tensor()), out[0], out[1]});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({out[1]});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto [gq, gk, gv, gk2, gv2] = CrossAttentionBackward::handle().call(
        grads[0], s[0], s[1], s[2], maybe(s[3]), maybe(s[4]), s[5], s[6], ctx->saved_data["scale"].toDouble());
    const bool second_segment = s[3].defined();  // else grad_k2/grad_v2 are empty placeholders
    return {gq, gk, gv, second_segment ? gk2 : Tensor(), second_segment ? gv2 : Tensor(), Tensor()};
  }
};

// ---- contrastive losses ---------------------------------------------------------------------------------
struct ClipLossBlockFn : torch::autograd::Function<ClipLossBlockFn> {
  using Forward = ClipLossBlock;
  static variable_list forward(AutogradContext* ctx, const Tensor& rows, const Tensor& cols, const Tensor& scale,
                               OptTensor bias, int64_t label_offset) {
    variable_list out = forward_below_autograd<ClipLossBlockFn>(rows, cols, scale, bias, label_offset);
    ctx->save_for_backward({rows, cols, scale, bias.value_or(Tensor()), out[0], out[1]});
    ctx->saved_data["label_offset"] = label_offset;
    ctx->set_materialize_grads(false);  // an unused output (col_lse of the local loss) costs no exp pass
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) {
      return variable_list(5);
    }
    const variable_list s = ctx->get_saved_variables();
    const at::ScalarType stats = s[4].scalar_type();
    auto as_stats = [&](const Tensor& g) { return g.defined() ? optional<Tensor>(g.to(stats)) : std::nullopt; };
    const optional<Tensor> bias = maybe(s[3]);
    auto [gr, gc, gs, gb] =
        ClipLossBlockBackward::handle().call(s[0], s[1], s[2], bias, ctx->saved_data["label_offset"].toInt(), s[4],
                                             s[5], as_stats(grads[0]), as_stats(grads[1]), as_stats(grads[2]));
    return {gr, gc, gs.to(s[2].scalar_type()), bias ? gb.to(bias->scalar_type()) : Tensor(), Tensor()};
  }
};

// The forward pass already computed the gradients of the loss sum: the backward only scales them.
struct SiglipLossBlockFn : torch::autograd::Function<SiglipLossBlockFn> {
  using Forward = SiglipLossBlock;
  static variable_list forward(AutogradContext* ctx, const Tensor& rows, const Tensor& cols, const Tensor& scale,
                               OptTensor bias, bool has_positives, bool compute_grad) {
    variable_list out =
        forward_below_autograd<SiglipLossBlockFn>(rows, cols, scale, bias, has_positives, compute_grad);
    ctx->mark_non_differentiable({out[1], out[2], out[3], out[4]});
    ctx->save_for_backward({out[1], out[2], out[3], out[4]});
    ctx->saved_data["compute_grad"] = compute_grad;
    ctx->saved_data["scale_dtype"] = scale.scalar_type();
    ctx->saved_data["bias_dtype"] = bias ? optional<at::ScalarType>(bias->scalar_type()) : std::nullopt;
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(),
                "mmfast: siglip_loss_block ran with compute_grad=False, so it has no gradient to give");
    const variable_list s = ctx->get_saved_variables();
    const Tensor& g = grads[0];
    const c10::IValue bias_dtype = ctx->saved_data["bias_dtype"];
    return {s[0].mul(g.to(s[0].scalar_type())), s[1].mul(g.to(s[1].scalar_type())),
            s[2].mul(g).to(ctx->saved_data["scale_dtype"].toScalarType()),
            bias_dtype.isNone() ? Tensor() : s[3].mul(g).to(bias_dtype.toScalarType()), Tensor(), Tensor()};
  }
};

}  // namespace
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, Autograd, m) {
  using namespace mmfast;
  m.impl("similarity_softmax", &AutogradKernel<SimilaritySoftmaxFn>::call);
  m.impl("similarity_topk", &AutogradKernel<SimilarityTopkFn>::call);
  m.impl("cross_attention", &AutogradKernel<CrossAttentionFn>::call);
  m.impl("clip_loss_block", &AutogradKernel<ClipLossBlockFn>::call);
  m.impl("siglip_loss_block", &AutogradKernel<SiglipLossBlockFn>::call);
}
