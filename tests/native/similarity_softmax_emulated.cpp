// Runs csrc/cuda/similarity_softmax.cu's kernels through their launchers on CPU threads with
// tests/native/cuda_emulation.h and checks them against float64 references computed here: the tensor-core dot
// products (similarity_dots_fused) and the softmax epilogue on what they wrote, as similarity_softmax_api.cpp chains
// them; the row normalization; the backward's activation pass and normalization backward; the top-k forward over
// column chunks. Run by tests/test_cuda_emulation.py; prints one line per failed check and a summary,
// and exits with 0 only if every check passed.
#include "cuda_emulation.h"
#include "emulated_checks.h"

#include "../../csrc/cuda/similarity_softmax.cu"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <utility>
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

// normalize_rows, activation_backward and normalize_backward on one [n, d] / [n, c] problem in T.
template <typename T>
void run_rows(int64_t n, int64_t c, int64_t d, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  const double u = std::is_same_v<T, float> ? 0x1p-24 : std::is_same_v<T, __half> ? 0x1p-11 : 0x1p-8;
  // fp16's subnormals (below 2^-14) round to a fixed grid of 2^-24: an absolute error of up to half of it.
  const double tiny = std::is_same_v<T, __half> ? 0x1p-25 : 0.0;
  const double largest = std::is_same_v<T, __half> ? 65504.0 : 3.0e38;
  const std::string tag = std::string(name_of<T>()) + " rows " + std::to_string(n) + "x" + std::to_string(c) + " D" +
                          std::to_string(d);
  // normalize_rows: the last row is zero (inv = 1 / eps, its copy 0).
  Vec<T> src(n * d);
  for (int64_t k = 0; k < n * d; ++k) src[k] = kc::from_float<T>(k >= (n - 1) * d ? 0.f : 2.f * normal(gen));
  Vec<float> inv = poisoned<float>(n);
  Vec<T> x = poisoned<T>(n * d);
  const float eps = 1e-12f;
  launched(kc::normalize_rows(dtype_of<T>(), src.data(), n, d, inv.data(), true, eps, x.data(), nullptr));
  double worst_inv = 0, worst_x = 0;
  for (int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (int64_t k = 0; k < d; ++k) ss += std::pow(double(kc::to_float(src[i * d + k])), 2);
    const double want = 1 / std::max(std::sqrt(ss), double(eps));
    worst_inv = std::max(worst_inv, std::abs(inv[i] - want) / want);
    for (int64_t k = 0; k < d; ++k) {
      const double xw = kc::to_float(src[i * d + k]) * want;
      // the product's rounding to T and inv's own rounding to fp32
      worst_x = std::max(worst_x, std::abs(kc::to_float(x[i * d + k]) - xw) / ((u + 0x1p-24) * std::abs(xw) + 1e-30));
    }
  }
  expect_error(worst_inv, 0x1p-21, tag + " normalize_rows inv");
  expect_error(worst_x, 1.0, tag + " normalize_rows copy (error / bound)");

  // activation_backward: p a softmax row rounded to T, g random.
  Vec<T> g(n * c), p(n * c);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> l(c);
    double m = -INFINITY, sum = 0;
    for (auto& v : l) m = std::max(m, v = 3.0 * normal(gen));
    for (double v : l) sum += std::exp(v - m);
    for (int64_t j = 0; j < c; ++j) {
      p[i * c + j] = kc::from_float<T>(float(std::exp(l[j] - m) / sum));
      g[i * c + j] = kc::from_float<T>(normal(gen));
    }
  }
  // ds rows c apart, and padded to 16 bytes as the glue lays them out for cuBLAS (element stores where a padded
  // row's alignment differs from g's).
  const int64_t padded = (c + 1 + kc::kVec<T> - 1) / kc::kVec<T> * kc::kVec<T>;
  for (const auto& [act, ld] : {std::pair{kc::Act::kSoftmax, c}, std::pair{kc::Act::kSoftmax, padded},
                                std::pair{kc::Act::kSigmoid, c}, std::pair{kc::Act::kSigmoid, padded},
                                std::pair{kc::Act::kNone, c}}) {
    const std::string name = std::string(act == kc::Act::kSoftmax   ? "softmax"
                                         : act == kc::Act::kSigmoid ? "sigmoid"
                                                                    : "none") +
                             (ld == c ? "" : " (padded ds rows)");
    Vec<T> ds = poisoned<T>(act == kc::Act::kNone ? 0 : n * ld);
    Vec<float> row_sum = poisoned<float>(n);
    launched(kc::activation_backward(dtype_of<T>(), g.data(), p.data(), data_or_null(ds), ld, n, c, act,
                                     row_sum.data(), 1 << 20, nullptr));
    double worst = 0, worst_sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      double delta = 0, sum = 0, size = 0;
      for (int64_t j = 0; j < c; ++j) delta += double(kc::to_float(g[i * c + j])) * kc::to_float(p[i * c + j]);
      for (int64_t j = 0; j < c; ++j) {
        const double gv = kc::to_float(g[i * c + j]), pv = kc::to_float(p[i * c + j]);
        const double want = act == kc::Act::kSoftmax ? pv * (gv - delta) : act == kc::Act::kSigmoid ? gv * pv * (1 - pv)
                                                                                                   : gv;
        // rounding of ds to T, and fp32 delta (c terms) inside the product
        const double bound =
            u * std::abs(want) + 0x1p-22 * std::abs(pv) * (std::abs(gv) + std::abs(delta) + c * 0x1p-2) + tiny;
        if (act != kc::Act::kNone) worst = std::max(worst, std::abs(kc::to_float(ds[i * ld + j]) - want) / bound);
        sum += want;
        size += std::abs(want);
      }
      worst_sum = std::max(worst_sum, std::abs(row_sum[i] - sum) / (size + 1e-30));
    }
    if (act != kc::Act::kNone) expect_error(worst, 1.0, tag + " activation_backward " + name + " ds (error / bound)");
    expect_error(worst_sum, act == kc::Act::kNone ? 0x1p-20 : 4 * u,
                 tag + " activation_backward " + name + " row sums");
  }

  // normalize_backward: grad_unit G fp32 random; with and without normalize.
  Vec<float> G(n * d);
  for (float& v : G) v = normal(gen);
  const float scale = 3.f;
  for (const bool normalize : {true, false}) {
    Vec<T> grad = poisoned<T>(n * d);
    Vec<float> row_dot = poisoned<float>(n);
    launched(kc::normalize_backward(dtype_of<T>(), G.data(), src.data(), inv.data(), n, d, &scale, normalize, eps,
                                    grad.data(), row_dot.data(), nullptr));
    double worst = 0, worst_dot = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double iv = normalize ? inv[i] : 1.0;
      double xg = 0, xg_size = 0, ss = 0;
      for (int64_t k = 0; k < d; ++k) {
        const double xv = kc::to_float(src[i * d + k]) * iv;
        xg += xv * G[i * d + k];
        xg_size += std::abs(xv * G[i * d + k]);
        ss += std::pow(double(kc::to_float(src[i * d + k])), 2);
      }
      const bool project = normalize && std::sqrt(ss) >= eps;
      for (int64_t k = 0; k < d; ++k) {
        const double xv = kc::to_float(src[i * d + k]) * iv;
        const double want = scale * iv * (G[i * d + k] - (project ? xv * xg : 0.0));
        const double got = kc::to_float(grad[i * d + k]);
        if (std::abs(want) > largest) {  // beyond T's range (fp16, the zero row's 1 / eps): infinite, same sign
          worst = std::isinf(got) && (got > 0) == (want > 0) ? worst : INFINITY;
          continue;
        }
        const double bound =
            u * std::abs(want) + 0x1p-20 * scale * iv * (std::abs(G[i * d + k]) + std::abs(xv) * xg_size) + tiny;
        worst = std::max(worst, std::abs(got - want) / bound);
      }
      worst_dot = std::max(worst_dot, std::abs(row_dot[i] - xg) / (xg_size + 1e-30));
    }
    const std::string what = tag + " normalize_backward" + (normalize ? "" : " (no normalize)");
    expect_error(worst, 1.0, what + " grad (error / bound)");
    expect_error(worst_dot, 0x1p-20, what + " row_dot");
  }
}

