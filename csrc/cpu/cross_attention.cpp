// CPU kernels of mmfast::cross_attention and mmfast::cross_attention_backward (schemas in
// csrc/mmfast.cpp; functional API, fake impls and autograd in mmfast/ops/cross_attention.py).
//
//   out = softmax(scale * q @ [k; k2]^T) @ [v; v2],  lse = the rows' log-sum-exp (fp32; fp64 for fp64)
//
// q [B, H, Lq, d], k/v [B, H, Lk, d], optional k2/v2 [B, H, Lk2, d] attended after k/v without building
// the concatenation: the key loop simply walks segment 0 and then segment 1.
//
// Tiling (FlashAttention-2 on a CPU). Forward: at::parallel_for over (B*H, blocks of 64 query rows);
// per task, tiles of 64 keys: logits tile of at most 64 x 64, online softmax with fp32 row statistics
// (mmfast/online_softmax.h), O += P v_tile in fp32, then O / sum and lse = max + log(sum). Backward:
// parallel over B*H (one task owns dq, dk and dv of its head: no reduction between threads); per
// (query block, key tile) it recomputes P = exp(S - lse) and accumulates dV += P^T dO,
// dS = P * (dO V^T - rowsum(dO * O)), dQ += scale dS K, dK += scale dS^T Q, in fp32. No Lq x Lk matrix
// exists beyond one tile.
//
// Tile layout: the logits are computed transposed, S^T = K Q^T (queries in the vector lanes), so the
// per-query max/sum are elementwise vector ops down the key rows, K and V tiles are used as they lie
// (in place for fp32) and never transposed, and P^T / dS^T feed the other products through strides.
// The forward switches to S = Q K^T (keys in the lanes) for blocks of <= 8 queries (SAM's 7 tokens).
//
// Every product goes through one register-blocked micro-GEMM (4 rows x 4 vectors of fp32 accumulators,
// A read as broadcast scalars through strides). Measured on this 2-core AVX-512 machine, one thread, per
// tile: 64x64x64 5.3-6.6 us vs 6.3-9.5 us for at::mm_out into a scratch tensor; SAM's tiles (7x64x16,
// 7x16x64, 64x16x16, 64x16x7) 0.2-0.5 us vs 1.0-1.2 us, where at::mm's per-call overhead dominates
// (ATen's raw cpublas::gemm is not exported to extensions). bf16/fp16 tiles are converted to fp32 on
// load and every sum is in fp32; fp64 inputs run the same code in fp64 (with fp64 statistics), so that
// gradcheck can check the fused backward. bf16 on a CPU with AMX (mmfast/amx.h) runs the products of
// well-filled tiles (d >= 32, >= 32 queries, >= 64 keys) on the AMX tiles instead (AmxTiles below).
//
// Strides: q, k, v, k2, v2, grad_out and out are read/written in place through their B, H and L strides
// (permuted views, and expanded ones with stride 0, cost no copy); only a tensor whose head dim is not
// contiguous is copied first. out is allocated [B, Lq, H, d] and returned transposed to [B, H, Lq, d]
// (as ATen's CPU flash attention does), so merging heads afterwards is a view; each gradient takes its
// input's layout when that layout is dense with a contiguous head dim.
#include "mmfast/cpu_utils.h"  // first: it sets at::vec's CPU capability for every CPU source

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "mmfast/amx.h"
#include "mmfast/checks.h"
#include "mmfast/cross_attention_checks.h"
#include "mmfast/online_softmax.h"

