// Runs the tensor-core dot products of similarity_softmax (csrc/cuda/similarity_softmax.cu's
// similarity_dots_fused, through its launcher) on CPU threads with tests/native/cuda_emulation.h, then the
// softmax epilogue on what they wrote, as similarity_softmax_api.cpp chains them, and checks both against float64
// references computed here. Run by tests/test_cuda_emulation.py; prints one line per failed check and a summary,
// and exits with 0 only if every check passed.
#include "cuda_emulation.h"
#include "emulated_checks.h"

#include "../../csrc/cuda/similarity_softmax.cu"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

namespace kc = mmfast::cuda;
using namespace mmfast_emulation::checks;

struct Shape {
  int64_t n, c, d;
  float scale, bias;
};

// x [n, d] and y [c, d]: 0.5 * N(0, 1) rounded to T (the glue passes the normalized copies; the kernel does not
// care what the rows' norms are).
template <typename T>
void run(const Shape& s, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  Vec<T> x(s.n * s.d), y(s.c * s.d);
  for (T& v : x) v = kc::from_float<T>(0.5f * normal(gen));
  for (T& v : y) v = kc::from_float<T>(0.5f * normal(gen));
  const std::string tag = std::string(name_of<T>()) + " " + std::to_string(s.n) + "x" + std::to_string(s.c) + " D" +
                          std::to_string(s.d);
  expect(kc::similarity_dots_fused_supported(dtype_of<T>(), s.c), tag + " supported");

  Vec<T> out = poisoned<T>(s.n * s.c);
  launched(kc::similarity_dots_fused(dtype_of<T>(), x.data(), y.data(), s.n, s.c, s.d, out.data(), nullptr));
  // Each dot: fp32 accumulation of exact products (error <= d * 2^-24 * sum |x_k y_k|), then one rounding to T
  // (half an ulp: 2^-11 relative for fp16, 2^-8 for bf16).
  const double u = std::is_same_v<T, __half> ? 0x1p-11 : 0x1p-8;
  double worst = 0;
  std::vector<double> dots(s.n * s.c);
  for (int64_t i = 0; i < s.n; ++i)
    for (int64_t j = 0; j < s.c; ++j) {
      double dot = 0, size = 0;
      for (int64_t k = 0; k < s.d; ++k) {
        const double p = double(kc::to_float(x[i * s.d + k])) * kc::to_float(y[j * s.d + k]);
        dot += p;
        size += std::abs(p);
      }
      const double got = kc::to_float(out[i * s.c + j]);
      dots[i * s.c + j] = got;
      const double bound = u * std::abs(dot) + s.d * 0x1p-24 * size + 1e-30;
      worst = std::max(worst, std::abs(got - dot) / bound);  // NaN (an unwritten entry) makes worst NaN
      if (std::isnan(got)) worst = NAN;
    }
  expect_error(worst, 1.0, tag + " dots (error / bound)");

  // The softmax epilogue in place on the kernel's output: p = softmax(scale * dot + bias) per row, against
  // float64 on the same rounded dots. The epilogue rounds p to T once: 2u relative covers that and its fp32 math.
  const float scale = s.scale, bias = s.bias;
  launched(kc::similarity_epilogue(dtype_of<T>(), out.data(), s.n, s.c, &scale, &bias, kc::Act::kSoftmax, 1 << 20,
                                   nullptr));
  double worst_p = 0;
  for (int64_t i = 0; i < s.n; ++i) {
    double m = -INFINITY, sum = 0;
    for (int64_t j = 0; j < s.c; ++j) m = std::max(m, scale * dots[i * s.c + j] + bias);
    for (int64_t j = 0; j < s.c; ++j) sum += std::exp(scale * dots[i * s.c + j] + bias - m);
    for (int64_t j = 0; j < s.c; ++j) {
      const double p = std::exp(scale * dots[i * s.c + j] + bias - m) / sum;
      const double err = std::abs(kc::to_float(out[i * s.c + j]) - p) / (2 * u * p + 1e-7);
      worst_p = std::isnan(err) ? NAN : std::max(worst_p, err);
    }
  }
  expect_error(worst_p, 1.0, tag + " softmax (error / bound)");
}

}  // namespace

int main() {
  // fp32 stays on cuBLAS.
  expect(!kc::similarity_dots_fused_supported(kc::DType::kFloat32, 10), "fp32 not fused");
  // One element; odd sizes (unaligned feature loads at D = 9, unaligned pair stores at odd C, a second row block
  // past 128 rows, a ragged last column tile); CLIP-like D with a class count past one column tile.
  run<__half>({1, 1, 8, 10.f, 0.f}, 1);
  run<__nv_bfloat16>({1, 1, 8, 10.f, 0.f}, 2);
  run<__half>({130, 129, 9, 20.f, -1.f}, 3);
  run<__nv_bfloat16>({130, 129, 9, 20.f, -1.f}, 4);
  run<__half>({37, 301, 200, 100.f, 0.f}, 5);
  run<__nv_bfloat16>({64, 256, 64, 4.f, 2.f}, 6);
  std::printf("similarity_softmax_emulated: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