// topk_finalize (softmax) on the merged keys and states, against float64 over `logits` [n, c] (the kernels' fp32
// logits fmaf(scale, dot, bias)): the k best classes (exact, ties to the lower class), their probabilities and
// the row log-sum-exp.
template <typename T>
void finalize_and_check(const std::string& tag, const Vec<uint64_t>& keys, const Vec<float>& row_max,
                        const Vec<float>& row_sum, const std::vector<float>& logits, int64_t n, int64_t c, int k) {
  const double u = std::is_same_v<T, float> ? 0x1p-24 : std::is_same_v<T, __half> ? 0x1p-11 : 0x1p-8;
  Vec<T> values = poisoned<T>(n * k);
  Vec<int64_t> indices(n * k, -1);
  Vec<float> lse = poisoned<float>(n);
  launched(kc::topk_finalize(dtype_of<T>(), keys.data(), row_max.data(), row_sum.data(), n, k, kc::Act::kSoftmax,
                             values.data(), indices.data(), lse.data(), nullptr));
  bool same = true;
  double worst_v = 0, worst_lse = 0;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<std::pair<double, int64_t>> row(c);
    double m = -INFINITY, sum = 0;
    for (int64_t j = 0; j < c; ++j) {
      row[j] = {logits[i * c + j], j};
      m = std::max(m, row[j].first);
    }
    for (const auto& e : row) sum += std::exp(e.first - m);
    const double want_lse = m + std::log(sum);
    worst_lse = std::max(worst_lse, std::abs(lse[i] - want_lse) / std::max(1.0, std::abs(want_lse)));
    if (std::isnan(lse[i])) worst_lse = NAN;
    std::partial_sort(row.begin(), row.begin() + k, row.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (int t = 0; t < k; ++t) {
      same = same && indices[i * k + t] == row[t].second;
      const double p = std::exp(row[t].first - want_lse);
      const double err = std::abs(kc::to_float(values[i * k + t]) - p) / (2 * u * p + 1e-6 * p + 1e-30);
      worst_v = std::isnan(err) ? NAN : std::max(worst_v, err);
    }
  }
  expect(same, tag + " indices");
  expect_error(worst_v, 1.0, tag + " values (error / bound)");
  expect_error(worst_lse, 1e-6, tag + " row_lse");
}

