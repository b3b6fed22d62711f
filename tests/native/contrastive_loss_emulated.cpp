// Runs the CUDA contrastive-loss kernels (csrc/cuda/contrastive_loss.cu, through its real launchers) on CPU
// threads with tests/native/cuda_emulation.h and checks what they compute against float64 references
// computed here. Run by tests/test_cuda_emulation.py, without arguments (every check below) or with a features
// file (check_siglip_scalar_gradients only); prints one line per failed check and a summary, and exits with 0
// only if every check passed.
//
// The driver does the operator glue's part (csrc/cuda/contrastive_loss_api.cpp): the same column-chunk
// loop, scratch buffers and launcher calls, with cuBLAS's GEMMs replaced by float64 products rounded to
// fp32 (a chunk's dots rows @ cols_chunk^T, then dX @ cols_chunk and dX^T @ rows).
#include "cuda_emulation.h"
#include "emulated_checks.h"

#include "../../csrc/cuda/contrastive_loss.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace kc = mmfast::cuda;
using namespace mmfast_emulation::checks;

// ||got - want|| / ||size||, size = the magnitudes behind want (want itself, or the sum of the absolute values
// of the terms summed into it, which cancellation does not shrink); a zero size needs an exactly zero result.
void expect_close(const std::vector<double>& got, const std::vector<double>& want, const std::vector<double>& size,
                  double tol, const std::string& what) {
  double num = 0, den = 0;
  for (size_t k = 0; k < got.size(); ++k) {
    num += (got[k] - want[k]) * (got[k] - want[k]);
    den += size[k] * size[k];
  }
  expect_error(std::sqrt(num) / std::max(std::sqrt(den), 1e-300), tol, what);
}

// Largest |got - want| / size.
void expect_each(const float* got, const std::vector<double>& want, double size, double tol,
                 const std::string& what) {
  double err = 0;
  for (size_t k = 0; k < want.size(); ++k) err = std::max(err, std::abs(got[k] - want[k]) / size);
  expect_error(err, tol, what);
}

// ---- a block: features, the exact dot products and the glue's chunk loop --------------------------------
struct Shape {
  int64_t bi, bt, d, width, label_offset;
  float scale;
  std::optional<float> bias;
  float coefficient;  // size of the upstream gradients grad_row_lse / grad_col_lse / grad_pos_logits
};

template <typename T>
struct Block {
  Shape s;
  std::string tag;
  std::vector<T> rows, cols;          // [bi, d], [bt, d]
  std::vector<double> rows64, cols64;  // their values
  std::vector<double> dots;            // [bi, bt], exact products of the rounded features

  // Features 0.5 * N(0, 1) rounded to T. confident (offset 0, d > bi, bt): rows_i = e_i + e_last and
  // cols_j = e_j - e_last plus 0.01 * N(0, 1), so the dots are ~0 for the positives and ~-1 elsewhere: each
  // positive's probability is 1 - O(bt * e^-scale) while its logit stays near 0, where fp32 resolves it.
  Block(const Shape& shape, unsigned seed, bool confident = false) : s(shape), rows(s.bi * s.d), cols(s.bt * s.d) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal;
    const float noise = confident ? 0.01f : 0.5f;
    for (int64_t i = 0; i < s.bi; ++i)
      for (int64_t k = 0; k < s.d; ++k)
        rows[i * s.d + k] = kc::from_float<T>(noise * normal(gen) + (confident && (k == i || k == s.d - 1)));
    for (int64_t j = 0; j < s.bt; ++j)
      for (int64_t k = 0; k < s.d; ++k)
        cols[j * s.d + k] = kc::from_float<T>(noise * normal(gen) + (confident ? (k == j) - (k == s.d - 1) : 0));
    finish(confident ? " confident" : "");
  }

  // Given features (already T values).
  Block(const Shape& shape, std::vector<T> r, std::vector<T> c, const char* label)
      : s(shape), rows(std::move(r)), cols(std::move(c)) {
    finish(label);
  }

  void finish(const char* label) {
    for (const T& v : rows) rows64.push_back(kc::to_float(v));
    for (const T& v : cols) cols64.push_back(kc::to_float(v));
    dots.resize(s.bi * s.bt);
    for (int64_t i = 0; i < s.bi; ++i)
      for (int64_t j = 0; j < s.bt; ++j) {
        double sum = 0;
        for (int64_t k = 0; k < s.d; ++k) sum += rows64[i * s.d + k] * cols64[j * s.d + k];
        dots[i * s.bt + j] = sum;
      }
    tag = std::string(name_of<T>()) + " " + std::to_string(s.bi) + "x" + std::to_string(s.bt) + " D" +
          std::to_string(s.d) + " W" + std::to_string(s.width) + " offset " + std::to_string(s.label_offset) + label;
  }

  const float* scale() const { return &s.scale; }
  const float* bias() const { return s.bias ? &*s.bias : nullptr; }
  double bias_value() const { return s.bias.value_or(0.f); }
  double logit(int64_t i, int64_t j) const { return s.scale * dots[i * s.bt + j] + bias_value(); }

  // f(c0, w, dots) per column chunk, dots = the chunk's fp32 GEMM output [bi, w] in a scratch of bi * width.
  template <typename F>
  void chunks(F&& f) const {
    Vec<float> scratch = poisoned<float>(s.bi * s.width);
    for (int64_t c0 = 0; c0 < s.bt; c0 += s.width) {
      const int64_t w = std::min(s.width, s.bt - c0);
      for (int64_t i = 0; i < s.bi; ++i)
        for (int64_t j = 0; j < w; ++j) scratch[i * w + j] = static_cast<float>(dots[i * s.bt + c0 + j]);
      f(c0, w, scratch.data());
    }
  }
};

