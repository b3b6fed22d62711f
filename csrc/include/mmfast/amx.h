// AMX (Advanced Matrix Extensions) bf16 tile products for the CPU kernels, and the operand packing they
// need. On this machine (Sapphire Rapids, 2 cores) a 64x64x64 bf16 product with fp32 accumulation takes
// 0.99 us on the AMX tiles vs 3.4-3.7 us with fp32 FMAs on converted operands (at::vec micro-GEMM) and
// 6.2 us with AVX512-BF16's vdpbf16ps (one thread, operands in cache, standalone prototypes, 2026-11-28).
//
// Layouts (the tile unit is 16 rows of 64 bytes):
//   A: bf16 rows, m x k, `lda` elements apart (m a multiple of 16, k of 32);
//   B: "VNNI" pairs, [k/2][n][2]: element (t, j) at b[((t / 2) * n + j) * 2 + t % 2] (n a multiple of 16);
//   C: fp32 rows, m x n, `ldc` apart.
// Callers zero-pad their operands to those multiples (pack_* below do). Everything here needs a
// TileScope on the calling thread: the tile configuration is per thread and other libraries (oneDNN)
// load their own between our calls.
#pragma once

#include "mmfast/cpu_utils.h"  // at::vec with the CPU capability every CPU source uses

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define MMFAST_HAS_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mmfast::cpu::amx {

constexpr int64_t kTileRows = 16;   // M and N granularity
constexpr int64_t kTileDepth = 32;  // K granularity: 32 bf16 = 64 bytes per tile row

inline int64_t pad_rows(int64_t x) { return (x + kTileRows - 1) / kTileRows * kTileRows; }
inline int64_t pad_depth(int64_t x) { return (x + kTileDepth - 1) / kTileDepth * kTileDepth; }

#if defined(MMFAST_HAS_AMX)

// Linux gives a process the AMX register state only on request (arch_prctl, kernel >= 5.16).
inline bool available() {
  static const bool granted = [] {
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

// The tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes (colsb: bytes 16-31, rows: 48-55).
// A constant in memory on purpose: GCC 12's _tile_loadconfig tells the compiler it reads only 8 bytes, so
// a configuration built on the stack lost its row/column stores to dead-store elimination (SIGILL).
alignas(64) inline constexpr uint8_t kTileConfig[64] = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                                 // palette, start row
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  // colsb
    16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};                           // rows

// Loads mmfast's tile configuration for this thread; releases the tiles after.
class TileScope {
 public:
  TileScope() { _tile_loadconfig(kTileConfig); }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// One block of MI x NJ C tiles (MI, NJ in {1, 2}): tiles 0-3 accumulate, 4-5 hold A, 6-7 hold B. Tile
// numbers are immediates, hence the template.
template <int MI, int NJ>
inline void gemm_block(int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t n, float* c,
                       int64_t ldc, bool accumulate) {
  const int64_t c_stride = ldc * 4, a_stride = lda * 2, b_stride = n * 4;
  float* c1 = c + kTileRows * ldc;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if constexpr (NJ == 2) _tile_loadd(1, c + kTileRows, c_stride);
    if constexpr (MI == 2) _tile_loadd(2, c1, c_stride);
    if constexpr (MI == 2 && NJ == 2) _tile_loadd(3, c1 + kTileRows, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (NJ == 2) _tile_zero(1);
    if constexpr (MI == 2) _tile_zero(2);
    if constexpr (MI == 2 && NJ == 2) _tile_zero(3);
  }
  for (int64_t t = 0; t < k; t += kTileDepth) {
    _tile_loadd(4, a + t, a_stride);
    if constexpr (MI == 2) _tile_loadd(5, a + kTileRows * lda + t, a_stride);
    _tile_loadd(6, b + t * n, b_stride);  // pair rows t/2 .. t/2 + 15
    if constexpr (NJ == 2) _tile_loadd(7, b + t * n + 2 * kTileRows, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NJ == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MI == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MI == 2 && NJ == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NJ == 2) _tile_stored(1, c + kTileRows, c_stride);
  if constexpr (MI == 2) _tile_stored(2, c1, c_stride);
  if constexpr (MI == 2 && NJ == 2) _tile_stored(3, c1 + kTileRows, c_stride);
}

// C[m x n] (+)= A[m x k] B[k x n] in the layouts above.
inline void gemm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b, float* c,
                 int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; i += 2 * kTileRows) {
    const bool two_rows = i + 2 * kTileRows <= m;
    for (int64_t j = 0; j < n; j += 2 * kTileRows) {
      const bool two_cols = j + 2 * kTileRows <= n;
      const uint16_t* ai = a + i * lda;
      const uint16_t* bj = b + 2 * j;
      float* cij = c + i * ldc + j;
      if (two_rows && two_cols) gemm_block<2, 2>(k, ai, lda, bj, n, cij, ldc, accumulate);
      else if (two_rows) gemm_block<2, 1>(k, ai, lda, bj, n, cij, ldc, accumulate);
      else if (two_cols) gemm_block<1, 2>(k, ai, lda, bj, n, cij, ldc, accumulate);
      else gemm_block<1, 1>(k, ai, lda, bj, n, cij, ldc, accumulate);
    }
  }
}

// ---- packing ------------------------------------------------------------------------------------
inline uint16_t bits(c10::BFloat16 x) { return x.x; }

// 16 fp32 -> 16 bf16, round to nearest even (NaN stays NaN).
inline __m256i round_to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// A operand from bf16 rows: dst [rows_p x cols_p] = src[rows x cols] (`stride` apart), zero-padded.
inline void pack_rows(const c10::BFloat16* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst,
                      int64_t rows_p, int64_t cols_p) {
  for (int64_t r = 0; r < rows_p; ++r) {
    uint16_t* d = dst + r * cols_p;
    if (r < rows) {
      std::memcpy(d, src + r * stride, cols * sizeof(uint16_t));
      std::memset(d + cols, 0, (cols_p - cols) * sizeof(uint16_t));
    } else {
      std::memset(d, 0, cols_p * sizeof(uint16_t));
    }
  }
}

// A operand from fp32 rows: dst [rows_p x cols_p] = bf16(src[rows x cols]), zero-padded; `cols` a
// multiple of 16 whose lanes past the real columns hold zeros or finite values the caller ignores.
inline void pack_rows(const float* src, int64_t stride, int64_t rows, int64_t cols, uint16_t* dst, int64_t rows_p,
                      int64_t cols_p) {
  for (int64_t r = 0; r < rows_p; ++r) {
    uint16_t* d = dst + r * cols_p;
    int64_t j = 0;
    if (r < rows)
      for (; j < cols; j += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + j), round_to_bf16(_mm512_loadu_ps(src + r * stride + j)));
    std::memset(d + j, 0, (cols_p - j) * sizeof(uint16_t));
  }
}

// B operand from bf16 rows: src [k x n] (`stride` apart) -> VNNI [k_p/2][n_p][2], zero-padded (k_p a
// multiple of 32, n_p of 16). Rows 2t and 2t+1 interleave: each 32-bit word is (row 2t, row 2t+1).
inline void pack_vnni(const c10::BFloat16* src, int64_t stride, int64_t k, int64_t n, uint16_t* dst, int64_t k_p,
                      int64_t n_p) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t t = 0; t < k_p; t += 2) {
    uint32_t* d = reinterpret_cast<uint32_t*>(dst) + (t / 2) * n_p;
    const uint16_t* r0 = t < k ? s + t * stride : nullptr;
    const uint16_t* r1 = t + 1 < k ? s + (t + 1) * stride : nullptr;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512i lo = r0 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + j))) : _mm512_setzero_si512();
      const __m512i hi = r1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + j))) : _mm512_setzero_si512();
      _mm512_storeu_si512(d + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    for (; j < n_p; ++j)
      d[j] = j < n ? (uint32_t(r0 ? r0[j] : 0) | (uint32_t(r1 ? r1[j] : 0) << 16)) : 0u;
  }
}