// Top-k forward over column chunks: topk_merge_chunk per chunk of the fp32 dots, then topk_finalize.
template <typename T>
void run_topk(int64_t n, int64_t c, int64_t width, int k, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  const std::string tag = std::string(name_of<T>()) + " top-" + std::to_string(k) + " " + std::to_string(n) + "x" +
                          std::to_string(c) + " W" + std::to_string(width);
  std::vector<float> dots(n * c), logits(n * c);
  for (float& v : dots) v = normal(gen);
  const float scale = 10.f, bias = -1.f;
  for (int64_t i = 0; i < n * c; ++i) logits[i] = std::fmaf(scale, dots[i], bias);
  Vec<uint64_t> keys = poisoned<uint64_t>(n * k);
  Vec<float> row_max = poisoned<float>(n), row_sum = poisoned<float>(n), chunk = poisoned<float>(n * width);
  for (int64_t c0 = 0; c0 < c; c0 += width) {
    const int64_t w = std::min(width, c - c0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < w; ++j) chunk[i * w + j] = dots[i * c + c0 + j];
    launched(kc::topk_merge_chunk(chunk.data(), n, w, c0, &scale, &bias, k, keys.data(), row_max.data(),
                                  row_sum.data(), nullptr));
  }
  finalize_and_check<T>(tag, keys, row_max, row_sum, logits, n, c, k);
}