// The features in 16-byte aligned storage, as the glue passes them to the fused kernels.
template <typename T>
struct AlignedFeatures {
  Vec<T> rows, cols;
  explicit AlignedFeatures(const Block<T>& b)
      : rows(b.rows.begin(), b.rows.end()), cols(b.cols.begin(), b.cols.end()) {}
};

// ---- CLIP forward -------------------------------------------------------------------------------------
struct Forward {
  Vec<float> row_lse, col_lse, pos_logits;
};

// fused: fp16/bf16 through the tensor-core kernel that makes its own dots (clip_forward_fused), over the same
// chunks; otherwise the glue's GEMM (float64 products rounded to fp32) and the two passes.
template <typename T>
Forward clip_forward(const Block<T>& b, bool fused = false) {
  const Shape& s = b.s;
  Forward out{poisoned<float>(s.bi), poisoned<float>(s.bt), Vec<float>(s.bi, 0.f)};  // the glue zeroes pos_logits
  // Running row state only when there is more than one chunk (the glue passes null otherwise).
  const int64_t state = s.bt > s.width ? s.bi : 0;
  Vec<float> row_max = poisoned<float>(state), row_sum = poisoned<float>(state);
  if (fused) {
    Vec<float> partial = poisoned<float>(2 * kc::clip_fused_stripes(s.bi) * s.width);
    const AlignedFeatures<T> features(b);
    expect(kc::fused_tiles_supported(dtype_of<T>()), b.tag + " fused forward supported");
    for (int64_t c0 = 0; c0 < s.bt; c0 += s.width) {
      const int64_t w = std::min(s.width, s.bt - c0);
      launched(kc::clip_forward_fused(dtype_of<T>(), features.rows.data(), features.cols.data(), s.bi, s.d, w, c0,
                                      b.scale(), b.bias(),
                                      s.label_offset, c0 == 0, c0 + w == s.bt, data_or_null(row_max),
                                      data_or_null(row_sum), out.row_lse.data(), out.pos_logits.data(),
                                      partial.data(), out.col_lse.data() + c0, nullptr));
    }
    return out;
  }
  Vec<float> partial = poisoned<float>(2 * kc::clip_col_slices(s.bi) * s.width);
  b.chunks([&](int64_t c0, int64_t w, const float* dots) {
    launched(kc::clip_forward_rows(dots, s.bi, w, c0, b.scale(), b.bias(), s.label_offset, c0 == 0, c0 + w == s.bt,
                                   data_or_null(row_max), data_or_null(row_sum), out.row_lse.data(),
                                   out.pos_logits.data(), nullptr));
    launched(kc::clip_forward_cols(dots, s.bi, w, b.scale(), b.bias(), partial.data(), out.col_lse.data() + c0,
                                   nullptr));
  });
  return out;
}

