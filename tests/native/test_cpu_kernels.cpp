// Native test of the CPU kernels: each operator is called through the dispatcher, exactly as
// torch.ops.mmfast.* does, and compared with the same formula written in ATen (in double).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double rtol) {
  const double err = (got.to(at::kDouble) - want).norm().item<double>() / want.norm().clamp_min(1e-300).item<double>();
  const bool ok = got.sizes() == want.sizes() && err <= rtol;
  std::printf("%s %s: rel err %.3e (tol %.1e)\n", ok ? "PASS" : "FAIL", what.c_str(), err, rtol);
  if (!ok) ++failures;
}

at::Tensor normalize_rows(const at::Tensor& x) {
  return x / x.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12);
}

void test_similarity_softmax() {
  using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const std::optional<at::Tensor>&, bool, c10::string_view);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mmfast::similarity_softmax", "").typed<Fwd>();
  at::manual_seed(0);
  for (auto [n, c, d] : {std::tuple{1, 1, 1}, std::tuple{37, 129, 7}, std::tuple{64, 1000, 96}}) {
    auto image = at::randn({n, d});
    auto text = at::randn({c, d});
    auto scale = at::full({}, 14.3f);
    auto bias = at::full({}, -2.0f);
    auto want_logits = scale.to(at::kDouble) * at::mm(normalize_rows(image.to(at::kDouble)),
                                                      normalize_rows(text.to(at::kDouble)).t());
    const std::string shape = std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(d);
    auto [probs, inv_i, inv_t] = op.call(image, text, scale, std::nullopt, true, "softmax");
    expect_close("similarity_softmax softmax " + shape, probs, at::softmax(want_logits, 1), 1e-5);
    auto [sig, i2, t2] = op.call(image, text, scale, bias, true, "sigmoid");
    expect_close("similarity_softmax sigmoid " + shape, sig, at::sigmoid(want_logits - 2.0), 1e-5);
    expect_close("inv_norm_image " + shape, inv_i, 1.0 / image.to(at::kDouble).norm(2, {1}).clamp_min(1e-12), 1e-6);
  }
}

}  // namespace

int main() {
  test_similarity_softmax();
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