// Top-k on the tensor cores: similarity_topk_fused (the tile kernel over `groups` column ranges, then the group
// merge) and topk_finalize. The features are small multiples of 1/4 and 1/8, so every dot product is exact in fp32
// whatever the mma's summation order, the reference logits match the kernel's bit for bit, and the many equal
// logits check that ties keep the lower class index.
template <typename T>
void run_topk_fused(int64_t n, int64_t c, int64_t d, int k, int groups, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> quarters(-4, 4), eighths(-8, 8);
  const std::string tag = std::string(name_of<T>()) + " fused top-" + std::to_string(k) + " " + std::to_string(n) +
                          "x" + std::to_string(c) + " D" + std::to_string(d) + " groups " + std::to_string(groups);
  Vec<T> x(n * d), y(c * d);
  for (T& v : x) v = kc::from_float<T>(quarters(gen) / 4.f);
  for (T& v : y) v = kc::from_float<T>(eighths(gen) / 8.f);
  expect(kc::similarity_topk_fused_supported(dtype_of<T>(), k, c), tag + " supported");
  const float scale = 0.5f, bias = -0.25f;
  std::vector<float> logits(n * c);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) {
      double dot = 0;
      for (int64_t q = 0; q < d; ++q) dot += double(kc::to_float(x[i * d + q])) * kc::to_float(y[j * d + q]);
      logits[i * c + j] = std::fmaf(scale, static_cast<float>(dot), bias);  // dot is exact in fp32
    }
  Vec<uint64_t> part_keys = poisoned<uint64_t>(groups * n * k), keys = poisoned<uint64_t>(n * k);
  Vec<float> part_max = poisoned<float>(groups * n), part_sum = poisoned<float>(groups * n);
  Vec<float> row_max = poisoned<float>(n), row_sum = poisoned<float>(n);
  launched(kc::similarity_topk_fused(dtype_of<T>(), x.data(), y.data(), n, c, d, &scale, &bias, k, groups,
                                     part_keys.data(), part_max.data(), part_sum.data(), keys.data(), row_max.data(),
                                     row_sum.data(), nullptr));
  finalize_and_check<T>(tag, keys, row_max, row_sum, logits, n, c, k);
}