double lse(const std::vector<double>& x) {
  double m = -INFINITY, sum = 0;
  for (double v : x) m = std::max(m, v);
  for (double v : x) sum += std::exp(v - m);
  return m + std::log(sum);
}

template <typename T>
void check_clip_forward(const Block<T>& b, const Forward& f, const std::string& path = "") {
  const Shape& s = b.s;
  std::vector<double> row_lse(s.bi), col_lse(s.bt), pos(s.bi, 0.0), x;
  for (int64_t i = 0; i < s.bi; ++i) {
    x.clear();
    for (int64_t j = 0; j < s.bt; ++j) x.push_back(b.logit(i, j));
    row_lse[i] = lse(x);
    const int64_t jp = i + s.label_offset;
    if (jp >= 0 && jp < s.bt) pos[i] = b.logit(i, jp);
  }
  for (int64_t j = 0; j < s.bt; ++j) {
    x.clear();
    for (int64_t i = 0; i < s.bi; ++i) x.push_back(b.logit(i, j));
    col_lse[j] = lse(x);
  }
  // The dots, x = scale * dot and + bias are each rounded to fp32: 8 ulps of the largest term.
  double size = 1;
  for (double dot : b.dots) size = std::max(size, std::abs(s.scale * dot) + std::abs(b.bias_value()));
  const std::string tag = b.tag + path;
  expect_each(f.row_lse.data(), row_lse, size, 0x1p-21, tag + " row_lse");
  expect_each(f.col_lse.data(), col_lse, size, 0x1p-21, tag + " col_lse");
  expect_each(f.pos_logits.data(), pos, size, 0x1p-21, tag + " pos_logits");
  if (s.bi == 1 && s.bt == 1 && s.label_offset == 0) {  // log1p(0) = 0: the CLIP loss of one pair is exactly 0
    expect(f.row_lse[0] == f.pos_logits[0] && f.col_lse[0] == f.pos_logits[0], tag + " 1x1 lse == positive logit");
  }
}

// ---- gradients ------------------------------------------------------------------------------------------
struct Gradients {
  std::vector<double> rows, cols;  // the input dtype's values
  float scale = NAN, bias = NAN, loss = NAN;
};

// The gradient factor (fp16 only, as the glue): f in factor[0], 1 / f in factor[1].
template <typename T>
Vec<float> gradient_factor(const float* a, int64_t na, const float* b, int64_t nb, const float* c, int64_t nc,
                           float extra) {
  if (!std::is_same_v<T, __half>) return {};
  Vec<float> factor = poisoned<float>(2);
  launched(kc::gradient_factor(a, na, b, nb, c, nc, extra, factor.data(), nullptr));
  return factor;
}

// The glue's GradGemms: per chunk tile(c0, w, dots, dx) writes dX (T, f * dL/dx), then grad_rows +=
// dX @ cols_chunk (an fp32 accumulator) and grad_cols[chunk] = dX^T @ rows, each scaled by scale / f into
// the input dtype by scale_to_dtype (in place for fp32, as the glue does: src == dst).
template <typename T, typename Tile>
void feature_gradients(const Block<T>& b, Vec<float>& factor, Gradients& g, Tile&& tile) {
  const Shape& s = b.s;
  Vec<T> dx = poisoned<T>(s.bi * s.width);
  constexpr bool fp32 = std::is_same_v<T, float>;
  Vec<float> acc(s.bi * s.d), cols_f32 = poisoned<float>(fp32 ? 0 : s.width * s.d);
  Vec<T> grad_cols = poisoned<T>(s.bt * s.d), grad_rows = poisoned<T>(fp32 ? 0 : s.bi * s.d);
  const float* f = data_or_null(factor);
  b.chunks([&](int64_t c0, int64_t w, const float* dots) {
    tile(c0, w, dots, dx.data());
    std::vector<double> g64;  // dX [bi, w]
    for (int64_t k = 0; k < s.bi * w; ++k) g64.push_back(kc::to_float(dx[k]));
    for (int64_t i = 0; i < s.bi; ++i)
      for (int64_t k = 0; k < s.d; ++k) {
        double sum = 0;
        for (int64_t j = 0; j < w; ++j) sum += g64[i * w + j] * b.cols64[(c0 + j) * s.d + k];
        acc[i * s.d + k] = (c0 == 0 ? 0.f : acc[i * s.d + k]) + static_cast<float>(sum);
      }
    float* chunk_f32 = cols_f32.data();
    if constexpr (fp32) chunk_f32 = grad_cols.data() + c0 * s.d;
    for (int64_t j = 0; j < w; ++j)
      for (int64_t k = 0; k < s.d; ++k) {
        double sum = 0;
        for (int64_t i = 0; i < s.bi; ++i) sum += g64[i * w + j] * b.rows64[i * s.d + k];
        chunk_f32[j * s.d + k] = static_cast<float>(sum);
      }
    launched(kc::scale_to_dtype(dtype_of<T>(), chunk_f32, w * s.d, b.scale(), f, grad_cols.data() + c0 * s.d, nullptr));
  });
  T* rows_out = grad_rows.data();
  if constexpr (fp32) rows_out = acc.data();
  launched(kc::scale_to_dtype(dtype_of<T>(), acc.data(), s.bi * s.d, b.scale(), f, rows_out, nullptr));
  for (int64_t k = 0; k < s.bi * s.d; ++k) g.rows.push_back(kc::to_float(rows_out[k]));
  for (const T& v : grad_cols) g.cols.push_back(kc::to_float(v));
}

