// Argument checks shared by every C++/CUDA op. The Python layer (mmfast/ops/_checks.py) checks
// first and names the user's argument; these guard direct torch.ops.mmfast.* calls, so a bad
// call is an error, never a wrong answer or a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>

#define MMFAST_CHECK(cond, ...) TORCH_CHECK(cond, "mmfast: ", __VA_ARGS__)

#define MMFAST_CHECK_DIM(x, d) \
  MMFAST_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got shape ", (x).sizes())

#define MMFAST_CHECK_FLOAT(x)                                                                \
  MMFAST_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||          \
                   (x).scalar_type() == at::kBFloat16,                                       \
               #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())

#define MMFAST_CHECK_SAME_DEVICE(x, y) \
  MMFAST_CHECK((x).device() == (y).device(), #x " is on ", (x).device(), " but " #y " is on ", (y).device())

#define MMFAST_CHECK_SAME_DTYPE(x, y) \
  MMFAST_CHECK((x).scalar_type() == (y).scalar_type(), #x " is ", (x).scalar_type(), " but " #y " is ", (y).scalar_type())

#define MMFAST_CHECK_SCALAR(x) \
  MMFAST_CHECK((x).numel() == 1 && (x).dim() <= 1, #x " must be a 0-dim or shape-[1] tensor, got shape ", (x).sizes())

namespace mmfast {

enum class Activation { kSoftmax, kSigmoid, kNone };

inline Activation parse_activation(c10::string_view name) {
  if (name == "softmax") return Activation::kSoftmax;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "none") return Activation::kNone;
  TORCH_CHECK(false, "mmfast: activation must be 'softmax', 'sigmoid' or 'none', got '", std::string(name), "'");
}

// logit_scale / logit_bias: a 0-dim or shape-[1] floating tensor on the features' device. `name` is the
// argument's name in the error.
inline void check_scalar_tensor(const at::Tensor& value, const char* name, const at::Tensor& features) {
  MMFAST_CHECK(value.numel() == 1 && value.dim() <= 1, name, " must be a 0-dim or shape-[1] tensor, got shape ",
               value.sizes());
  MMFAST_CHECK(value.is_floating_point(), name, " must be a floating tensor, got ", value.scalar_type());
  MMFAST_CHECK(value.device() == features.device(), name, " is on ", value.device(), " but the features are on ",
               features.device());
}

// A pair of feature matrices [Na, D] and [Nb, D] (the similarity and contrastive-loss ops, CPU and CUDA):
// floating (float64 only where allow_double: the CPU kernels take it for gradcheck), one dtype and
// device, equal D, neither empty. a_name / b_name name the arguments in the errors.
inline void check_feature_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                               bool allow_double) {
  for (const auto& [x, name] : {std::pair{&a, a_name}, std::pair{&b, b_name}}) {
    MMFAST_CHECK(x->dim() == 2, name, " must have 2 dimensions, got shape ", x->sizes());
  }
  const auto dt = a.scalar_type();
  MMFAST_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (allow_double && dt == at::kDouble),
               a_name, allow_double ? " must be float32, float16, bfloat16 or float64, got "
                                    : " must be float32, float16 or bfloat16, got ", dt);
  MMFAST_CHECK(b.scalar_type() == dt, b_name, " is ", b.scalar_type(), " but ", a_name, " is ", dt);
  MMFAST_CHECK(b.device() == a.device(), b_name, " is on ", b.device(), " but ", a_name, " is on ", a.device());
  MMFAST_CHECK(a.size(1) == b.size(1), "feature dim D mismatch: ", a_name, " has ", a.size(1), " (shape ", a.sizes(),
               ") but ", b_name, " has ", b.size(1), " (shape ", b.sizes(), ")");
  MMFAST_CHECK(a.numel() > 0, a_name, " must not be empty, got shape ", a.sizes());
  MMFAST_CHECK(b.numel() > 0, b_name, " must not be empty, got shape ", b.sizes());
}

// F.normalize's eps: rows are divided by max(||row||, eps), so a zero row gives a zero vector.
constexpr float kNormalizeEps = 1e-12f;

}  // namespace mmfast