// Top-k backward on the tensor cores: topk_backward_fused per class chunk (ds rows padded to 16 bytes, as the glue
// lays them out) against float64 on exact logits (features as in run_topk_fused), for `k` distinct random classes
// per row, values consistent with act and random gradients.
template <typename T>
void run_topk_backward_fused(int64_t n, int64_t c, int64_t d, int k, int64_t width, kc::Act act, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> quarters(-4, 4), eighths(-8, 8);
  std::normal_distribution<float> normal;
  const double u = std::is_same_v<T, __half> ? 0x1p-11 : 0x1p-8;
  const double tiny = std::is_same_v<T, __half> ? 0x1p-25 : 0.0;  // fp16 subnormals' half step
  const std::string tag = std::string(name_of<T>()) + " fused top-" + std::to_string(k) + " backward " +
                          (act == kc::Act::kSoftmax ? "softmax " : act == kc::Act::kSigmoid ? "sigmoid " : "none ") +
                          std::to_string(n) + "x" + std::to_string(c) + " D" + std::to_string(d) + " W" +
                          std::to_string(width);
  Vec<T> x(n * d), y(c * d);
  for (T& v : x) v = kc::from_float<T>(quarters(gen) / 4.f);
  for (T& v : y) v = kc::from_float<T>(eighths(gen) / 8.f);
  expect(kc::topk_backward_fused_supported(dtype_of<T>()), tag + " supported");
  const float scale = 0.5f, bias = -0.25f;
  std::vector<float> logits(n * c);
  Vec<float> lse(n);
  Vec<int64_t> indices(n * k);
  Vec<T> values(n * k), grad(n * k);
  for (int64_t i = 0; i < n; ++i) {
    double m = -INFINITY, sum = 0;
    for (int64_t j = 0; j < c; ++j) {
      double dot = 0;
      for (int64_t q = 0; q < d; ++q) dot += double(kc::to_float(x[i * d + q])) * kc::to_float(y[j * d + q]);
      logits[i * c + j] = std::fmaf(scale, static_cast<float>(dot), bias);  // dot is exact in fp32
      m = std::max(m, double(logits[i * c + j]));
    }
    for (int64_t j = 0; j < c; ++j) sum += std::exp(logits[i * c + j] - m);
    lse[i] = static_cast<float>(m + std::log(sum));
    std::vector<int64_t> classes(c);
    for (int64_t j = 0; j < c; ++j) classes[j] = j;
    std::shuffle(classes.begin(), classes.end(), gen);
    for (int q = 0; q < k; ++q) {
      const double l = logits[i * c + classes[q]];
      indices[i * k + q] = classes[q];
      values[i * k + q] = kc::from_float<T>(float(act == kc::Act::kSoftmax   ? std::exp(l - lse[i])
                                                  : act == kc::Act::kSigmoid ? 1 / (1 + std::exp(-l))
                                                                             : l));
      grad[i * k + q] = kc::from_float<T>(normal(gen));
    }
  }
  const int64_t ld = (width + 7) / 8 * 8;
  Vec<T> ds = poisoned<T>(n * ld);
  Vec<float> tile_sums = poisoned<float>((width + 127) / 128 * n), row_sum = poisoned<float>(n);
  double worst = 0, worst_sum = 0;
  std::vector<double> want_sum(n, 0.0), sum_size(n, 0.0);
  for (int64_t c0 = 0; c0 < c; c0 += width) {
    const int64_t w = std::min(width, c - c0), stride = (w + 7) / 8 * 8;
    launched(kc::topk_backward_fused(dtype_of<T>(), x.data(), y.data() + c0 * d, n, w, d, c0, &scale, &bias,
                                     lse.data(), indices.data(), values.data(), grad.data(), k, act, ds.data(), stride,
                                     tile_sums.data(), row_sum.data(), c0 == 0, nullptr));
    for (int64_t i = 0; i < n; ++i) {
      double r = 0, r_size = 0;
      for (int q = 0; q < k; ++q) {
        r += double(kc::to_float(grad[i * k + q])) * kc::to_float(values[i * k + q]);
        r_size += std::abs(double(kc::to_float(grad[i * k + q])) * kc::to_float(values[i * k + q]));
      }
      for (int64_t j = 0; j < w; ++j) {
        int rank = -1;
        for (int q = 0; q < k; ++q) rank = indices[i * k + q] == c0 + j ? q : rank;
        double want = 0, bound = tiny + 1e-30;
        if (rank >= 0) {
          const double gq = kc::to_float(grad[i * k + rank]), vq = kc::to_float(values[i * k + rank]);
          want = act == kc::Act::kSoftmax ? vq * (gq - r) : act == kc::Act::kSigmoid ? gq * vq * (1 - vq) : gq;
          bound += u * std::abs(want) + 0x1p-20 * std::abs(vq) * (std::abs(gq) + r_size);
        } else if (act == kc::Act::kSoftmax) {
          const double p = std::exp(logits[i * c + c0 + j] - double(lse[i]));
          want = -p * r;
          bound += u * std::abs(want) + 1e-5 * p * r_size;  // exp's argument rounded in fp32, r's fp32 sum
        }
        const double err = std::abs(kc::to_float(ds[i * stride + j]) - want) / bound;
        worst = std::isnan(err) ? NAN : std::max(worst, err);
        want_sum[i] += want;
        sum_size[i] += std::abs(want) + bound;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const double err = std::abs(row_sum[i] - want_sum[i]) / (1e-5 * sum_size[i] + 1e-30);
    worst_sum = std::isnan(err) ? NAN : std::max(worst_sum, err);
  }
  expect_error(worst, 1.0, tag + " ds (error / bound)");
  expect_error(worst_sum, 1.0, tag + " row sums (error / bound)");
  const float one = 1.f;
  expect(kc::topk_backward_fused(dtype_of<T>(), x.data(), y.data(), n, 9, d, 0, &one, nullptr, lse.data(),
                                 indices.data(), values.data(), grad.data(), k, act, ds.data(), 8, tile_sums.data(),
                                 row_sum.data(), true, nullptr) == cudaErrorInvalidValue,
         tag + " ds rows narrower than the chunk rejected");
}

// topk_fused_groups: at least one and at most min(column tiles, 2048 / k) groups, none without a tile, and enough
// (row tile, group) blocks for 2 per SM where the shape allows it.
void check_topk_fused_groups() {
  bool ok = true;
  for (const int64_t rows : {1, 128, 129, 4096, 65536})
    for (const int64_t cols : {1, 129, 1000, 21843, 1 << 20})
      for (const int k : {1, 5, 32})
        for (const int sms : {1, 132}) {
          const int groups = kc::topk_fused_groups(rows, cols, k, sms);
          const int64_t row_tiles = (rows + 127) / 128, col_tiles = (cols + 127) / 128;
          const int64_t most = std::min<int64_t>(col_tiles, 2048 / k);
          const int64_t per_group = (col_tiles + groups - 1) / groups;
          ok = ok && groups >= 1 && groups <= most && (groups - 1) * per_group < col_tiles;
          // fewer groups than the device asks for only where more would break the bounds (with rounding to whole
          // tiles per group losing at most half)
          const int64_t wanted = std::min<int64_t>(most, (2 * sms + row_tiles - 1) / row_tiles);
          ok = ok && (row_tiles * groups >= 2 * sms || 2 * groups >= wanted);
        }
  expect(ok, "topk_fused_groups bounds");
  expect(kc::topk_fused_groups(4096, 21843, 32, 132) == 9, "topk_fused_groups at N=4096, C=21843, k=32, 132 SMs");
  // Bad arguments answered, never launched: k past one lane each, too many groups for the merge's sort buffer.
  const float one = 1.f;
  expect(!kc::similarity_topk_fused_supported(kc::DType::kFloat32, 5, 100), "fused top-k: fp32 not supported");
  expect(!kc::similarity_topk_fused_supported(kc::DType::kFloat16, 33, 100), "fused top-k: k = 33 not supported");
  expect(kc::similarity_topk_fused(kc::DType::kFloat16, nullptr, nullptr, 1, 1, 8, &one, nullptr, 33, 1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr, nullptr, nullptr) == cudaErrorInvalidValue,
         "fused top-k: k = 33 rejected");
  expect(kc::similarity_topk_fused(kc::DType::kFloat16, nullptr, nullptr, 1, 1, 8, &one, nullptr, 32, 65, nullptr,
                                   nullptr, nullptr, nullptr, nullptr, nullptr, nullptr) == cudaErrorInvalidValue,
         "fused top-k: 65 groups of 32 rejected");
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
  // Rows: odd sizes (ragged vectors, a zero row), one row, and a row past one block's cached width.
  run_rows<float>(5, 37, 13, 7);
  run_rows<__half>(5, 37, 13, 8);
  run_rows<__nv_bfloat16>(3, 1001, 200, 9);
  run_rows<float>(1, 1, 1, 10);
  // Top-k: k of 1, 5 and a chunk narrower than k's sort buffer; the chunks split the classes unevenly.
  run_topk<float>(4, 300, 128, 5, 11);
  run_topk<__half>(3, 1001, 256, 1, 12);
  run_topk<__nv_bfloat16>(2, 130, 64, 37, 13);
  // Fused top-k: a second row tile and a ragged last column tile split over 2 groups; k = 32 (the limit) over 3
  // uneven groups; k = 1 in one group; a single ragged tile barely wider than k; more groups than tiles (empty
  // groups merge as nothing).
  check_topk_fused_groups();
  run_topk_fused<__half>(130, 301, 24, 5, 2, 14);
  run_topk_fused<__nv_bfloat16>(17, 1000, 16, 32, 3, 15);
  run_topk_fused<__half>(3, 129, 8, 1, 1, 16);
  run_topk_fused<__nv_bfloat16>(5, 40, 72, 32, 1, 17);
  run_topk_fused<__half>(9, 200, 8, 3, 4, 18);
  run_topk_fused<__nv_bfloat16>(1, 129, 8, 2, 2, 23);  // one row
  // Fused top-k backward: two chunks, the last one odd (padded ds rows), a second row tile; sigmoid and none; one
  // chunk narrower than a tile with k = 32; k = 100 across three chunks.
  run_topk_backward_fused<__half>(130, 301, 24, 5, 256, kc::Act::kSoftmax, 19);
  run_topk_backward_fused<__nv_bfloat16>(17, 200, 16, 3, 128, kc::Act::kSigmoid, 20);
  run_topk_backward_fused<__half>(5, 40, 72, 32, 40, kc::Act::kNone, 21);
  run_topk_backward_fused<__nv_bfloat16>(3, 300, 8, 100, 128, kc::Act::kSoftmax, 22);
  run_topk_backward_fused<__half>(1, 9, 8, 9, 9, kc::Act::kSoftmax, 24);  // one row, k = C in one odd chunk
  std::printf("similarity_softmax_emulated: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
