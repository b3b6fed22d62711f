// Runs csrc/cuda/sam_attention.cu's fused SAM cross-attention blocks through their launchers (sam_image_to_token,
// sam_token_to_image) on CPU threads with tests/native/cuda_emulation.h and checks them against float64 references
// computed here from the same rounded inputs, exactly per mmfast/sam_attention_cuda.h (scale 0.7): ragged row tiles
// and key chunks, shared (batch stride 0) operands, one key / one query, odd channel counts, fp32/fp16/bf16; the
// token -> image merge's tickets left at `chunks`. Run by tests/test_cuda_emulation.py; prints one line per failed
// check and a summary, and exits with 0 only if every check passed.

#include "cuda_emulation.h"
#include "emulated_checks.h"

#include "../../csrc/cuda/sam_attention.cu"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

namespace kc = mmfast::cuda;
using namespace mmfast_emulation::checks;

constexpr float kEps = 1e-5f;
constexpr float kScale = 0.7f;  // the scores' scale (head_dim^-0.5 in SAM): not 1, so a dropped scale shows

// n values scale * N(0, 1) + shift rounded to T.
template <typename T>
Vec<T> random(int64_t n, std::mt19937& gen, float scale, float shift = 0.f) {
  std::normal_distribution<float> normal;
  Vec<T> v(n);
  for (T& e : v) e = kc::from_float<T>(shift + scale * normal(gen));
  return v;
}

// LayerNorm over y (biased variance, as torch), then the affine: float64.
template <typename T>
std::vector<double> layer_norm(const std::vector<double>& y, const Vec<T>& weight, const Vec<T>& bias, double eps) {
  const size_t n = y.size();
  double mean = 0, var = 0;
  for (double e : y) mean += e;
  mean /= n;
  for (double e : y) var += (e - mean) * (e - mean);
  var /= n;
  const double inv = 1 / std::sqrt(var + eps);
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = (y[i] - mean) * inv * kc::to_float(weight[i]) + kc::to_float(bias[i]);
  return out;
}

// The kernel computes in fp32 and rounds once to T: 1e-4 absolute for fp32, 4u (1 + |ref|) for fp16/bf16.
template <typename T>
double tolerance(double ref) {
  if constexpr (std::is_same_v<T, float>) return 1e-4;
  const double u = std::is_same_v<T, __half> ? 0x1p-11 : 0x1p-8;
  return 4 * u * (1 + std::abs(ref));
}

// max over entries of |got - ref| / tolerance; NaN (an unwritten entry) if any entry is NaN.
template <typename T>
double worst_error(const Vec<T>& got, const std::vector<double>& ref) {
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = kc::to_float(got[i]);
    if (std::isnan(g)) return NAN;
    worst = std::max(worst, std::abs(g - ref[i]) / tolerance<T>(ref[i]));
  }
  return worst;
}