// Checks g against dL/dx = G (float64, [bi, bt]): grad_rows = scale * G @ cols, grad_cols = scale * G^T @ rows,
// grad_scale = sum G * dots, grad_bias = sum G.
template <typename T>
void check_gradients(const Block<T>& b, const std::vector<double>& G, const Gradients& g, const std::string& what) {
  const Shape& s = b.s;
  std::vector<double> rows(s.bi * s.d, 0.0), cols(s.bt * s.d, 0.0), rows_size(s.bi * s.d, 0.0),
      cols_size(s.bt * s.d, 0.0);
  double gs = 0, gb = 0, gs_size = 0, gb_size = 0;
  for (int64_t i = 0; i < s.bi; ++i)
    for (int64_t j = 0; j < s.bt; ++j) {
      const double v = s.scale * G[i * s.bt + j];
      for (int64_t k = 0; k < s.d; ++k) {
        const double c = b.cols64[j * s.d + k], r = b.rows64[i * s.d + k];
        rows[i * s.d + k] += v * c;
        cols[j * s.d + k] += v * r;
        rows_size[i * s.d + k] += std::abs(v * c);
        cols_size[j * s.d + k] += std::abs(v * r);
      }
      gs += G[i * s.bt + j] * b.dots[i * s.bt + j];
      gs_size += std::abs(G[i * s.bt + j] * b.dots[i * s.bt + j]);
      gb += G[i * s.bt + j];
      gb_size += std::abs(G[i * s.bt + j]);
    }
  // Each term is rounded to T once in dX and each output once (unit roundoff u): 4u leaves room for both.
  // In fp32 the exponentials
  // dominate: their arguments (|x| <= ~30) carry up to ~30 ulps of 1 (tolerance 32 ulps, 2^-19).
  const double u = std::is_same_v<T, float> ? 0x1p-24 : std::is_same_v<T, __half> ? 0x1p-11 : 0x1p-8;
  const double tol = std::is_same_v<T, float> ? 0x1p-19 : 4 * u;
  const std::string tag = b.tag + " " + what;
  expect_close(g.rows, rows, rows_size, tol, tag + " grad_rows");
  expect_close(g.cols, cols, cols_size, tol, tag + " grad_cols");
  // Sums of the fp32 dL/dx, not rounded to T.
  expect_close({g.scale}, {gs}, {gs_size}, 0x1p-19, tag + " grad_scale");
  expect_close({g.bias}, {gb}, {gb_size}, 0x1p-19, tag + " grad_bias");
}