namespace mmfast::cpu {
namespace {

namespace osm = mmfast::online_softmax;
using namespace mmfast::cross_attention;

constexpr int64_t kQueryBlock = 64;  // query rows per task/block
// Keys per tile, a multiple of the fp32 and fp64 vector widths. 512-key tiles for SAM's 7 queries x 4096
// keys (fewer per-row reductions and rescales) measured no faster than 64: loading K/V dominates there.
constexpr int64_t kKeyTile = 64;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The t-th head in head-major order (h outer, b inner), as the index b * H + h. Consecutive tasks then
// share K/V when those are expanded over the batch with stride 0 (SAM: one image's keys for many
// prompts), so each head's K/V is reused from cache: at B=16, H=8, 7 queries x 4096 keys of d=16 the
// forward took 8.2-8.9 ms instead of 9.8-10.1 ms (one thread; 11.5-12 ms with materialized K/V).
inline int64_t head_major(int64_t t, int64_t batch, int64_t heads) { return (t % batch) * heads + t / batch; }

// ---- micro-GEMM: C[m, n] (+)= A[m, k] B[k, n] ------------------------------------------------------
// A(i, t) = a[i * a_rs + t * a_cs] (strides, so A may be a transposed tile); B row t at b + t * ldb;
// n a multiple of the vector width (B and C are padded); C row i at c + i * ldc.
template <typename acc_t, int R, int NV>
inline void gemm_block(int64_t k, const acc_t* a, int64_t a_rs, int64_t a_cs, const acc_t* b, int64_t ldb,
                       acc_t* c, int64_t ldc, bool accumulate) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = accumulate ? V::loadu(c + r * ldc + j * W) : V(acc_t(0));
  for (int64_t t = 0; t < k; ++t) {
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = V::loadu(b + t * ldb + j * W);
    for (int r = 0; r < R; ++r) {
      const V ar(a[r * a_rs + t * a_cs]);
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(ar, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j].store(c + r * ldc + j * W);
}

template <typename acc_t, int R>
inline void gemm_rows(int64_t nv, int64_t k, const acc_t* a, int64_t a_rs, int64_t a_cs, const acc_t* b,
                      int64_t ldb, acc_t* c, int64_t ldc, bool accumulate) {
  switch (nv) {
    case 1: return gemm_block<acc_t, R, 1>(k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
    case 2: return gemm_block<acc_t, R, 2>(k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
    case 3: return gemm_block<acc_t, R, 3>(k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
    default: return gemm_block<acc_t, R, 4>(k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  }
}

template <typename acc_t>
void gemm(int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t a_rs, int64_t a_cs, const acc_t* b,
          int64_t ldb, acc_t* c, int64_t ldc, bool accumulate) {
  constexpr int64_t W = Vec<acc_t>::size();
  for (int64_t jv = 0; jv < n / W; jv += 4) {  // 4 vectors (64 fp32 columns) per block: 16 accumulators
    const int64_t nv = std::min<int64_t>(4, n / W - jv);
    for (int64_t i = 0; i < m; i += 4) {
      const acc_t* ai = a + i * a_rs;
      acc_t* ci = c + i * ldc + jv * W;
      switch (std::min<int64_t>(4, m - i)) {
        case 1: gemm_rows<acc_t, 1>(nv, k, ai, a_rs, a_cs, b + jv * W, ldb, ci, ldc, accumulate); break;
        case 2: gemm_rows<acc_t, 2>(nv, k, ai, a_rs, a_cs, b + jv * W, ldb, ci, ldc, accumulate); break;
        case 3: gemm_rows<acc_t, 3>(nv, k, ai, a_rs, a_cs, b + jv * W, ldb, ci, ldc, accumulate); break;
        default: gemm_rows<acc_t, 4>(nv, k, ai, a_rs, a_cs, b + jv * W, ldb, ci, ldc, accumulate); break;
      }
    }
  }
}

// ---- rows of [B, H, L, d] tensors with a contiguous head dim, any other strides ---------------------
template <typename T>
struct HeadRows {
  T* data;
  int64_t heads, sb, sh, sl;
  template <typename Tensor>
  explicit HeadRows(Tensor&& x)
      : data(static_cast<T*>(x.data_ptr())), heads(x.size(1)), sb(x.stride(0)), sh(x.stride(1)), sl(x.stride(2)) {}
  // Row 0 of head bh = b * H + h; row l is at head(bh) + l * sl. Callers hoist it out of their row loops:
  // an integer division per row cost the SAM forward (4096 keys per head) ~30% of its time.
  T* head(int64_t bh) const { return data + (bh / heads) * sb + (bh % heads) * sh; }
};

// dst[0:n] = mult * src[0:n] in acc_t, dst[n:padded] = 0 (padded >= n rounded up to the vector width).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, int64_t n, int64_t padded, acc_t mult, acc_t* dst) {
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    const fVec m(mult);
    for (; j + kVec <= n; j += kVec) (load_float(src + j) * m).store(dst + j);
    if (j < n) (load_float(src + j, n - j) * m).store(dst + j);  // zero lanes past n
    j = round_up(n, kVec);
  } else {
    for (; j < n; ++j) dst[j] = mult * static_cast<acc_t>(src[j]);
  }
  for (; j < padded; ++j) dst[j] = acc_t(0);
}

// dst[0:n] = mult * src[0:n], rounded to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t n, acc_t mult, scalar_t* dst) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const fVec m(mult);
    for (int64_t j = 0; j < n; j += kVec) store_float(dst + j, fVec::loadu(src + j) * m, std::min(kVec, n - j));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(mult * src[j]);
  }
}

// Max over x[0:n] (n a multiple of the vector width); at::vec::maximum lets a NaN win, as torch.max does.
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  using V = Vec<acc_t>;
  V m = V::loadu(x);
  for (int64_t j = V::size(); j < n; j += V::size()) m = at::vec::maximum(m, V::loadu(x + j));
  return at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, m);
}

// x[j] = exp(x[j] - shift) for j < n (a multiple of the width); returns their sum. exp_u20 everywhere (ATen's
// polynomial exp, ~20 ulp in fp32; fp64 gets the exact one): Sleef's 1-ulp exp took ~10% of the Perceiver
// forward (perf) and the outputs stay within ~5e-7 of the fp64 reference. exp_u20 maps NaN to a finite
// value, so NaN rows are restored from their NaN max / lse by the callers.
template <typename acc_t>
inline acc_t exp_shifted(acc_t* x, int64_t n, acc_t shift) {
  using V = Vec<acc_t>;
  const V s(shift);
  V sum(acc_t(0));
  for (int64_t j = 0; j < n; j += V::size()) {
    const V p = (V::loadu(x + j) - s).exp_u20();
    p.store(x + j);
    sum = sum + p;
  }
  return at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, sum);
}

template <typename acc_t>
inline void scale_row(acc_t* x, int64_t n, acc_t factor) {
  using V = Vec<acc_t>;
  const V f(factor);
  for (int64_t j = 0; j < n; j += V::size()) (V::loadu(x + j) * f).store(x + j);
}

