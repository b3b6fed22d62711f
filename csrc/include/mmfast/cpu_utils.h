// Helpers shared by the CPU kernels (csrc/cpu/*.cpp): fp32 vector loads/stores from fp32/fp16/bf16,
// row reductions, inverse row norms, and a parallel row loop with a grain sized by work.
//
// ATen's at::vec::Vectorized only uses AVX-512/AVX2 intrinsics when CPU_CAPABILITY_AVX512/AVX2 is
// defined (ATen's own kernels get it per dispatch target); without it every op, exp included, falls
// back to a scalar loop. The extension is built for one target (-march=native by default), so the
// capability follows the compiler's target here. Every CPU source includes this header first, so all
// translation units see the same Vectorized definitions.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY mmfast_avx512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY mmfast_avx2
#else
#define CPU_CAPABILITY mmfast_default
#endif
#endif

#include <ATen/Parallel.h>
// GCC 12 flags _mm256_undefined_si256() inside ATen's fp16 conversion as maybe-uninitialized (a
// false positive: the lanes are overwritten), and the headers carry clang/CUDA-only pragmas;
// silence both for these headers only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC diagnostic pop
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mmfast/checks.h"

namespace mmfast::cpu {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVec = fVec::size();

// ---- fp32 view of fp32 / fp16 / bf16 memory -----------------------------------------------------
template <typename T>
inline fVec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    fVec v;
    at::vec::load_to_float<T>(p, v);  // kVec elements of T
    return v;
  }
}

// First n (< kVec) elements; the other lanes are 0.
template <typename T>
inline fVec load_float(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p, n);
  } else {
    T tmp[kVec] = {};
    std::copy(p, p + n, tmp);
    return load_float(tmp);
  }
}

template <typename T>
inline void store_float(T* p, const fVec& v, int64_t n = kVec) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    // A 32-byte store: Vectorized<T>::store(p, 16) is a masked 64-byte store, and a load of the next
    // 16 elements (same cache line) waits for it to retire; in place over bf16 rows that made a
    // one-pass epilogue 10x slower (measured: 5.4 ms vs 0.5 ms for fp32 at 4096 x 1000).
    const __m512 f = v;
    const __m256i h = std::is_same_v<T, c10::BFloat16> ? at::vec::cvtfp32_bf16(f) : at::vec::cvtfp32_fp16(f);
    if (n == kVec) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    } else {
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), h);
    }
#else
    at::vec::convert_from_float<T>(v, v).store(p, n);  // rounds to nearest even
#endif
  }
}

// ---- lane reductions (portable: AVX2 and the default Vectorized have no reduce_* members) --------
inline double lanes_sum_f64(const fVec& v) {
  float lanes[kVec];
  v.store(lanes);
  double s = 0.0;
  for (int64_t j = 0; j < kVec; ++j) s += lanes[j];
  return s;
}

inline float lanes_sum(const fVec& v) { return static_cast<float>(lanes_sum_f64(v)); }

// Sum of a long row of vectors: fp32 lane partial sums flushed into a double every 64 vectors, so the
// rounding error stays at fp32's over 1024 elements instead of growing with the row (21843 classes:
// a plain fp32 lane sum made the softmax gradients' error 3x that of torch's fp32 reference).
class RowSum {
 public:
  void add(const fVec& v) {
    acc_ = acc_ + v;
    if (++count_ == 64) flush();
  }
  double result() {
    flush();
    return total_;
  }

 private:
  void flush() {
    total_ += lanes_sum_f64(acc_);
    acc_ = fVec(0.f);
    count_ = 0;
  }
  fVec acc_{0.f};
  double total_ = 0.0;
  int count_ = 0;
};

// Max that propagates NaN (like torch.max), so a NaN logit poisons its row as in the reference.
inline float nan_max(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

inline float lanes_max(const fVec& v) {
  float lanes[kVec];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t j = 1; j < kVec; ++j) m = nan_max(m, lanes[j]);
  return m;
}