// ---- image -> token ----------------------------------------------------------------------------------------
// x: batch 1 read with stride 0 when shared_x; residual: batch 1 read with stride 0 when shared_residual.
template <typename T>
void run_image_to_token(const kc::ImageToTokenShape& s, bool shared_x, bool shared_residual, unsigned seed) {
  std::mt19937 gen(seed);
  const int64_t G = s.heads * s.keys, C = s.channels, O = s.out_channels, R = s.rows;
  const int64_t x_stride = shared_x ? 0 : R * C, res_stride = shared_residual ? 0 : R * O;
  Vec<T> x = random<T>((shared_x ? 1 : s.batch) * R * C, gen, 0.5f);
  Vec<T> key_folded = random<T>(s.batch * G * C, gen, 0.5f);
  Vec<T> key_bias = random<T>(s.batch * G, gen, 0.5f);
  Vec<T> value_folded = random<T>(s.batch * G * O, gen, 0.5f);
  Vec<T> out_bias = random<T>(O, gen, 0.5f);
  Vec<T> residual = random<T>((shared_residual ? 1 : s.batch) * R * O, gen, 0.5f);
  Vec<T> norm_weight = random<T>(O, gen, 0.1f, 1.f), norm_bias = random<T>(O, gen, 0.1f);
  const std::string tag = std::string(name_of<T>()) + " image_to_token b" + std::to_string(s.batch) + " rows" +
                          std::to_string(R) + " c" + std::to_string(C) + " o" + std::to_string(O) + " h" +
                          std::to_string(s.heads) + " k" + std::to_string(s.keys) + (shared_x ? " shared-x" : "") +
                          (shared_residual ? " shared-residual" : "");
  expect(s.keys <= kc::kImageToTokenMaxKeys, tag + " keys <= kImageToTokenMaxKeys");
  expect(kc::image_to_token_smem_bytes(s) > 0, tag + " smem bytes > 0");

  Vec<T> out = poisoned<T>(s.batch * R * O);
  launched(kc::sam_image_to_token(dtype_of<T>(), s, x.data(), x_stride, key_folded.data(), key_bias.data(),
                                  value_folded.data(), out_bias.data(), residual.data(), res_stride,
                                  norm_weight.data(), norm_bias.data(), kScale, kEps, out.data(), nullptr));

  std::vector<double> ref(s.batch * R * O);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t r = 0; r < R; ++r) {
      const T* xr = x.data() + b * x_stride + r * C;
      std::vector<double> y(O);
      for (int64_t o = 0; o < O; ++o) {
        y[o] = double(kc::to_float(residual[b * res_stride + r * O + o])) + kc::to_float(out_bias[o]);
      }
      for (int64_t h = 0; h < s.heads; ++h) {
        std::vector<double> score(s.keys);
        double m = -INFINITY, sum = 0;
        for (int64_t j = 0; j < s.keys; ++j) {
          const int64_t g = h * s.keys + j;
          double dot = kc::to_float(key_bias[b * G + g]);
          for (int64_t c = 0; c < C; ++c)
            dot += double(kc::to_float(xr[c])) * kc::to_float(key_folded[(b * G + g) * C + c]);
          score[j] = kScale * dot;
          m = std::max(m, score[j]);
        }
        for (double& e : score) sum += (e = std::exp(e - m));
        for (int64_t j = 0; j < s.keys; ++j) {
          const int64_t g = h * s.keys + j;
          const double p = score[j] / sum;
          for (int64_t o = 0; o < O; ++o) y[o] += p * kc::to_float(value_folded[(b * G + g) * O + o]);
        }
      }
      const std::vector<double> row = layer_norm(y, norm_weight, norm_bias, kEps);
      std::copy(row.begin(), row.end(), ref.begin() + (b * R + r) * O);
    }
  expect_error(worst_error(out, ref), 1.0, tag + " out (error / tolerance)");
}

