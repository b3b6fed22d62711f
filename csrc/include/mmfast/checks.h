// Argument checks shared by every C++/CUDA op. The Python layer (mmfast/ops/_checks.py) checks
// first and names the user's argument; these guard direct torch.ops.mmfast.* calls, so a bad
// call is an error, never a wrong answer or a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

// F.normalize's eps: rows are divided by max(||row||, eps), so a zero row gives a zero vector.
constexpr float kNormalizeEps = 1e-12f;

}  // namespace mmfast