// sum_j a[j] * b[j]: fp32 lanes, summed across lanes in double.
template <typename T>
inline double dot(const T* a, const T* b, int64_t n) {
  fVec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) acc = at::vec::fmadd(load_float(a + j), load_float(b + j), acc);
  if (j < n) acc = at::vec::fmadd(load_float(a + j, n - j), load_float(b + j, n - j), acc);
  return lanes_sum_f64(acc);
}

// ---- exp / sigmoid --------------------------------------------------------------------------------
// exp(x) for x <= 0 (exp(s - max), exp(-|s|)): the softmax epilogue is mostly this.
// AVX-512: n = round(x / ln2), r = x - n ln2 (two-constant Cody-Waite), exp(r) by Cephes' expf
// polynomial (~1 ulp), times 2^n by vscalefps (NaN stays NaN). Results below FLT_MIN are flushed to 0,
// as ATen's exp_u20 does: subnormal results made the softmax epilogue 8x slower (measured 46 ms vs 6
// ms; CLIP's scale of 100 puts most classes 90+ below the max). 16 instructions per 16 values;
// exp_u20 (20 ulp) plus the NaN fix-up it needs take 23. exp(0) is exactly 1.
inline fVec exp_nonpositive(const fVec& xv) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr float kLogFltMin = -87.33654f;  // log(FLT_MIN)
  const __mmask16 tiny = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(kLogFltMin), _CMP_LT_OQ);  // false for NaN
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(kLogFltMin), xv);  // NaN, the 2nd operand, passes through
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
#else
  return fVec::blendv(xv.exp(), fVec(0.f), xv < fVec(-87.33654f));  // the same flush below FLT_MIN
#endif
}

// 1 / (1 + exp(-s)) without overflow: e = exp(-|s|) <= 1, then 1/(1+e) for s >= 0 and e/(1+e)
// below (keeps relative precision for very negative s; sigmoid(-inf) = 0, sigmoid(NaN) = NaN).
inline fVec sigmoid(const fVec& s) {
  const fVec one(1.f);
  const fVec e = exp_nonpositive(s.abs().neg());
  const fVec r = one / (one + e);
  return fVec::blendv(e * r, r, s >= fVec(0.f));
}

inline float sigmoid(float s) {
  const float e = std::exp(-std::abs(s));
  return s >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// ---- parallel row loop ---------------------------------------------------------------------------
// at::parallel_for over rows with a grain of ~64K elements of work, so small problems stay on one
// thread (waking the pool costs more than a few microseconds of work).
template <typename F>
inline void parallel_rows(int64_t rows, int64_t work_per_row, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_row));
  at::parallel_for(0, rows, grain, fn);
}

// ---- F.normalize's scale -------------------------------------------------------------------------
// 1 / max(sqrt(sum_sq), eps), rounded once from double: the inverse norm scales a whole row of logits,
// so its rounding error is coherent along the row (measured: the softmax gradient's error at C=21843,
// scale 100 depends on it). NaN stays NaN (torch's clamp_min propagates it); a zero row gives 1/eps.
inline float inverse_norm(double sum_sq) {
  const double norm = std::sqrt(sum_sq);
  return static_cast<float>(1.0 / (std::isnan(norm) ? norm : std::max(norm, static_cast<double>(kNormalizeEps))));
}

// True where the row norm was clamped to eps (then F.normalize's gradient has no projection term).
inline bool norm_was_clamped(float inv_norm) { return inv_norm >= inverse_norm(0.0); }

// inv[r] = inverse_norm(||x_r||^2) for the rows of a contiguous [rows, dim] matrix.
template <typename T>
inline void inverse_row_norms(const T* x, int64_t rows, int64_t dim, float* inv) {
  parallel_rows(rows, dim, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * dim;
      inv[r] = inverse_norm(dot(row, row, dim));
    }
  });
}

}  // namespace mmfast::cpu