// The key/value stream: segment 0 = (k, v), segment 1 = (k2, v2) when given.
template <typename scalar_t>
struct KeyValueSegments {
  std::vector<HeadRows<const scalar_t>> k, v;
  std::vector<int64_t> length, offset;  // offset: the segment's first row in the concatenated stream
  int64_t total = 0;

  void add(const at::Tensor& keys, const at::Tensor& values) {
    k.emplace_back(keys);
    v.emplace_back(values);
    length.push_back(keys.size(2));
    offset.push_back(total);
    total += keys.size(2);
  }
};

// Asks for the next tile's K/V rows while this one is computed: with SAM's 4096 keys per head (64 MB of
// K/V at B*H = 128, streamed from memory) it took the forward from ~14-18 ms to ~11-12 ms on one thread.
template <typename T>
inline void prefetch_rows(const T* first, int64_t stride, int64_t rows, int64_t d) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < d; c += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(first + j * stride + c);
}

// One key (or value) tile as the micro-GEMM reads it: kn rows of dp columns, `ld` apart. fp32/fp64 rows
// whose head dim fills whole vectors are read in place; others are converted into scratch (zero-padded).
// transpose() also lays it out as [d x kKeyTile] (columns kn..round_up(kn) zero) for the keys-in-lanes step.
template <typename acc_t>
struct KeyRows {
  int64_t dp;
  std::vector<acc_t> copy, transposed;
  const acc_t* rows = nullptr;
  int64_t ld = 0;
  explicit KeyRows(int64_t dp_) : dp(dp_), copy(kKeyTile * dp_), transposed(dp_ * kKeyTile) {}

  void transpose(int64_t kn, int64_t d) {
    const int64_t knp = round_up(kn, Vec<acc_t>::size());
    at::vec::transpose_mxn<acc_t>(rows, ld, transposed.data(), kKeyTile, kn, d);
    for (int64_t c = 0; c < d; ++c) std::fill_n(transposed.data() + c * kKeyTile + kn, knp - kn, acc_t(0));
  }

  template <typename scalar_t>
  void load(const scalar_t* first, int64_t stride, int64_t kn, int64_t d) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (d == dp) {
        rows = first;
        ld = stride;
        return;
      }
    }
    for (int64_t j = 0; j < kn; ++j) load_row(first + j * stride, d, dp, acc_t(1), copy.data() + j * dp);
    rows = copy.data();
    ld = dp;
  }
};

// A block of qn query-side rows (q scaled, or dO) in acc_t: `rows` [qn x dp] and `cols` = its transpose
// [dp x kQueryBlock], columns qn..qnp zero. The logits are computed transposed, S^T = K Q^T (keys x
// queries, queries in the vector lanes), so the per-query softmax statistics are elementwise vector ops
// down the key rows, the K/V tiles need no transposing, and P^T / dS^T feed every product through strides.
template <typename acc_t>
struct QueryBlock {
  int64_t dp;
  std::vector<acc_t> rows, cols;
  explicit QueryBlock(int64_t dp_) : dp(dp_), rows(kQueryBlock * dp_), cols(dp_ * kQueryBlock) {}

  template <typename scalar_t>
  void load(const scalar_t* first, int64_t stride, int64_t qn, int64_t qnp, int64_t d, acc_t mult) {
    for (int64_t i = 0; i < qn; ++i) load_row(first + i * stride, d, dp, mult, rows.data() + i * dp);
    std::fill(rows.begin() + qn * dp, rows.begin() + qnp * dp, acc_t(0));
    at::vec::transpose_mxn<acc_t>(rows.data(), dp, cols.data(), kQueryBlock, qnp, d);
  }
};

// ---- bf16 tile products on AMX (mmfast/amx.h) ----------------------------------------------------------
// bf16 inputs on a CPU with AMX run the tile products on the AMX tiles instead of fp32 FMAs on converted
// tiles, in the FMA path's layouts (S^T, P^T, dS^T with the queries in the vector lanes) and with fp32
// softmax statistics, sums and gradient accumulators. q stays unscaled bf16: the scale multiplies S^T, and
// dK, in fp32. P and dS are rounded to bf16 to enter the products, as FlashAttention does on tensor cores
// (upstream's bf16 module rounds its softmax output and every matmul input too): at the Perceiver's shape
// the errors against float64 are 0.48-0.56% vs 0.48-0.53% with FMAs (bf16 upstream: 0.88-0.90%). Speed at
// that shape (Lq=64, Lk=256+64, d=64, B*H=64), one thread, best of 5 x 20 calls over 5 alternating
// processes: forward 2.58 vs 3.85 ms, backward 5.78 vs 8.00 ms with FMAs.
// The tiles pay off when they are well filled. Measured one thread, bf16, min of 15 calls over 3 alternating
// rounds: SAM's shapes (d=16 padded to a 32 depth; 7 queries or 7 keys padded to 16/32) ran slower on them
// (tokens->image backward 12-14 vs 7.5-8.8 ms, image->tokens forward 6.4-11 vs 3.3-6 ms).
template <typename scalar_t>
bool runs_on_tiles(int64_t d, int64_t queries, int64_t keys) {
  return std::is_same_v<scalar_t, c10::BFloat16> && d >= 32 && queries >= 32 && keys >= 64 && amx::available();
}