// ---- CLIP backward: each upstream gradient may be absent (null) --------------------------------------------
// fused: the chunk tiles from clip_backward_fused (its own tensor-core dots) instead of clip_backward_tile.
template <typename T>
void clip_backward(const Block<T>& b, const Forward& f, const std::vector<float>* grad_row,
                   const std::vector<float>* grad_col, const std::vector<float>* grad_pos, const std::string& what,
                   bool fused = false) {
  const Shape& s = b.s;
  const float* gr = grad_row ? grad_row->data() : nullptr;
  const float* gc = grad_col ? grad_col->data() : nullptr;
  const float* gp = grad_pos ? grad_pos->data() : nullptr;
  // |dL/dx| <= |grad_row| + |grad_col| + |grad_pos|: probabilities are <= 1.
  Vec<float> factor = gradient_factor<T>(gr, s.bi, gc, s.bt, gp, s.bi, 0.f);
  Vec<double> row_gdot = poisoned<double>(s.bi), row_g = poisoned<double>(s.bi);
  Gradients g;
  const AlignedFeatures<T> features(b);
  feature_gradients(b, factor, g, [&](int64_t c0, int64_t w, const float* dots, T* dx) {
    if (fused) {
      launched(kc::clip_backward_fused(dtype_of<T>(), features.rows.data(), features.cols.data(), s.bi, s.d, w, c0,
                                       b.scale(), b.bias(), s.label_offset, f.row_lse.data(), f.col_lse.data(), gr, gc,
                                       gp, data_or_null(factor), dx, row_gdot.data(), row_g.data(), c0 == 0, nullptr));
      return;
    }
    launched(kc::clip_backward_tile(dtype_of<T>(), dots, s.bi, w, c0, b.scale(), b.bias(), s.label_offset,
                                    f.row_lse.data(), f.col_lse.data(), gr, gc, gp, data_or_null(factor), dx,
                                    row_gdot.data(), row_g.data(), c0 == 0, nullptr));
  });
  launched(kc::sum_rows(row_gdot.data(), row_g.data(), nullptr, s.bi, &g.scale, &g.bias, nullptr, nullptr));

  // The backward takes the forward's lse as given and recomputes x = scale * dot in fp32 as the forward did,
  // so the reference does too: P = exp(x - (lse - bias)) is then consistent with the lse, and a confident
  // positive's 1 - P is checked to its own precision.
  std::vector<double> G(s.bi * s.bt);
  for (int64_t i = 0; i < s.bi; ++i)
    for (int64_t j = 0; j < s.bt; ++j) {
      const double x = __fmul_rn(s.scale, static_cast<float>(b.dots[i * s.bt + j]));
      const double bias = b.bias_value();
      double v = 0;
      if (gr) v += gr[i] * std::exp(x - (double(f.row_lse[i]) - bias));
      if (gc) v += gc[j] * std::exp(x - (double(f.col_lse[j]) - bias));
      if (gp && j == i + s.label_offset) v += gp[i];
      G[i * s.bt + j] = v;
    }
  check_gradients(b, G, g, "clip " + what + (fused ? " fused" : ""));
}

// ---- SigLIP: loss (and gradients when compute_grad) ----------------------------------------------------------
// fused: the chunk tiles from siglip_fused (its own tensor-core dots) instead of siglip_tile.
template <typename T>
Gradients siglip(const Block<T>& b, bool has_positives, bool compute_grad, bool fused = false) {
  const Shape& s = b.s;
  const std::string what = std::string("siglip ") + (has_positives ? "positives" : "negatives only") +
                           (compute_grad ? "" : " loss only") + (fused ? " fused" : "");
  const AlignedFeatures<T> features(b);
  auto fused_tile = [&](int64_t c0, int64_t w, const float* factor, T* dx, double* row_loss, double* row_gdot,
                        double* row_g) {
    launched(kc::siglip_fused(dtype_of<T>(), features.rows.data(), features.cols.data(), s.bi, s.d, w, c0, b.scale(),
                              b.bias(), has_positives, factor, dx, row_loss, row_gdot, row_g, c0 == 0, nullptr));
  };
  Vec<double> row_loss = poisoned<double>(s.bi), row_gdot, row_g;
  Gradients g;
  if (compute_grad) {
    Vec<float> factor = gradient_factor<T>(nullptr, 0, nullptr, 0, nullptr, 0, 1.f);  // |sigmoid(x) - y| <= 1
    row_gdot = poisoned<double>(s.bi);
    row_g = poisoned<double>(s.bi);
    feature_gradients(b, factor, g, [&](int64_t c0, int64_t w, const float* dots, T* dx) {
      if (fused) return fused_tile(c0, w, data_or_null(factor), dx, row_loss.data(), row_gdot.data(), row_g.data());
      launched(kc::siglip_tile(dtype_of<T>(), dots, s.bi, w, c0, b.scale(), b.bias(), has_positives,
                               data_or_null(factor), dx, row_loss.data(), row_gdot.data(), row_g.data(), c0 == 0,
                               nullptr));
    });
  } else {
    b.chunks([&](int64_t c0, int64_t w, const float* dots) {
      if (fused) return fused_tile(c0, w, nullptr, nullptr, row_loss.data(), nullptr, nullptr);
      launched(kc::siglip_tile(dtype_of<T>(), dots, s.bi, w, c0, b.scale(), b.bias(), has_positives, nullptr, nullptr,
                               row_loss.data(), nullptr, nullptr, c0 == 0, nullptr));
    });
  }
  launched(kc::sum_rows(row_loss.data(), data_or_null(row_gdot), data_or_null(row_g), s.bi, &g.loss,
                        compute_grad ? &g.scale : nullptr, compute_grad ? &g.bias : nullptr, nullptr));

  std::vector<double> G(s.bi * s.bt);
  double loss = 0;
  for (int64_t i = 0; i < s.bi; ++i)
    for (int64_t j = 0; j < s.bt; ++j) {
      const double x = b.logit(i, j), y = has_positives && i == j ? 1.0 : -1.0;
      loss += std::max(-y * x, 0.0) + std::log1p(std::exp(-std::abs(x)));  // softplus(-y x)
      G[i * s.bt + j] = 1 / (1 + std::exp(-x)) - (y > 0 ? 1.0 : 0.0);
    }
  expect_close({g.loss}, {loss}, {loss}, 0x1p-19, b.tag + " " + what + " loss");
  if (compute_grad) check_gradients(b, G, g, what);
  return g;
}