// ---- token -> image ----------------------------------------------------------------------------------------
// k, v: batch 1 read with stride 0 when shared_kv (one image for every prompt).
template <typename T>
void run_token_to_image(const kc::TokenToImageShape& s, bool shared_kv, unsigned seed) {
  std::mt19937 gen(seed);
  const int64_t Q = s.queries, K = s.keys, C = s.channels, H = s.heads, D = s.head_dim, O = s.out_channels;
  const int64_t G = H * Q, E = H * D, kv_stride = shared_kv ? 0 : K * C;
  Vec<T> query_folded = random<T>(s.batch * G * C, gen, 0.5f);
  Vec<T> query_bias = random<T>(s.batch * G, gen, 0.5f);
  Vec<T> k = random<T>((shared_kv ? 1 : s.batch) * K * C, gen, 0.5f);
  Vec<T> v = random<T>((shared_kv ? 1 : s.batch) * K * C, gen, 0.5f);
  Vec<T> v_weight = random<T>(E * C, gen, 0.5f), v_bias = random<T>(E, gen, 0.5f);
  Vec<T> out_weight = random<T>(O * E, gen, 0.5f), out_bias = random<T>(O, gen, 0.5f);
  Vec<T> residual = random<T>(s.batch * Q * O, gen, 0.5f);
  Vec<T> norm_weight = random<T>(O, gen, 0.1f, 1.f), norm_bias = random<T>(O, gen, 0.1f);
  const std::string tag = std::string(name_of<T>()) + " token_to_image b" + std::to_string(s.batch) + " q" +
                          std::to_string(Q) + " keys" + std::to_string(K) + " c" + std::to_string(C) + " h" +
                          std::to_string(H) + " d" + std::to_string(D) + " o" + std::to_string(O) +
                          (shared_kv ? " shared-kv" : "");
  expect(G <= kc::kTokenToImageMaxRows, tag + " heads * queries <= kTokenToImageMaxRows");
  const int64_t chunks = kc::token_to_image_chunks(s);
  expect(chunks == (K + kc::kTokenToImageChunk - 1) / kc::kTokenToImageChunk, tag + " chunks");
  expect(kc::token_to_image_smem_bytes(s) > 0, tag + " smem bytes > 0");
  const int64_t scratch_floats = kc::token_to_image_scratch_floats(s);
  expect(scratch_floats == s.batch * chunks * G * (2 + D), tag + " scratch floats");

  Vec<float> scratch = poisoned<float>(scratch_floats);
  Vec<int> tickets(s.batch, 0);
  Vec<T> out = poisoned<T>(s.batch * Q * O);
  launched(kc::sam_token_to_image(dtype_of<T>(), s, query_folded.data(), query_bias.data(), k.data(), v.data(),
                                  kv_stride, v_weight.data(), v_bias.data(), out_weight.data(), out_bias.data(),
                                  residual.data(), norm_weight.data(), norm_bias.data(), kScale, kEps, scratch.data(),
                                  tickets.data(), out.data(), nullptr));
  bool tickets_left = true;
  for (int t : tickets) tickets_left = tickets_left && t == chunks;
  expect(tickets_left, tag + " tickets left at chunks");

  std::vector<double> ref(s.batch * Q * O);
  for (int64_t b = 0; b < s.batch; ++b) {
    const T* kb = k.data() + b * kv_stride;
    const T* vb = v.data() + b * kv_stride;
    // attended[g, :] over all keys, g = h * Q + l
    std::vector<double> attended(G * C, 0.0);
    for (int64_t g = 0; g < G; ++g) {
      std::vector<double> score(K);
      double m = -INFINITY, sum = 0;
      for (int64_t j = 0; j < K; ++j) {
        double dot = kc::to_float(query_bias[b * G + g]);
        for (int64_t c = 0; c < C; ++c)
          dot += double(kc::to_float(query_folded[(b * G + g) * C + c])) * kc::to_float(kb[j * C + c]);
        score[j] = kScale * dot;
        m = std::max(m, score[j]);
      }
      for (double& e : score) sum += (e = std::exp(e - m));
      for (int64_t j = 0; j < K; ++j)
        for (int64_t c = 0; c < C; ++c) attended[g * C + c] += score[j] / sum * kc::to_float(vb[j * C + c]);
    }
    for (int64_t l = 0; l < Q; ++l) {
      std::vector<double> o(E);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D; ++i) {
          const int64_t e = h * D + i;
          double acc = kc::to_float(v_bias[e]);
          for (int64_t c = 0; c < C; ++c) acc += attended[(h * Q + l) * C + c] * kc::to_float(v_weight[e * C + c]);
          o[e] = acc;
        }
      std::vector<double> y(O);
      for (int64_t oc = 0; oc < O; ++oc) {
        double acc = double(kc::to_float(residual[(b * Q + l) * O + oc])) + kc::to_float(out_bias[oc]);
        for (int64_t e = 0; e < E; ++e) acc += o[e] * kc::to_float(out_weight[oc * E + e]);
        y[oc] = acc;
      }
      const std::vector<double> row = layer_norm(y, norm_weight, norm_bias, kEps);
      std::copy(row.begin(), row.end(), ref.begin() + (b * Q + l) * O);
    }
  }
  expect_error(worst_error(out, ref), 1.0, tag + " out (error / tolerance)");
}

template <typename T>
void run_all(unsigned seed) {
  // image -> token: two batch entries reading one shared x, 70 rows (a ragged last tile of 32); x per batch entry
  // with one residual shared, 33 rows, the most keys a thread holds; odd everything, one key per head.
  run_image_to_token<T>({2, 70, 40, 24, 4, 7}, true, false, seed + 1);
  run_image_to_token<T>({1, 33, 16, 16, 8, 16}, false, true, seed + 2);
  run_image_to_token<T>({3, 5, 9, 5, 3, 1}, false, false, seed + 3);
  // More heads than a row group's 8 threads (lanes take two heads each), two whole row tiles, x per batch entry
  // (with one key per head, as above, the scores and so x do not matter).
  run_image_to_token<T>({2, 64, 24, 12, 10, 3}, false, false, seed + 7);
  // token -> image: one shared image over 150 keys (3 chunks of 64, the last ragged); exactly one chunk with the
  // keys per batch entry; one query, one key, odd sizes.
  run_token_to_image<T>({2, 7, 150, 40, 4, 8, 24}, true, seed + 4);
  run_token_to_image<T>({1, 5, 64, 32, 8, 4, 32}, false, seed + 5);
  run_token_to_image<T>({3, 1, 1, 7, 2, 3, 5}, false, seed + 6);
  // heads * queries = kTokenToImageMaxRows exactly, more channels than a block's 256 threads.
  run_token_to_image<T>({1, 8, 70, 260, 8, 2, 16}, false, seed + 8);
}

}  // namespace

int main() {
  run_all<float>(100);
  run_all<__half>(200);
  run_all<__nv_bfloat16>(300);
  std::printf("sam_attention_emulated: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