struct AmxTiles {
  amx::TileScope tile_scope;  // this thread's tile configuration, for the object's lifetime
  int64_t d, dp, dp32;
  std::vector<uint16_t> q_t, k_rows, v_pairs;     // forward and backward
  std::vector<uint16_t> do_t, do_pairs, q_pairs;  // backward: per query block
  std::vector<uint16_t> k_pairs, v_rows, a_rows;  // backward: per key tile
  std::vector<float> f_cols, c_tile;
  AmxTiles(int64_t d_, int64_t dp_, bool backward)
      : d(d_), dp(dp_), dp32(amx::pad_depth(d_)), q_t(dp32 * kQueryBlock), k_rows(kKeyTile * dp32),
        v_pairs(kKeyTile * dp_), do_t(backward ? dp32 * kQueryBlock : 0), do_pairs(backward ? kQueryBlock * dp_ : 0),
        q_pairs(backward ? kQueryBlock * dp_ : 0), k_pairs(backward ? kKeyTile * dp_ : 0),
        v_rows(backward ? kKeyTile * dp32 : 0), a_rows(kQueryBlock * kKeyTile), f_cols(kQueryBlock * kKeyTile),
        c_tile(backward ? kKeyTile * dp_ : 0) {}

  // Q^T as the B operand of S^T = K Q^T: [d/2][qnp][2], zero past qn and d.
  void load_queries(const c10::BFloat16* first, int64_t stride, int64_t qn, int64_t qnp) {
    amx::pack_vnni_transposed(first, stride, qn, d, q_t.data(), dp32, qnp);
  }

  // The backward's query block: Q^T as above, dO^T (for dP^T = V dO^T), and dO and Q as the B operands
  // of dV += P^T dO and dK += dS^T Q ([qn/2][dp][2], zero past qn).
  void load_block(const c10::BFloat16* q_first, int64_t q_stride, const c10::BFloat16* do_first, int64_t do_stride,
                  int64_t qn, int64_t qnp) {
    const int64_t qnd = amx::pad_depth(qn);
    load_queries(q_first, q_stride, qn, qnp);
    amx::pack_vnni_transposed(do_first, do_stride, qn, d, do_t.data(), dp32, qnp);
    amx::pack_vnni(do_first, do_stride, qn, d, do_pairs.data(), qnd, dp);
    amx::pack_vnni(q_first, q_stride, qn, d, q_pairs.data(), qnd, dp);
  }

  // kn rows of d bf16 as the A operand: read in place when they fill whole tiles (d a multiple of 32, kn
  // of 16: the Perceiver's 64-key tiles of d=64), else copied zero-padded into `scratch`. Returns the rows;
  // `ld` gets their stride.
  const uint16_t* a_rows_of(const c10::BFloat16* first, int64_t stride, int64_t kn, std::vector<uint16_t>& scratch,
                            int64_t& ld) {
    if (d == dp32 && kn % amx::kTileRows == 0) {
      ld = stride;
      return reinterpret_cast<const uint16_t*>(first);
    }
    amx::pack_rows(first, stride, kn, d, scratch.data(), amx::pad_rows(kn), dp32);
    ld = dp32;
    return scratch.data();
  }

  // st[0:kn, 0:qnp] = scale * K Q^T (rows up to kn rounded to 16 are written).
  void logits(const c10::BFloat16* k_first, int64_t stride, int64_t kn, int64_t qnp, float scale, float* st) {
    int64_t ld = 0;
    const uint16_t* k = a_rows_of(k_first, stride, kn, k_rows, ld);
    amx::gemm(amx::pad_rows(kn), qnp, dp32, k, ld, q_t.data(), st, kQueryBlock, false);
    for (int64_t j = 0; j < kn; ++j) scale_row(st + j * kQueryBlock, qnp, scale);
  }

  // a_rows [qnp x kn padded to 32] = bf16 of the transpose of x^T (kn x qnp, kQueryBlock apart): P from P^T,
  // dS from dS^T. Returns the padded depth.
  int64_t rows_from_transposed(const float* xt, int64_t kn, int64_t qnp) {
    const int64_t kn16 = round_up(kn, 16), knd = amx::pad_depth(kn);
    at::vec::transpose_mxn<float>(xt, kQueryBlock, f_cols.data(), kKeyTile, kn, qnp);
    for (int64_t i = 0; i < qnp; ++i) std::fill(f_cols.data() + i * kKeyTile + kn, f_cols.data() + i * kKeyTile + kn16, 0.f);
    amx::pack_rows(f_cols.data(), kKeyTile, qnp, kn16, a_rows.data(), qnp, knd);
    return knd;
  }

  // o[0:qnp, 0:dp] += P V with P = st^T (st holds P^T, kn x qnp).
  void accumulate_pv(const float* st, const c10::BFloat16* v_first, int64_t stride, int64_t kn, int64_t qnp,
                     float* o) {
    const int64_t knd = rows_from_transposed(st, kn, qnp);
    amx::pack_vnni(v_first, stride, kn, d, v_pairs.data(), knd, dp);
    amx::gemm(qnp, dp, knd, a_rows.data(), knd, v_pairs.data(), o, dp, true);
  }

