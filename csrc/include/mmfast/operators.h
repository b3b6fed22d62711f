// The mmfast operators as typed dispatcher handles, for C++ callers: the autograd kernels
// (csrc/autograd.cpp) and the eager entry points of the Python module (csrc/mmfast.cpp). Each C++ signature
// is written once here and must match its schema in csrc/mmfast.cpp (a mismatch fails at the first call).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <tuple>

namespace mmfast::ops {

using at::Tensor;
using OptTensor = const std::optional<Tensor>&;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// An operator name as a template argument.
template <std::size_t N>
struct Name {
  char text[N];
  constexpr Name(const char (&s)[N]) { std::copy_n(s, N, text); }  // NOLINT: implicit by design
};

// Operator `name` with C++ signature Sig (R(Args...)); handle() looks it up once.
template <Name name, class Sig>
struct Op {
  using Signature = Sig;
  static const c10::TypedOperatorHandle<Sig>& handle() {
    static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name.text, "").template typed<Sig>();
    return h;
  }
};

using SimilaritySoftmax = Op<"mmfast::similarity_softmax",
                             Tensor3(const Tensor&, const Tensor&, const Tensor&, OptTensor, bool, c10::string_view)>;
using SimilaritySoftmaxBackward =
    Op<"mmfast::similarity_softmax_backward", Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, const Tensor&, bool,
                                                      c10::string_view)>;
using SimilarityTopk = Op<"mmfast::similarity_topk", Tensor5(const Tensor&, const Tensor&, const Tensor&, OptTensor,
                                                             bool, c10::string_view, int64_t)>;
using SimilarityTopkBackward =
    Op<"mmfast::similarity_topk_backward",
       Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
               const Tensor&, const Tensor&, OptTensor, bool, c10::string_view)>;

using CrossAttention =
    Op<"mmfast::cross_attention", Tensor2(const Tensor&, const Tensor&, const Tensor&, OptTensor, OptTensor, double)>;
using CrossAttentionBackward =
    Op<"mmfast::cross_attention_backward", Tensor5(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   OptTensor, OptTensor, const Tensor&, const Tensor&, double)>;

using ClipLossBlock = Op<"mmfast::clip_loss_block", Tensor3(const Tensor&, const Tensor&, const Tensor&, OptTensor,
                                                            int64_t)>;
using ClipLossBlockBackward =
    Op<"mmfast::clip_loss_block_backward", Tensor4(const Tensor&, const Tensor&, const Tensor&, OptTensor, int64_t,
                                                   const Tensor&, const Tensor&, OptTensor, OptTensor, OptTensor)>;
using SiglipLossBlock = Op<"mmfast::siglip_loss_block", Tensor5(const Tensor&, const Tensor&, const Tensor&,
                                                                OptTensor, bool, bool)>;

}  // namespace mmfast::ops
