// CPU kernels of mmfast::similarity_softmax, _backward, similarity_topk, _backward (schemas in
// csrc/mmfast.cpp, math in mmfast/ops/similarity_softmax.py).
//
// The floor on this CPU is the GEMM (N x C x D), so the kernels run MKL/oneDNN GEMMs on the RAW
// features and fold the normalization into scalars afterwards: s_ic = (scale*inv_i) * inv_c * dot_ic
// + bias. No normalized copies and no N x C temporaries besides the output (forward) or one ds
// buffer the size of grad_out (backward); the top-k ops keep only a [rows, class-tile] scratch.
//
// dtypes: fp32 and bf16 run GEMMs in their own dtype (bf16 on AMX). fp16 runs them in fp32 on
// converted copies of the features: raw dot products of features with norm >= 256 overflow fp16's
// 65504, and torch's CPU fp16 GEMM is no faster than fp32 here (31 ms vs 26 ms at 4096x1000x768).
// All elementwise math and reductions are fp32.
#include "mmfast/cpu_utils.h"  // first: selects at::vec's CPU_CAPABILITY

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

namespace mmfast {
namespace {

using at::Tensor;
using cpu::fVec;
using cpu::kVec;
using cpu::load_float;
using cpu::store_float;

constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up_to_vec(int64_t n) { return (n + kVec - 1) / kVec * kVec; }

// ---- arguments -----------------------------------------------------------------------------------
void check_features(const Tensor& image, const Tensor& text) {
  check_feature_pair(image, "image", text, "text", /*allow_double=*/false);
}

float scalar_arg(const Tensor& value, const char* name, const Tensor& image) {
  check_scalar_tensor(value, name, image);
  return value.item().toFloat();
}

float bias_arg(const std::optional<Tensor>& logit_bias, const Tensor& image) {
  return logit_bias.has_value() ? scalar_arg(*logit_bias, "logit_bias", image) : 0.f;
}

void check_inv_norm(const Tensor& inv, const char* name, int64_t rows) {
  MMFAST_CHECK(inv.scalar_type() == at::kFloat && inv.dim() == 1 && inv.size(0) == rows, name,
               " must be a float32 tensor of shape [", rows, "], got ", inv.scalar_type(), " of shape ", inv.sizes());
}

void check_like(const Tensor& x, const char* name, at::IntArrayRef shape, const Tensor& image) {
  MMFAST_CHECK(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
  MMFAST_CHECK(x.scalar_type() == image.scalar_type(), name, " is ", x.scalar_type(), " but image is ",
               image.scalar_type());
  MMFAST_CHECK(x.device() == image.device(), name, " is on ", x.device(), " but image is on ", image.device());
}

// The GEMM operand: contiguous, fp32 for fp16 inputs (see the top of the file).
Tensor gemm_operand(const Tensor& x) {
  return x.scalar_type() == at::kHalf ? x.to(at::kFloat).contiguous() : x.contiguous();
}

// Runs f.template operator()<G, T>() with G the GEMM dtype and T the input/output dtype.
template <typename F>
decltype(auto) dispatch_dtypes(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f.template operator()<float, float>();
    case at::kHalf:
      return f.template operator()<float, c10::Half>();
    case at::kBFloat16:
      return f.template operator()<c10::BFloat16, c10::BFloat16>();
    default:
      TORCH_CHECK(false, "mmfast: unsupported dtype ", dtype);
  }
}

// (inv_norm_image, inv_norm_text): 1/max(||row||, eps) in fp32, or ones without normalization.
std::pair<Tensor, Tensor> inverse_norms(const Tensor& img_g, const Tensor& txt_g, bool normalize) {
  auto opts = img_g.options().dtype(at::kFloat);
  Tensor inv_i = at::empty({img_g.size(0)}, opts), inv_t = at::empty({txt_g.size(0)}, opts);
  if (!normalize) {
    inv_i.fill_(1.f);
    inv_t.fill_(1.f);
    return {inv_i, inv_t};
  }
  const int64_t D = img_g.size(1);
  if (img_g.scalar_type() == at::kBFloat16) {
    cpu::inverse_row_norms(img_g.data_ptr<c10::BFloat16>(), img_g.size(0), D, inv_i.data_ptr<float>());
    cpu::inverse_row_norms(txt_g.data_ptr<c10::BFloat16>(), txt_g.size(0), D, inv_t.data_ptr<float>());
  } else {
    cpu::inverse_row_norms(img_g.data_ptr<float>(), img_g.size(0), D, inv_i.data_ptr<float>());
    cpu::inverse_row_norms(txt_g.data_ptr<float>(), txt_g.size(0), D, inv_t.data_ptr<float>());
  }
  return {inv_i, inv_t};
}

// A 0-dim fp32 tensor holding v (the scale/bias gradients).
Tensor fp32_scalar(double v, const Tensor& like) {
  Tensor t = at::empty({}, like.options().dtype(at::kFloat));
  t.data_ptr<float>()[0] = static_cast<float>(v);
  return t;
}

// The factor of row i's logits, scale * inv_i, rounded once (it is coherent along the row).
float row_factor(float scale, float inv_norm) {
  return static_cast<float>(static_cast<double>(scale) * static_cast<double>(inv_norm));
}

// ---- logits --------------------------------------------------------------------------------------
// s_c = a * inv_t[c] * dot[c] + bias for c in [0, C), into buf (padded to whole vectors with -inf, so
// the padding adds exp(-inf) = 0 to sums and never wins a max). Returns the row max (NaN-propagating).
template <typename G>
float logits_row(const G* dot, const float* inv_t, int64_t C, float a, float bias, float* buf) {
  const fVec va(a), vb(bias), neg_inf(-kInf);
  fVec vmax = neg_inf;
  for (int64_t c = 0; c < C; c += kVec) {
    const int64_t n = std::min<int64_t>(kVec, C - c);
    fVec s;
    if (n == kVec) {
      s = at::vec::fmadd(load_float(dot + c) * fVec::loadu(inv_t + c), va, vb);
    } else {
      s = at::vec::fmadd(load_float(dot + c, n) * fVec::loadu(inv_t + c, n), va, vb);
      s = fVec::set(neg_inf, s, n);
    }
    s.store(buf + c);
    vmax = at::vec::maximum(vmax, s);
  }
  return cpu::lanes_max(vmax);
}

// buf[c] = exp(buf[c] - m) over the padded row; returns the sum.
float exp_sub_sum_inplace(float* buf, int64_t padded, float m) {
  const fVec vm(m);
  cpu::RowSum sum;
  for (int64_t c = 0; c < padded; c += kVec) {
    const fVec e = cpu::exp_nonpositive(fVec::loadu(buf + c) - vm);
    e.store(buf + c);
    sum.add(e);
  }
  return static_cast<float>(sum.result());
}

// sum over the padded row of exp(buf[c] - m), buf unchanged.
float exp_sub_sum(const float* buf, int64_t padded, float m) {
  const fVec vm(m);
  cpu::RowSum sum;
  for (int64_t c = 0; c < padded; c += kVec) sum.add(cpu::exp_nonpositive(fVec::loadu(buf + c) - vm));
  return static_cast<float>(sum.result());
}

// One output row of the dense forward. `dot` may alias `out` (same dtype): every pass reads a
// position before (or in the same step as) the pass that writes it.
template <typename G, typename T>
void forward_row(const G* dot, T* out, float* buf, const float* inv_t, int64_t C, float a, float bias,
                 Activation act) {
  if (act == Activation::kSoftmax) {  // three passes over a row that stays in L1/L2
    const float m = logits_row(dot, inv_t, C, a, bias, buf);
    const fVec r(1.f / exp_sub_sum_inplace(buf, round_up_to_vec(C), m));
    for (int64_t c = 0; c < C; c += kVec) {
      store_float(out + c, fVec::loadu(buf + c) * r, std::min<int64_t>(kVec, C - c));
    }
    return;
  }
  const fVec va(a), vb(bias);
  for (int64_t c = 0; c < C; c += kVec) {  // sigmoid / none: one pass
    const int64_t n = std::min<int64_t>(kVec, C - c);
    const fVec d = n == kVec ? load_float(dot + c) : load_float(dot + c, n);
    const fVec s = at::vec::fmadd(d * fVec::loadu(inv_t + c, n), va, vb);
    store_float(out + c, act == Activation::kSigmoid ? cpu::sigmoid(s) : s, n);
  }
}

// ---- dense forward -------------------------------------------------------------------------------
// One GEMM over all rows into the output, then the row epilogue in parallel. Measured on the 2-core
// dev machine (single-threaded CPU time, 4096 x 1000 x 768; the GEMM's share of the two threads is
// the same either way): GEMMs over row blocks of 128-512 rows, each followed by its epilogue while
// the slab is cache-hot, cost 1.1-1.4x more in bf16 (oneDNN re-packs text per call) and the same in
// fp32. Each output row (4 KB at C=1000, 87 KB at C=21843) is itself the cache block of the three
// epilogue passes. The fp16 path (fp32 GEMM, fp16 output) goes through a scratch slab of
// kScratchRows rows instead.
constexpr int64_t kScratchRows = 256;

template <typename G, typename T>
void forward_rows(const G* dot_ptr, T* out_ptr, int64_t rows, int64_t C, const float* inv_i, const float* inv_t,
                  float scale, float bias, Activation act, float* buf) {
  for (int64_t i = 0; i < rows; ++i) {
    forward_row(dot_ptr + i * C, out_ptr + i * C, buf, inv_t, C, row_factor(scale, inv_i[i]), bias, act);
  }
}

template <typename G, typename T>
void forward_dense(const Tensor& img_g, const Tensor& txt_g, const float* inv_i, const float* inv_t, float scale,
                   float bias, Activation act, Tensor& out) {
  const int64_t N = img_g.size(0), C = txt_g.size(0);
  constexpr bool kGemmIntoOut = std::is_same_v<G, T>;
  const int64_t block = kGemmIntoOut ? N : std::min(N, kScratchRows);
  Tensor scratch = kGemmIntoOut ? Tensor() : at::empty({block, C}, img_g.options());
  const int64_t padded = round_up_to_vec(C);
  for (int64_t r0 = 0; r0 < N; r0 += block) {
    const int64_t rows = std::min(block, N - r0);
    Tensor dots = kGemmIntoOut ? out.narrow(0, r0, rows) : scratch.narrow(0, 0, rows);
    at::mm_out(dots, img_g.narrow(0, r0, rows), txt_g.t());
    const G* dot_ptr = dots.template data_ptr<G>();
    T* out_ptr = out.data_ptr<T>() + r0 * C;
    cpu::parallel_rows(rows, 3 * C, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(padded);
      forward_rows(dot_ptr + begin * C, out_ptr + begin * C, end - begin, C, inv_i + r0 + begin, inv_t, scale, bias,
                   act, buf.data());
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> similarity_softmax_cpu(const Tensor& image, const Tensor& text,
                                                         const Tensor& logit_scale,
                                                         const std::optional<Tensor>& logit_bias, bool normalize,
                                                         c10::string_view activation) {
  check_features(image, text);
  const Activation act = parse_activation(activation);
  const float scale = scalar_arg(logit_scale, "logit_scale", image);
  const float bias = bias_arg(logit_bias, image);
  const Tensor img_g = gemm_operand(image), txt_g = gemm_operand(text);
  auto [inv_i, inv_t] = inverse_norms(img_g, txt_g, normalize);
  Tensor out = at::empty({image.size(0), text.size(0)}, image.options());
  dispatch_dtypes(image.scalar_type(), [&]<typename G, typename T>() {
    forward_dense<G, T>(img_g, txt_g, inv_i.data_ptr<float>(), inv_t.data_ptr<float>(), scale, bias, act, out);
  });
  return {out, inv_i, inv_t};
}

// ---- backward through the normalization (shared by both backward ops) ----------------------------
// With Gp = inv_i * G (G = ds @ y, see below) for image rows, or Hp = inv_c * H for text rows:
//   grad_row = scale * (Gp - [norm not clamped] * inv^2 * (feat . Gp) * feat)
// which is inv * (dx - x (x . dx)) with dx = scale * G, x = inv * feat (F.normalize's gradient).
// Returns sum_r feat_r . Gp_r = sum_r x_r . G_r, the logit_scale gradient (from the image side).
template <typename F, typename P, typename T>
double normalize_backward(const F* feat, const P* gproj, const float* inv, int64_t rows, int64_t D, float scale,
                          bool normalize, T* grad) {
  std::vector<float> row_dot(rows);
  cpu::parallel_rows(rows, 2 * D, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const F* f = feat + r * D;
      const P* g = gproj + r * D;
      fVec acc(0.f);
      int64_t d = 0;
      for (; d + kVec <= D; d += kVec) acc = at::vec::fmadd(load_float(f + d), load_float(g + d), acc);
      if (d < D) acc = at::vec::fmadd(load_float(f + d, D - d), load_float(g + d, D - d), acc);
      const float t = cpu::lanes_sum(acc);
      row_dot[r] = t;
      const bool project = normalize && !cpu::norm_was_clamped(inv[r]);
      const fVec coef(project ? inv[r] * inv[r] * t : 0.f), vs(scale);
      T* out = grad + r * D;
      for (d = 0; d < D; d += kVec) {
        const int64_t n = std::min<int64_t>(kVec, D - d);
        const fVec fv = n == kVec ? load_float(f + d) : load_float(f + d, n);
        const fVec gv = n == kVec ? load_float(g + d) : load_float(g + d, n);
        store_float(out + d, vs * (gv - coef * fv), n);
      }
    }
  });
  double total = 0.0;
  for (float t : row_dot) total += t;
  return total;
}

// grad_image, grad_text (input dtype T) and grad_logit_scale from Gp [N, D] and Hp [C, D].
template <typename G, typename T>
std::tuple<Tensor, Tensor, double> features_backward(const Tensor& image, const Tensor& img_g, const Tensor& txt_g,
                                                     const Tensor& gp, const Tensor& hp, const float* inv_i,
                                                     const float* inv_t, float scale, bool normalize) {
  const int64_t N = img_g.size(0), C = txt_g.size(0), D = img_g.size(1);
  Tensor grad_image = at::empty({N, D}, image.options()), grad_text = at::empty({C, D}, image.options());
  double grad_scale = 0.0;
  auto run = [&]<typename P>() {
    grad_scale = normalize_backward(img_g.data_ptr<G>(), gp.data_ptr<P>(), inv_i, N, D, scale, normalize,
                                    grad_image.data_ptr<T>());
    normalize_backward(txt_g.data_ptr<G>(), hp.data_ptr<P>(), inv_t, C, D, scale, normalize, grad_text.data_ptr<T>());
  };
  if (gp.scalar_type() == at::kFloat) {
    run.template operator()<float>();
  } else {
    run.template operator()<G>();
  }
  return {grad_image, grad_text, grad_scale};
}

// ---- dense backward ------------------------------------------------------------------------------
// ds = p*(g - sum(g*p)) | g*p*(1-p) | g per row; writes dsb = ds * inv_i * inv_c (GEMM dtype) so that
// Gp = dsb @ text_raw = inv_i * (ds @ y) and Hp = dsb^T @ image_raw = inv_c * (ds^T @ x) come out of
// plain GEMMs. Returns sum(ds), the logit_bias gradient.
template <typename G, typename T>
double ds_rows(const T* grad, const T* prob, G* dsb, int64_t N, int64_t C, const float* inv_i, const float* inv_t,
               Activation act) {
  std::vector<float> row_sum(N);
  cpu::parallel_rows(N, 3 * C, [&](int64_t begin, int64_t end) {
    const fVec zero(0.f), one(1.f);
    for (int64_t i = begin; i < end; ++i) {
      const T* g = grad + i * C;
      const T* p = prob + i * C;
      G* out = dsb + i * C;
      float gp_sum = 0.f;
      if (act == Activation::kSoftmax) {
        cpu::RowSum acc;
        for (int64_t c = 0; c < C; c += kVec) {
          const int64_t n = std::min<int64_t>(kVec, C - c);
          acc.add(n == kVec ? load_float(g + c) * load_float(p + c) : load_float(g + c, n) * load_float(p + c, n));
        }
        gp_sum = static_cast<float>(acc.result());
      }
      const fVec vr(gp_sum), vi(inv_i[i]);
      cpu::RowSum dsum;
      for (int64_t c = 0; c < C; c += kVec) {
        const int64_t n = std::min<int64_t>(kVec, C - c);
        const fVec gv = n == kVec ? load_float(g + c) : load_float(g + c, n);
        const fVec pv = n == kVec ? load_float(p + c) : load_float(p + c, n);
        fVec ds = act == Activation::kSoftmax ? pv * (gv - vr) : act == Activation::kSigmoid ? gv * pv * (one - pv) : gv;
        if (n < kVec) ds = fVec::set(zero, ds, n);  // padding lanes may hold 0 * NaN
        dsum.add(ds);
        store_float(out + c, ds * vi * fVec::loadu(inv_t + c, n), n);
      }
      row_sum[i] = static_cast<float>(dsum.result());
    }
  });
  double total = 0.0;
  for (float s : row_sum) total += s;
  return total;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> similarity_softmax_backward_cpu(
    const Tensor& grad_out, const Tensor& out, const Tensor& image, const Tensor& text, const Tensor& inv_norm_image,
    const Tensor& inv_norm_text, const Tensor& logit_scale, bool normalize, c10::string_view activation) {
  check_features(image, text);
  const int64_t N = image.size(0), C = text.size(0);
  check_like(grad_out, "grad_out", {N, C}, image);
  check_like(out, "out", {N, C}, image);
  check_inv_norm(inv_norm_image, "inv_norm_image", N);
  check_inv_norm(inv_norm_text, "inv_norm_text", C);
  const Activation act = parse_activation(activation);
  const float scale = scalar_arg(logit_scale, "logit_scale", image);
  const Tensor img_g = gemm_operand(image), txt_g = gemm_operand(text);
  const Tensor inv_i = inv_norm_image.contiguous(), inv_t = inv_norm_text.contiguous();
  const Tensor g = grad_out.contiguous(), p = out.contiguous();
  Tensor dsb = at::empty({N, C}, img_g.options());
  return dispatch_dtypes(image.scalar_type(), [&]<typename G, typename T>() {
    const double grad_bias = ds_rows(g.data_ptr<T>(), p.data_ptr<T>(), dsb.data_ptr<G>(), N, C,
                                     inv_i.data_ptr<float>(), inv_t.data_ptr<float>(), act);
    const Tensor gp = at::mm(dsb, txt_g), hp = at::mm(dsb.t(), img_g);
    auto [grad_image, grad_text, grad_scale] = features_backward<G, T>(
        image, img_g, txt_g, gp, hp, inv_i.data_ptr<float>(), inv_t.data_ptr<float>(), scale, normalize);
    return std::make_tuple(grad_image, grad_text, fp32_scalar(grad_scale, image), fp32_scalar(grad_bias, image));
  });
}

// ---- top-k ---------------------------------------------------------------------------------------
// Tiles of up to kTopkCols classes x as many rows as fit kTopkTile elements: one GEMM into a scratch
// tile, then per row (in parallel) the online log-sum-exp and the running top-k. Few, tall tiles:
// oneDNN re-packs the text tile on every call (bf16, 4096 x 1000 x 768, single-threaded: 256-row
// tiles 40 ms, 1024-row tiles 35 ms, the dense op 19 ms).
constexpr int64_t kTopkCols = 4096;
constexpr int64_t kTopkTile = int64_t{1} << 20;

// (rows per block, classes per tile) of the top-k ops.
std::pair<int64_t, int64_t> topk_tiles(int64_t N, int64_t C) {
  const int64_t cols = std::min(C, kTopkCols);
  return {std::min(N, std::max<int64_t>(64, kTopkTile / cols)), cols};
}

struct Candidate {
  float logit;
  int64_t index;
};

// Descending logit with NaN first (torch.topk ranks NaN above everything), ties by lower index: a
// strict weak order, so std::nth_element/std::sort are well defined on NaN rows too. (A functor, not a
// function pointer, so the sorts inline it.)
struct RanksBefore {
  bool operator()(const Candidate& a, const Candidate& b) const {
    const bool an = std::isnan(a.logit), bn = std::isnan(b.logit);
    if (an != bn) return an;
    if (!an && a.logit != b.logit) return a.logit > b.logit;
    return a.index < b.index;
  }
};

// Running state of one row: the online max / sum of exp, and its best k candidates so far. A vector
// compare against the k-th best logit (`threshold`) rejects almost every class after the first few
// dozen; the rare survivors (and NaN, which ranks first) go in one at a time:
//  - k <= kSortedMaxK: into a sorted array of k (binary search + a short move);
//  - larger k: appended to a buffer that is cut back to the k best (nth_element) when it holds 2k + 64.
// Both are linear in C. (Measured, bf16 4096 x 1000 x 768, k=5: a buffer for every k spent 3x more
// time selecting than computing the logits and exps.)
constexpr int64_t kSortedMaxK = 64;

struct TopkRow {
  float max = -kInf;
  float sum = 0.f;
  float threshold = -kInf;  // the k-th best logit so far (-inf until there are k)
  int64_t k = 0;
  std::vector<Candidate> best;  // sorted when k <= kSortedMaxK

  void reset(int64_t k_) {
    k = k_;
    max = -kInf;
    sum = 0.f;
    threshold = -kInf;
    best.clear();
    best.reserve(k <= kSortedMaxK ? k : 2 * k + 64);
  }

  void offer(const Candidate& c) {
    if (k <= kSortedMaxK) {
      if (static_cast<int64_t>(best.size()) == k) {
        if (!RanksBefore{}(c, best.back())) return;
        best.pop_back();
      }
      best.insert(std::upper_bound(best.begin(), best.end(), c, RanksBefore{}), c);
      if (static_cast<int64_t>(best.size()) == k) threshold = best.back().logit;
    } else {
      best.push_back(c);
      if (static_cast<int64_t>(best.size()) == 2 * k + 64) keep_best();
    }
  }

  void keep_best() {
    std::nth_element(best.begin(), best.begin() + (k - 1), best.end(), RanksBefore{});
    best.resize(k);
    threshold = best[k - 1].logit;
  }

  // One tile: n logits in buf (padded with -inf to `padded`, whole vectors), classes first_index + [0, n).
  void add_tile(const float* logits, int64_t n, int64_t first_index, float tile_max, bool softmax, int64_t padded) {
    if (softmax) {
      const float new_max = cpu::nan_max(max, tile_max);
      // exp(-inf - finite) = 0 on the first tile; NaN anywhere makes the row NaN, as in the reference.
      sum = sum * std::exp(max - new_max) + exp_sub_sum(logits, padded, new_max);
      max = new_max;
    }
    int64_t j = 0;
    // The row's first k classes enter unconditionally (-inf logits too: torch.topk returns them).
    for (; j < n && static_cast<int64_t>(best.size()) < k; ++j) offer({logits[j], first_index + j});
    if (tile_max <= threshold) return;  // nothing in this tile beats the current k-th best
    for (; j + kVec <= padded; j += kVec) {
      // Lanes with !(logit <= threshold): larger, or NaN. The -inf padding never passes.
      int passing = (fVec::loadu(logits + j) <= fVec(threshold)).zero_mask();
      for (; passing != 0; passing &= passing - 1) {
        const int64_t lane = __builtin_ctz(passing);
        if (!(logits[j + lane] <= threshold)) offer({logits[j + lane], first_index + j + lane});
      }
    }
    for (; j < n; ++j) {
      if (!(logits[j] <= threshold)) offer({logits[j], first_index + j});
    }
  }

  // The k best, sorted.
  void finish() {
    if (static_cast<int64_t>(best.size()) > k) keep_best();
    if (k > kSortedMaxK) std::sort(best.begin(), best.end(), RanksBefore{});
  }
};

template <typename G, typename T>
void topk_forward(const Tensor& img_g, const Tensor& txt_g, const float* inv_i, const float* inv_t, float scale,
                  float bias, Activation act, int64_t k, T* values, int64_t* indices, float* row_lse) {
  const int64_t N = img_g.size(0), C = txt_g.size(0);
  const auto [block_rows, tile_cols] = topk_tiles(N, C);
  const bool softmax = act == Activation::kSoftmax;
  Tensor scratch = at::empty({block_rows * tile_cols}, img_g.options());
  std::vector<TopkRow> state(block_rows);
  for (int64_t r0 = 0; r0 < N; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, N - r0);
    for (auto& s : state) s.reset(k);
    for (int64_t c0 = 0; c0 < C; c0 += tile_cols) {
      const int64_t cols = std::min(tile_cols, C - c0);
      Tensor tile = scratch.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(tile, img_g.narrow(0, r0, rows), txt_g.narrow(0, c0, cols).t());
      const G* tile_ptr = tile.template data_ptr<G>();
      const int64_t padded = round_up_to_vec(cols);
      cpu::parallel_rows(rows, 2 * cols, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(padded);
        for (int64_t i = begin; i < end; ++i) {
          const float tile_max =
              logits_row(tile_ptr + i * cols, inv_t + c0, cols, row_factor(scale, inv_i[r0 + i]), bias, buf.data());
          state[i].add_tile(buf.data(), cols, c0, tile_max, softmax, padded);
        }
      });
    }
    cpu::parallel_rows(rows, k, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        state[i].finish();
        const auto& best = state[i].best;
        const int64_t row = r0 + i;
        const float lse = softmax ? state[i].max + std::log(state[i].sum) : 0.f;
        row_lse[row] = lse;
        for (int64_t j = 0; j < k; ++j) {
          const float s = best[j].logit;
          const float v = softmax ? std::exp(s - lse) : act == Activation::kSigmoid ? cpu::sigmoid(s) : s;
          values[row * k + j] = static_cast<T>(v);
          indices[row * k + j] = best[j].index;
        }
      }
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> similarity_topk_cpu(const Tensor& image, const Tensor& text,
                                                                       const Tensor& logit_scale,
                                                                       const std::optional<Tensor>& logit_bias,
                                                                       bool normalize, c10::string_view activation,
                                                                       int64_t k) {
  check_features(image, text);
  const Activation act = parse_activation(activation);
  const int64_t N = image.size(0), C = text.size(0);
  MMFAST_CHECK(k >= 1 && k <= C, "k must be in [1, C=", C, "], got ", k);
  const float scale = scalar_arg(logit_scale, "logit_scale", image);
  const float bias = bias_arg(logit_bias, image);
  const Tensor img_g = gemm_operand(image), txt_g = gemm_operand(text);
  auto [inv_i, inv_t] = inverse_norms(img_g, txt_g, normalize);
  Tensor values = at::empty({N, k}, image.options());
  Tensor indices = at::empty({N, k}, image.options().dtype(at::kLong));
  Tensor row_lse = at::empty({N}, image.options().dtype(at::kFloat));
  dispatch_dtypes(image.scalar_type(), [&]<typename G, typename T>() {
    topk_forward<G, T>(img_g, txt_g, inv_i.data_ptr<float>(), inv_t.data_ptr<float>(), scale, bias, act, k,
                       values.data_ptr<T>(), indices.data_ptr<int64_t>(), row_lse.data_ptr<float>());
  });
  return {values, indices, row_lse, inv_i, inv_t};
}

// ---- top-k backward ------------------------------------------------------------------------------
// ds is sparse (the k chosen classes) plus, for softmax, the dense term -p_ic * r_i with
// r_i = sum_j g_ij p_ij and p recomputed tile by tile from row_lse. Gp and Hp accumulate in fp32.

// acc += a @ b in fp32; reduced-precision operands go through a GEMM into tmp (CPU has no mixed-dtype mm).
void mm_accumulate(Tensor acc, const Tensor& a, const Tensor& b, Tensor tmp) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
  } else {
    at::mm_out(tmp, a, b);
    acc.add_(tmp);
  }
}

template <typename G, typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> topk_backward(const Tensor& image, const Tensor& img_g, const Tensor& txt_g,
                                                         const T* grad_values, const T* values, const int64_t* indices,
                                                         const float* row_lse, const float* inv_i, const float* inv_t,
                                                         float scale, float bias, bool normalize, Activation act,
                                                         int64_t k) {
  const int64_t N = img_g.size(0), C = txt_g.size(0), D = img_g.size(1);
  const bool softmax = act == Activation::kSoftmax;
  const G* img = img_g.data_ptr<G>();
  const G* txt = txt_g.data_ptr<G>();
  Tensor gp = at::zeros({N, D}, image.options().dtype(at::kFloat));
  Tensor hp = at::zeros({C, D}, image.options().dtype(at::kFloat));
  float* gp_ptr = gp.data_ptr<float>();
  float* hp_ptr = hp.data_ptr<float>();

  // Sparse part: coef_ij = ds at the chosen class c = indices_ij, times inv_i * inv_c.
  std::vector<float> coef(N * k), row_r(N), row_ds_sum(N);
  cpu::parallel_rows(N, k * D, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float r = 0.f, ds_sum = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float g = static_cast<float>(grad_values[i * k + j]), v = static_cast<float>(values[i * k + j]);
        const float ds = softmax ? g * v : act == Activation::kSigmoid ? g * v * (1.f - v) : g;
        r += g * v;
        ds_sum += ds;
        coef[i * k + j] = ds * inv_i[i] * inv_t[indices[i * k + j]];
      }
      row_r[i] = softmax ? r : 0.f;
      row_ds_sum[i] = ds_sum;
      // Gp_i += sum_j coef_ij * text_{c_ij}
      float* out = gp_ptr + i * D;
      for (int64_t j = 0; j < k; ++j) {
        const fVec cv(coef[i * k + j]);
        const G* t = txt + indices[i * k + j] * D;
        for (int64_t d = 0; d < D; d += kVec) {
          const int64_t n = std::min<int64_t>(kVec, D - d);
          const fVec tv = n == kVec ? load_float(t + d) : load_float(t + d, n);
          at::vec::fmadd(cv, tv, fVec::loadu(out + d, n)).store(out + d, n);
        }
      }
    }
  });
  // Hp_c += coef_ij * image_i: rows of Hp collide across i, so threads split the feature dim instead.
  at::parallel_for(0, D, std::max<int64_t>(kVec, (int64_t{1} << 16) / std::max<int64_t>(1, N * k)),
                   [&](int64_t d0, int64_t d1) {
                     for (int64_t i = 0; i < N; ++i) {
                       const G* feat = img + i * D;
                       for (int64_t j = 0; j < k; ++j) {
                         const fVec cv(coef[i * k + j]);
                         float* out = hp_ptr + indices[i * k + j] * D;
                         for (int64_t d = d0; d < d1; d += kVec) {
                           const int64_t n = std::min<int64_t>(kVec, d1 - d);
                           const fVec fv = n == kVec ? load_float(feat + d) : load_float(feat + d, n);
                           at::vec::fmadd(cv, fv, fVec::loadu(out + d, n)).store(out + d, n);
                         }
                       }
                     }
                   });

  if (softmax) {
    // Dense part, tile by tile: ds_ic = -r_i * p_ic with p_ic = exp(s_ic - lse_i).
    const auto [block_rows, tile_cols] = topk_tiles(N, C);
    Tensor tile_buf = at::empty({block_rows * tile_cols}, img_g.options());
    const bool reduced = img_g.scalar_type() != at::kFloat;
    Tensor tmp_g = reduced ? at::empty({block_rows * D}, img_g.options()) : Tensor();
    Tensor tmp_h = reduced ? at::empty({tile_cols * D}, img_g.options()) : Tensor();
    for (int64_t r0 = 0; r0 < N; r0 += block_rows) {
      const int64_t rows = std::min(block_rows, N - r0);
      const Tensor img_rows = img_g.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < C; c0 += tile_cols) {
        const int64_t cols = std::min(tile_cols, C - c0);
        Tensor tile = tile_buf.narrow(0, 0, rows * cols).view({rows, cols});
        const Tensor txt_cols = txt_g.narrow(0, c0, cols);
        at::mm_out(tile, img_rows, txt_cols.t());
        G* tile_ptr = tile.template data_ptr<G>();
        const int64_t padded = round_up_to_vec(cols);
        cpu::parallel_rows(rows, 3 * cols, [&](int64_t begin, int64_t end) {
          std::vector<float> buf(padded);
          for (int64_t i = begin; i < end; ++i) {
            const int64_t row = r0 + i;
            G* t = tile_ptr + i * cols;
            logits_row(t, inv_t + c0, cols, row_factor(scale, inv_i[row]), bias, buf.data());
            const fVec vr(-row_r[row] * inv_i[row]);
            cpu::RowSum psum;
            const float lse = row_lse[row];
            const fVec vl(lse);
            for (int64_t c = 0; c < cols; c += kVec) {
              const int64_t n = std::min<int64_t>(kVec, cols - c);
              const fVec p = cpu::exp_nonpositive(fVec::loadu(buf.data() + c) - vl);  // padding: exp(-inf) = 0
              psum.add(p);
              store_float(t + c, p * vr * fVec::loadu(inv_t + c0 + c, n), n);
            }
            row_ds_sum[row] -= row_r[row] * static_cast<float>(psum.result());
          }
        });
        mm_accumulate(gp.narrow(0, r0, rows), tile, txt_cols,
                      reduced ? tmp_g.narrow(0, 0, rows * D).view({rows, D}) : Tensor());
        mm_accumulate(hp.narrow(0, c0, cols), tile.t(), img_rows,
                      reduced ? tmp_h.narrow(0, 0, cols * D).view({cols, D}) : Tensor());
      }
    }
  }
  double grad_bias = 0.0;
  for (float s : row_ds_sum) grad_bias += s;
  auto [grad_image, grad_text, grad_scale] =
      features_backward<G, T>(image, img_g, txt_g, gp, hp, inv_i, inv_t, scale, normalize);
  return {grad_image, grad_text, fp32_scalar(grad_scale, image), fp32_scalar(grad_bias, image)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> similarity_topk_backward_cpu(
    const Tensor& grad_values, const Tensor& values, const Tensor& indices, const Tensor& row_lse, const Tensor& image,
    const Tensor& text, const Tensor& inv_norm_image, const Tensor& inv_norm_text, const Tensor& logit_scale,
    const std::optional<Tensor>& logit_bias, bool normalize, c10::string_view activation) {
  check_features(image, text);
  const int64_t N = image.size(0), C = text.size(0);
  MMFAST_CHECK(values.dim() == 2 && values.size(0) == N && values.size(1) >= 1 && values.size(1) <= C,
               "values must have shape [N=", N, ", k] with 1 <= k <= C=", C, ", got ", values.sizes());
  const int64_t k = values.size(1);
  check_like(values, "values", {N, k}, image);
  check_like(grad_values, "grad_values", {N, k}, image);
  MMFAST_CHECK(indices.scalar_type() == at::kLong && indices.sizes() == values.sizes(),
               "indices must be int64 of shape ", values.sizes(), ", got ", indices.scalar_type(), " of shape ",
               indices.sizes());
  MMFAST_CHECK(row_lse.scalar_type() == at::kFloat && row_lse.dim() == 1 && row_lse.size(0) == N,
               "row_lse must be a float32 tensor of shape [", N, "], got ", row_lse.scalar_type(), " of shape ",
               row_lse.sizes());
  check_inv_norm(inv_norm_image, "inv_norm_image", N);
  check_inv_norm(inv_norm_text, "inv_norm_text", C);
  const Activation act = parse_activation(activation);
  const float scale = scalar_arg(logit_scale, "logit_scale", image);
  const float bias = bias_arg(logit_bias, image);
  const Tensor idx = indices.contiguous();
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j) {
    MMFAST_CHECK(idx_ptr[j] >= 0 && idx_ptr[j] < C, "indices must be in [0, C=", C, "), got ", idx_ptr[j]);
  }
  const Tensor img_g = gemm_operand(image), txt_g = gemm_operand(text);
  const Tensor gv = grad_values.contiguous(), v = values.contiguous();
  const Tensor lse = row_lse.contiguous(), inv_i = inv_norm_image.contiguous(), inv_t = inv_norm_text.contiguous();
  return dispatch_dtypes(image.scalar_type(), [&]<typename G, typename T>() {
    return topk_backward<G, T>(image, img_g, txt_g, gv.data_ptr<T>(), v.data_ptr<T>(), idx_ptr, lse.data_ptr<float>(),
                               inv_i.data_ptr<float>(), inv_t.data_ptr<float>(), scale, bias, normalize, act, k);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("similarity_softmax", &similarity_softmax_cpu);
  m.impl("similarity_softmax_backward", &similarity_softmax_backward_cpu);
  m.impl("similarity_topk", &similarity_topk_cpu);
  m.impl("similarity_topk_backward", &similarity_topk_backward_cpu);
}

}  // namespace mmfast