  // dst[0:kn, 0:qnp] = V dO^T.
  void value_grad_products(const c10::BFloat16* v_first, int64_t stride, int64_t kn, int64_t qnp, float* dst) {
    int64_t ld = 0;
    const uint16_t* v = a_rows_of(v_first, stride, kn, v_rows, ld);
    amx::gemm(amx::pad_rows(kn), qnp, dp32, v, ld, do_t.data(), dst, kQueryBlock, false);
  }

  // rows[0:kn] (=, or += unless first) mult * X^T B for X^T = xt (kn x qnp fp32, kQueryBlock apart) and B
  // = dO or Q in pairs: dV += P^T dO, dK += scale dS^T Q.
  void accumulate_key_rows(const float* xt, const std::vector<uint16_t>& b_pairs, int64_t kn, int64_t qn,
                           int64_t qnp, float mult, float* rows, int64_t ld, bool first) {
    const int64_t knp = amx::pad_rows(kn), qnd = amx::pad_depth(qn);
    amx::pack_rows(xt, kQueryBlock, kn, qnp, a_rows.data(), knp, qnd);
    amx::gemm(knp, dp, qnd, a_rows.data(), qnd, b_pairs.data(), c_tile.data(), dp, false);
    const fVec m(mult);
    for (int64_t j = 0; j < kn; ++j)
      for (int64_t c = 0; c < dp; c += kVec) {
        const fVec add = fVec::loadu(c_tile.data() + j * dp + c) * m;
        (first ? add : fVec::loadu(rows + j * ld + c) + add).store(rows + j * ld + c);
      }
  }

  // dq[0:qnp, 0:dp] += dS K with dS = dst^T.
  void accumulate_query_grad(const float* dst, const c10::BFloat16* k_first, int64_t stride, int64_t kn, int64_t qnp,
                             float* dq) {
    const int64_t knd = rows_from_transposed(dst, kn, qnp);
    amx::pack_vnni(k_first, stride, kn, d, k_pairs.data(), knd, dp);
    amx::gemm(qnp, dp, knd, a_rows.data(), knd, k_pairs.data(), dq, dp, true);
  }
};