// B operand = the transpose of bf16 rows: src [n x k] (`stride` apart) is B^T, B = src^T [k x n]; its
// VNNI word (t/2, j) is the pair src[j][t], src[j][t+1], adjacent in src: a 32-bit transpose.
inline void pack_vnni_transposed(const c10::BFloat16* src, int64_t stride, int64_t n, int64_t k, uint16_t* dst,
                                 int64_t k_p, int64_t n_p) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  auto* d = reinterpret_cast<uint32_t*>(dst);
  std::memset(dst, 0, k_p * n_p * sizeof(uint16_t));
  if (k % 2 == 0 && stride % 2 == 0) {  // whole pairs: transpose them as 32-bit lanes (moves keep the bits);
    // the scalar loop below took ~10% of the Perceiver-shaped forward (perf)
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(s), stride / 2, reinterpret_cast<float*>(d), n_p, n,
                                  k / 2);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* row = s + j * stride;
    for (int64_t t = 0; t < k; t += 2)
      d[(t / 2) * n_p + j] = uint32_t(row[t]) | (t + 1 < k ? uint32_t(row[t + 1]) << 16 : 0u);
  }
}

#else  // no AMX in this build (the compiler's target lacks it): available() is false and callers keep
       // their FMA path; the rest is declared so that their code compiles, and never runs.

inline bool available() { return false; }
class TileScope {};
[[noreturn]] inline void unavailable() { TORCH_CHECK(false, "mmfast: AMX code called in a build without AMX"); }
inline void gemm(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t, bool) {
  unavailable();
}
inline void pack_rows(const c10::BFloat16*, int64_t, int64_t, int64_t, uint16_t*, int64_t, int64_t) { unavailable(); }
inline void pack_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t, int64_t) { unavailable(); }
inline void pack_vnni(const c10::BFloat16*, int64_t, int64_t, int64_t, uint16_t*, int64_t, int64_t) { unavailable(); }
inline void pack_vnni_transposed(const c10::BFloat16*, int64_t, int64_t, int64_t, uint16_t*, int64_t, int64_t) {
  unavailable();
}

#endif

}  // namespace mmfast::cpu::amx