// SigLIP's scalar gradients relative to their own value, on features read from `path` (int64 B, int64 D, float
// scale, float bias, then fp32 rows [B, D] and cols [B, D]); tests/test_cuda_emulation.py passes the fp32
// features of tests/test_contrastive_loss.py's B=128, D=768, scale 100, bias -10 case, where the GPU kernels
// missed the 1e-5 bound (issue 12). There dL/dbias = sum G = -0.35 while sum |G| = 226: a relative error of
// 1e-8 shared by every term moves it by 6e-6 of itself, which check_gradients (relative to sum |G|) cannot see.
// Two references: G on the kernel's own fp32 logits fmaf(dot32, scale, bias) isolates what the kernel adds
// (exponential, reciprocal, sums) from the rounding of its inputs; G on the exact logits is what the
// pytest compares with (2^-18 and 1e-5 of the value). Prints the kernel's values for the pytest.
int check_siglip_scalar_gradients(const char* path) {
  FILE* f = std::fopen(path, "rb");
  int64_t dims[2] = {0, 0};
  float scalars[2] = {0, 0};
  if (f == nullptr || std::fread(dims, sizeof dims, 1, f) != 1 || std::fread(scalars, sizeof scalars, 1, f) != 1) {
    std::fprintf(stderr, "cannot read %s\n", path);
    return 2;
  }
  const int64_t n = dims[0] * dims[1];
  std::vector<float> rows(n), cols(n);
  if (std::fread(rows.data(), sizeof(float), n, f) != size_t(n) ||
      std::fread(cols.data(), sizeof(float), n, f) != size_t(n)) {
    std::fprintf(stderr, "short file %s\n", path);
    return 2;
  }
  std::fclose(f);
  const int64_t width = std::min(dims[0], kc::kLossMaxChunk);  // the glue's chunk width (no halving below 2^13 rows)
  const Block<float> b({dims[0], dims[0], dims[1], width, 0, scalars[0], scalars[1], 0.f}, rows, cols, " given");
  const Gradients g = siglip(b, true, true);
  double own_gs = 0, own_gb = 0, gs = 0, gb = 0;
  for (int64_t i = 0; i < b.s.bi; ++i)
    for (int64_t j = 0; j < b.s.bt; ++j) {
      const double pos = i == j ? 1.0 : 0.0, dot = b.dots[i * b.s.bt + j];
      const float dot32 = static_cast<float>(dot);
      const double own = 1 / (1 + std::exp(-double(std::fmaf(dot32, b.s.scale, *b.s.bias)))) - pos;
      own_gs += own * dot32;
      own_gb += own;
      const double exact = 1 / (1 + std::exp(-b.logit(i, j))) - pos;
      gs += exact * dot;
      gb += exact;
    }
  auto rel = [](double got, double want) { return std::abs(got - want) / std::abs(want); };
  std::printf("grad_logit_scale %.9g grad_logit_bias %.9g\n", g.scale, g.bias);
  std::printf("error relative to the value, against G of the kernel's fp32 logits: scale %.3g, bias %.3g; "
              "of the exact logits: scale %.3g, bias %.3g\n",
              rel(g.scale, own_gs), rel(g.bias, own_gb), rel(g.scale, gs), rel(g.bias, gb));
  // Against its own logits the kernel's terms carry the roundings of e, 1 + e, the reciprocal and the product
  // (measured 2.1e-6 of the bias gradient, 2.6e-6 with a correctly rounded exp in place of exp_nonpositive);
  // fast_exp's rounded argument made it 4.1e-6.
  expect_error(rel(g.scale, own_gs), 0x1p-18, b.tag + " grad_scale vs its fp32 logits, relative to itself");
  expect_error(rel(g.bias, own_gb), 0x1p-18, b.tag + " grad_bias vs its fp32 logits, relative to itself");
  expect_error(rel(g.scale, gs), 1e-5, b.tag + " grad_scale vs the exact logits, relative to itself");
  expect_error(rel(g.bias, gb), 1e-5, b.tag + " grad_bias vs the exact logits, relative to itself");
  std::printf("contrastive_loss_emulated %s: %d checks, %d failed\n", path, checks, failures);
  return failures == 0 ? 0 : 1;
}