// ---- forward ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& q, const KeyValueSegments<scalar_t>& kv, acc_t scale, const at::Tensor& out,
                    const at::Tensor& lse) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size(), QB = kQueryBlock;
  const int64_t heads_total = q.size(0) * q.size(1), lq = q.size(2), d = q.size(3), dp = round_up(d, W);
  const int64_t q_blocks = (lq + QB - 1) / QB;
  const HeadRows<const scalar_t> qr(q);
  const HeadRows<scalar_t> outr(out);
  acc_t* lse_ptr = lse.data_ptr<acc_t>();

  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  const bool on_tiles = runs_on_tiles<scalar_t>(d, lq, kv.total);
  parallel_rows(heads_total * q_blocks, QB * kv.total * d, [&](int64_t begin, int64_t end) {
    std::optional<AmxTiles> amx_ops;
    if (on_tiles) amx_ops.emplace(d, dp, /*backward=*/false);
    QueryBlock<acc_t> qs(dp);
    KeyRows<acc_t> key(dp), value(dp);
    std::vector<acc_t> st(kKeyTile * QB), o(QB * dp), tile_max(QB), running_max(QB), tile_sum(QB), rebase(QB);
    std::vector<osm::State<acc_t>> state(QB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = head_major(task / q_blocks, q.size(0), q.size(1)), q0 = (task % q_blocks) * QB;
      const int64_t qn = std::min(QB, lq - q0), qnp = round_up(qn, W);
      // Few queries (SAM's 7 prompt tokens) would leave most query lanes idle: put the keys in the lanes.
      // Measured at Lq=7, Lk=4096, d=16, one thread: 17-20% faster (B*H=128: 11 vs 13 ms) than
      // queries-in-lanes, which spends 2.3x the exps and FMAs on 9 idle lanes of 16.
      const bool keys_in_lanes = 2 * qn <= W;
      const bool tile_task = on_tiles && !keys_in_lanes;
      if constexpr (kBf16) {
        if (tile_task) amx_ops->load_queries(qr.head(bh) + q0 * qr.sl, qr.sl, qn, qnp);
      }
      if (!tile_task) qs.load(qr.head(bh) + q0 * qr.sl, qr.sl, qn, qnp, d, scale);
      std::fill(o.begin(), o.end(), acc_t(0));
      std::fill(state.begin(), state.end(), osm::empty_state<acc_t>());
      std::fill(running_max.begin(), running_max.end(), acc_t(0));  // padding queries: any finite shift

      for (size_t seg = 0; seg < kv.k.size(); ++seg) {
        const HeadRows<const scalar_t>&kr = kv.k[seg], &vr = kv.v[seg];
        const scalar_t *k_head = kr.head(bh), *v_head = vr.head(bh);
        for (int64_t k0 = 0; k0 < kv.length[seg]; k0 += kKeyTile) {
          const int64_t kn = std::min(kKeyTile, kv.length[seg] - k0);
          if (!tile_task) {
            key.load(k_head + k0 * kr.sl, kr.sl, kn, d);
            value.load(v_head + k0 * vr.sl, vr.sl, kn, d);
          }
          const int64_t next = std::min(kKeyTile, kv.length[seg] - k0 - kn);
          prefetch_rows(k_head + (k0 + kn) * kr.sl, kr.sl, next, d);
          prefetch_rows(v_head + (k0 + kn) * vr.sl, vr.sl, next, d);
          if (keys_in_lanes) {
            // S = (scale q) K^T: [qn queries x knp keys]; padding keys get -inf
            key.transpose(kn, d);
            const int64_t knp = round_up(kn, W);
            gemm<acc_t>(qn, knp, d, qs.rows.data(), dp, 1, key.transposed.data(), kKeyTile, st.data(), kKeyTile, false);
            for (int64_t i = 0; i < qn; ++i) {
              acc_t* si = st.data() + i * kKeyTile;
              std::fill(si + kn, si + knp, -std::numeric_limits<acc_t>::infinity());
              const acc_t factor = osm::advance(state[i], row_max(si, knp));
              state[i].sum += exp_shifted(si, knp, state[i].max);
              if (factor != acc_t(1)) scale_row(o.data() + i * dp, dp, factor);
            }
            gemm<acc_t>(qn, dp, kn, st.data(), kKeyTile, 1, value.rows, value.ld, o.data(), dp, true);  // O += P V
            continue;
          }
          // S^T = K (scale q)^T: [kn keys x qnp queries]
          if constexpr (kBf16) {
            if (tile_task) amx_ops->logits(k_head + k0 * kr.sl, kr.sl, kn, qnp, scale, st.data());
          }
          if (!tile_task) gemm<acc_t>(kn, qnp, d, key.rows, key.ld, 1, qs.cols.data(), QB, st.data(), QB, false);
          for (int64_t c = 0; c < qnp; c += W) {  // per-query max over the tile's keys (NaN wins)
            V m = V::loadu(st.data() + c);
            for (int64_t j = 1; j < kn; ++j) m = at::vec::maximum(m, V::loadu(st.data() + j * QB + c));
            m.store(tile_max.data() + c);
          }
          for (int64_t i = 0; i < qn; ++i) {
            rebase[i] = osm::advance(state[i], tile_max[i]);
            running_max[i] = state[i].max;
          }
          for (int64_t c = 0; c < qnp; c += W) {  // P^T = exp(S^T - max), per-query sums
            const V m = V::loadu(running_max.data() + c);
            V sum(acc_t(0));
            for (int64_t j = 0; j < kn; ++j) {
              const V p = (V::loadu(st.data() + j * QB + c) - m).exp_u20();
              p.store(st.data() + j * QB + c);
              sum = sum + p;
            }
            sum.store(tile_sum.data() + c);
          }
          for (int64_t i = 0; i < qn; ++i) {
            state[i].sum += tile_sum[i];
            if (rebase[i] != acc_t(1)) scale_row(o.data() + i * dp, dp, rebase[i]);
          }
          // O += P V  (P read from P^T through its strides)
          if constexpr (kBf16) {
            if (tile_task) amx_ops->accumulate_pv(st.data(), v_head + k0 * vr.sl, vr.sl, kn, qnp, o.data());
          }
          if (!tile_task) gemm<acc_t>(qn, dp, kn, st.data(), 1, QB, value.rows, value.ld, o.data(), dp, true);
        }
      }
      scalar_t* out_rows = outr.head(bh) + q0 * outr.sl;
      for (int64_t i = 0; i < qn; ++i) {
        const bool nan_row = state[i].max != state[i].max;  // a NaN logit: the row is NaN, as in the reference
        const acc_t mult = nan_row ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(1) / state[i].sum;
        store_row(o.data() + i * dp, d, mult, out_rows + i * outr.sl);
        lse_ptr[bh * lq + q0 + i] = osm::log_sum_exp(state[i]);
      }
    }
  });
}