// ---- one block through every path ----------------------------------------------------------------------
template <typename T>
void run(const Shape& shape, unsigned seed, bool confident = false) {
  const Block<T> b(shape, seed, confident);
  const Shape& s = b.s;
  const Forward f = clip_forward(b);
  check_clip_forward(b, f);
  if constexpr (!std::is_same_v<T, float>) check_clip_forward(b, clip_forward(b, true), " fused");

  std::mt19937 gen(seed + 1000);
  std::normal_distribution<float> normal;
  std::vector<float> gr(s.bi), gc(s.bt), gp(s.bi);
  if (confident) {  // as the symmetric loss's: gp = -(gr + gc)
    for (int64_t i = 0; i < s.bi; ++i) {
      gr[i] = gc[i] = s.coefficient;
      gp[i] = -2 * s.coefficient;
    }
  } else {
    for (auto* v : {&gr, &gc, &gp})
      for (float& x : *v) x = s.coefficient * normal(gen);
  }
  for (const bool fused : {false, true}) {
    if (fused && std::is_same_v<T, float>) break;  // the fused tiles are fp16/bf16 only
    clip_backward(b, f, &gr, &gc, &gp, "row+col+pos", fused);
    clip_backward(b, f, &gr, nullptr, nullptr, "row", fused);
    clip_backward(b, f, nullptr, &gc, &gp, "col+pos", fused);
    clip_backward(b, f, nullptr, nullptr, &gp, "pos", fused);
    clip_backward(b, f, nullptr, nullptr, nullptr, "none", fused);  // every gradient exactly 0
    siglip(b, true, true, fused);
    siglip(b, false, true, fused);
    siglip(b, true, false, fused);
  }
}