// ---- backward --------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const KeyValueSegments<scalar_t>& kv,
                     const at::Tensor& out, const at::Tensor& lse, acc_t scale, const at::Tensor& grad_q,
                     const std::vector<at::Tensor>& grad_k, const std::vector<at::Tensor>& grad_v) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size(), QB = kQueryBlock;
  const int64_t heads_total = q.size(0) * q.size(1), lq = q.size(2), d = q.size(3), dp = round_up(d, W);
  const HeadRows<const scalar_t> qr(q), gor(grad_out), outr(out);
  const HeadRows<scalar_t> gqr(grad_q);
  std::vector<HeadRows<scalar_t>> gkr, gvr;
  for (size_t seg = 0; seg < grad_k.size(); ++seg) {
    gkr.emplace_back(grad_k[seg]);
    gvr.emplace_back(grad_v[seg]);
  }
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  // dK and dV accumulate in the gradient tensors themselves when those hold acc_t rows of whole vectors
  // (fp32/fp64, d a multiple of the width); else in fp32 scratch rows converted at the end. Skipping the
  // scratch pass took ~20% off the kernel's time for SAM's 4096 keys per head (perf).
  const bool grads_in_place = std::is_same_v<scalar_t, acc_t> && d == dp;
  const size_t segments = kv.k.size();

  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  const bool on_tiles = runs_on_tiles<scalar_t>(d, lq, kv.total);
  parallel_rows(heads_total, 3 * lq * kv.total * d, [&](int64_t begin, int64_t end) {
    std::optional<AmxTiles> amx_ops;
    if (on_tiles) amx_ops.emplace(d, dp, /*backward=*/true);
    QueryBlock<acc_t> qs(dp), dos(dp);
    KeyRows<acc_t> key(dp), value(dp);
    std::vector<acc_t> pt(kKeyTile * QB), dst(kKeyTile * QB), dq(QB * dp), delta(QB), row_lse(QB), orow(dp);
    std::vector<acc_t> dk(grads_in_place ? 0 : kv.total * dp), dv(grads_in_place ? 0 : kv.total * dp);
    std::vector<acc_t*> dk_rows(segments), dv_rows(segments);  // per segment: row 0 of this head's dK, dV
    std::vector<int64_t> dk_ld(segments, dp), dv_ld(segments, dp);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = head_major(t, q.size(0), q.size(1));
      const scalar_t *q_head = qr.head(bh), *go_head = gor.head(bh), *out_head = outr.head(bh);
      for (size_t seg = 0; seg < segments; ++seg) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (grads_in_place) {
            dk_rows[seg] = gkr[seg].head(bh), dk_ld[seg] = gkr[seg].sl;
            dv_rows[seg] = gvr[seg].head(bh), dv_ld[seg] = gvr[seg].sl;
            continue;
          }
        }
        dk_rows[seg] = dk.data() + kv.offset[seg] * dp;
        dv_rows[seg] = dv.data() + kv.offset[seg] * dp;
      }
      for (int64_t q0 = 0; q0 < lq; q0 += QB) {
        const int64_t qn = std::min(QB, lq - q0), qnp = round_up(qn, W);
        if constexpr (kBf16) {
          if (on_tiles) amx_ops->load_block(q_head + q0 * qr.sl, qr.sl, go_head + q0 * gor.sl, gor.sl, qn, qnp);
        }
        if (!on_tiles) qs.load(q_head + q0 * qr.sl, qr.sl, qn, qnp, d, scale);
        dos.load(go_head + q0 * gor.sl, gor.sl, qn, qnp, d, acc_t(1));  // its rows give delta
        for (int64_t i = 0; i < qnp; ++i) {
          if (i >= qn) {  // padding queries: P = exp(0 - inf) = 0 keeps their columns zero
            delta[i] = 0;
            row_lse[i] = std::numeric_limits<acc_t>::infinity();
            continue;
          }
          load_row(out_head + (q0 + i) * outr.sl, d, dp, acc_t(1), orow.data());
          acc_t dot = 0;  // delta_i = rowsum(dO * O)
          for (int64_t c = 0; c < d; ++c) dot += dos.rows[i * dp + c] * orow[c];
          delta[i] = dot;
          row_lse[i] = lse_ptr[bh * lq + q0 + i];
        }
        std::fill(dq.begin(), dq.end(), acc_t(0));
        for (size_t seg = 0; seg < kv.k.size(); ++seg) {
          const HeadRows<const scalar_t>&kr = kv.k[seg], &vr = kv.v[seg];
          const scalar_t *k_head = kr.head(bh), *v_head = vr.head(bh);
          for (int64_t k0 = 0; k0 < kv.length[seg]; k0 += kKeyTile) {
            const int64_t kn = std::min(kKeyTile, kv.length[seg] - k0);
            acc_t* dk_tile = dk_rows[seg] + k0 * dk_ld[seg];
            acc_t* dv_tile = dv_rows[seg] + k0 * dv_ld[seg];
            const bool first_block = q0 == 0;  // the first query block writes dK/dV, later ones add
            if (!on_tiles) {
              key.load(k_head + k0 * kr.sl, kr.sl, kn, d);
              value.load(v_head + k0 * vr.sl, vr.sl, kn, d);
            }
            const int64_t next = std::min(kKeyTile, kv.length[seg] - k0 - kn);
            prefetch_rows(k_head + (k0 + kn) * kr.sl, kr.sl, next, d);
            prefetch_rows(v_head + (k0 + kn) * vr.sl, vr.sl, next, d);
            // P^T = exp(S^T - lse), recomputed; a NaN lse keeps its column NaN (exp_u20 would not).
            if constexpr (kBf16) {
              if (on_tiles) amx_ops->logits(k_head + k0 * kr.sl, kr.sl, kn, qnp, scale, pt.data());
            }
            if (!on_tiles) gemm<acc_t>(kn, qnp, d, key.rows, key.ld, 1, qs.cols.data(), QB, pt.data(), QB, false);
            for (int64_t c = 0; c < qnp; c += W) {
              const V l = V::loadu(row_lse.data() + c), nan_lse = l.isnan();
              for (int64_t j = 0; j < kn; ++j) {
                acc_t* p = pt.data() + j * QB + c;
                V::blendv((V::loadu(p) - l).exp_u20(), l, nan_lse).store(p);
              }
            }
            // dV += P^T dO;  dS^T = P^T * (V dO^T - delta)
            if constexpr (kBf16) {
              if (on_tiles) {
                amx_ops->accumulate_key_rows(pt.data(), amx_ops->do_pairs, kn, qn, qnp, 1.f, dv_tile, dv_ld[seg], first_block);
                amx_ops->value_grad_products(v_head + k0 * vr.sl, vr.sl, kn, qnp, dst.data());
              }
            }
            if (!on_tiles) {
              gemm<acc_t>(kn, dp, qn, pt.data(), QB, 1, dos.rows.data(), dp, dv_tile, dv_ld[seg], !first_block);
              gemm<acc_t>(kn, qnp, d, value.rows, value.ld, 1, dos.cols.data(), QB, dst.data(), QB, false);
            }
            for (int64_t c = 0; c < qnp; c += W) {
              const V dl = V::loadu(delta.data() + c);
              for (int64_t j = 0; j < kn; ++j) {
                acc_t* ds = dst.data() + j * QB + c;
                (V::loadu(pt.data() + j * QB + c) * (V::loadu(ds) - dl)).store(ds);
              }
            }
            // dQ += dS K (times scale at the end);  dK += dS^T (scale q)
            if constexpr (kBf16) {
              if (on_tiles) {
                amx_ops->accumulate_query_grad(dst.data(), k_head + k0 * kr.sl, kr.sl, kn, qnp, dq.data());
                amx_ops->accumulate_key_rows(dst.data(), amx_ops->q_pairs, kn, qn, qnp, scale, dk_tile, dk_ld[seg], first_block);
              }
            }
            if (!on_tiles) {
              gemm<acc_t>(qn, dp, kn, dst.data(), 1, QB, key.rows, key.ld, dq.data(), dp, true);
              gemm<acc_t>(kn, dp, qn, dst.data(), QB, 1, qs.rows.data(), dp, dk_tile, dk_ld[seg], !first_block);
            }
          }
        }
        scalar_t* gq_rows = gqr.head(bh) + q0 * gqr.sl;
        for (int64_t i = 0; i < qn; ++i) store_row(dq.data() + i * dp, d, scale, gq_rows + i * gqr.sl);
      }
      if (grads_in_place) continue;
      for (size_t seg = 0; seg < segments; ++seg) {
        scalar_t *gk_head = gkr[seg].head(bh), *gv_head = gvr[seg].head(bh);
        for (int64_t j = 0; j < kv.length[seg]; ++j) {
          const int64_t r = (kv.offset[seg] + j) * dp;
          store_row(dk.data() + r, d, acc_t(1), gk_head + j * gkr[seg].sl);
          store_row(dv.data() + r, d, acc_t(1), gv_head + j * gvr[seg].sl);
        }
      }
    }
  });
}