// f = 2^k puts bound = max|a| + max|b| + max|c| + extra into [2^11, 2^12); k within [-100, 100]; f = 1 for a
// bound of 0 or inf.
void check_gradient_factor(const std::vector<float>& a, const std::vector<float>& b, float extra, const char* what) {
  Vec<float> va(a.begin(), a.end()), vb(b.begin(), b.end()), factor = poisoned<float>(2);
  launched(kc::gradient_factor(data_or_null(va), va.size(), data_or_null(vb), vb.size(), nullptr, 0, extra,
                               factor.data(), nullptr));
  double bound = extra;
  for (const auto* v : {&a, &b}) {
    double m = 0;
    for (float x : *v) m = std::max(m, double(std::abs(x)));
    bound += m;
  }
  double want = 1;
  if (bound > 0 && std::isfinite(bound)) {
    want = std::ldexp(1.0, std::clamp(11 - static_cast<int>(std::floor(std::log2(bound))), -100, 100));
  }
  char numbers[64];
  std::snprintf(numbers, sizeof numbers, ": got %g, want %g", factor[0], want);
  expect(factor[0] == want && factor[1] == 1 / want, std::string("gradient_factor ") + what + numbers);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2) return check_siglip_scalar_gradients(argv[1]);
  // 1 x 1 blocks: the lse equals the positive logit bit for bit.
  run<float>({1, 1, 3, 1, 0, 3.f, std::nullopt, 0.5f}, 1);
  run<__half>({1, 1, 8, 1, 0, 2.f, -1.25f, 0.5f}, 2);
  run<__nv_bfloat16>({1, 1, 8, 1, 0, 2.f, -1.25f, 0.5f}, 3);
  // Width 7 splits 23 columns 7 + 7 + 7 + 2; the positives (offset 3) straddle every chunk boundary.
  run<float>({37, 23, 5, 7, 3, 2.5f, -1.25f, 0.01f}, 4);
  // 300 rows: two column slices of 150 (the 4-deep unrolled loop and its remainder) and a last row block
  // of 4 rows; no positive for rows 0-4 (offset -5).
  run<float>({300, 41, 3, 13, -5, 4.f, -1.25f, 1e-3f}, 5);
  // Only rows 0-9 have a positive (offset 40), in the chunks [33, 44) and [44, 50); no bias in bf16.
  run<__half>({45, 50, 9, 11, 40, 6.f, -1.25f, 0.01f}, 6);
  run<__nv_bfloat16>({20, 33, 8, 16, -3, 6.f, std::nullopt, 1e-3f}, 7);
  // fp16 with coefficients 2e-6: every dL/dx is subnormal in fp16 (as CLIP's ~1 / B are from B = 16384 on)
  // unless the gradient factor lifts it; the outputs, ~scale * 2e-6, are normal.
  run<__half>({16, 24, 4, 10, 0, 200.f, std::nullopt, 2e-6f}, 8);
  // One 600-wide chunk: the unrolled 16-byte vector sweeps with scalar heads and tails at every alignment;
  // no running row state in the glue.
  run<float>({9, 600, 4, 600, 0, 2.f, -1.25f, 0.1f}, 9);
  run<__half>({5, 600, 4, 600, 1, 2.f, std::nullopt, 0.5f}, 10);
  // No positive in the block: labels all to the right, all to the left.
  run<float>({12, 10, 4, 4, 10, 3.f, -1.25f, 0.1f}, 11);
  run<__nv_bfloat16>({12, 10, 4, 3, -12, 3.f, std::nullopt, 0.1f}, 12);
  // The fused tensor-core forward's edges: three 64-row stripes (the last of 22 rows), 64-column tiles ragged at
  // 70 and 140, feature slices of 64 with a ragged third; d = 130 puts rows at 260-byte strides (the tile loads'
  // element-wise path), d = 128 at 16-byte aligned ones (the 16-byte path).
  run<__half>({150, 140, 130, 70, 2, 3.f, -1.25f, 0.01f}, 15);
  run<__nv_bfloat16>({70, 140, 128, 140, -1, 2.f, std::nullopt, 0.01f}, 16);
  // SigLIP at open_clip's init (scale 10, bias -10).
  run<__half>({16, 24, 8, 10, 0, 10.f, -10.f, 1e-3f}, 13);
  // Confident positives (1 - P ~ 1.4e-4) under the symmetric loss's gradients: the positive's dL/dx =
  // -gr (1 - P_row) - gc (1 - P_col) keeps its precision in the expm1 form; as p - 1 it would lose half an
  // ulp of 1 (3e-8) out of 1.4e-4.
  run<float>({24, 24, 25, 9, 0, 12.f, std::nullopt, 1.f / 48}, 14, true);

  check_gradient_factor({0.5f, -3.f}, {1e-3f}, 0.f, "3.001");
  check_gradient_factor({}, {}, 1.f, "1 (SigLIP)");
  check_gradient_factor({}, {}, 0.f, "0");
  std::vector<float> long_a(3000, 1e-6f);  // more than the block's 1024 threads; the max last
  long_a.back() = -2e-5f;
  check_gradient_factor(long_a, {}, 0.f, "2e-5 at index 2999");
  check_gradient_factor({1e-38f}, {}, 0.f, "1e-38 (k clamped to 100)");
  check_gradient_factor({1e30f}, {}, 0.f, "1e30");
  check_gradient_factor({INFINITY}, {}, 0.f, "inf");

  std::printf("contrastive_loss_emulated: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