// ---- the operator entry points (argument checks: mmfast/cross_attention_checks.h) ----------------------
template <typename scalar_t>
KeyValueSegments<scalar_t> segments(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& k2,
                                    const std::optional<at::Tensor>& v2) {
  KeyValueSegments<scalar_t> kv;
  kv.add(k, v);
  if (k2.has_value()) kv.add(*k2, *v2);
  return kv;
}

std::tuple<at::Tensor, at::Tensor> cross_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const std::optional<at::Tensor>& k2_in,
                                                       const std::optional<at::Tensor>& v2_in, double scale) {
  check_inputs(q_in, k_in, v_in, k2_in, v2_in, /*allow_double=*/true);
  const at::Tensor q = head_dim_contiguous(q_in), k = head_dim_contiguous(k_in), v = head_dim_contiguous(v_in);
  std::optional<at::Tensor> k2, v2;
  if (k2_in.has_value()) {
    k2 = head_dim_contiguous(*k2_in);
    v2 = head_dim_contiguous(*v2_in);
  }
  const int64_t b = q.size(0), h = q.size(1), lq = q.size(2);
  at::Tensor out = empty_output(q);
  at::Tensor lse = at::empty({b, h, lq}, q.options().dtype(stats_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mmfast::cross_attention", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(q, segments<scalar_t>(k, v, k2, v2), static_cast<acc_t>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& k2_in, const std::optional<at::Tensor>& v2_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale) {
  check_inputs(q_in, k_in, v_in, k2_in, v2_in, /*allow_double=*/true);
  check_backward_inputs(q_in, grad_out_in, out_in, lse_in);
  const at::Tensor q = head_dim_contiguous(q_in), k = head_dim_contiguous(k_in), v = head_dim_contiguous(v_in);
  const at::Tensor grad_out = head_dim_contiguous(grad_out_in), out = head_dim_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  std::optional<at::Tensor> k2, v2;
  std::vector<at::Tensor> grad_k{grad_like(k_in)}, grad_v{grad_like(v_in)};
  at::Tensor grad_k2 = at::empty({0}, q.options()), grad_v2 = at::empty({0}, q.options());
  if (k2_in.has_value()) {
    k2 = head_dim_contiguous(*k2_in);
    v2 = head_dim_contiguous(*v2_in);
    grad_k2 = grad_like(*k2_in);
    grad_v2 = grad_like(*v2_in);
    grad_k.push_back(grad_k2);
    grad_v.push_back(grad_v2);
  }
  at::Tensor grad_q = grad_like(q_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mmfast::cross_attention_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(grad_out, q, segments<scalar_t>(k, v, k2, v2), out, lse,
                                     static_cast<acc_t>(scale), grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k[0], grad_v[0], grad_k2, grad_v2};
}

}  // namespace
}  // namespace mmfast::cpu

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cross_attention", &mmfast::cpu::cross_attention_cpu);
  m.impl("cross_attention_backward", &mmfast::cpu::cross_attention_backward_cpu);
}
