// CUDA kernels of mmfast::cross_attention / cross_attention_backward (schemas in csrc/mmfast.cpp; glue in
// csrc/cuda/cross_attention_api.cpp; the CPU kernels in csrc/cpu/cross_attention.cpp follow the same plan).
//
//   out = softmax(scale * q @ [k; k2]^T) @ [v; v2],   lse = the rows' log-sum-exp (fp32)
//
// FlashAttention-2's tiling, in two sets of kernels with one plan; every sum and softmax statistic is fp32:
//   forward   one block per (batch*head, 64 query rows); key tiles of 64 stream through shared memory
//             (segment 0, then segment 1: the concatenation is never built); online softmax with fp32
//             row statistics (mmfast/online_softmax.h); O += P V; out = O / sum, lse = max + log(sum).
//             Few query blocks (SAM's 7 tokens) split the keys into ranges merged by their lse (split-K).
//   backward  delta = rowsum(dO * O) (one warp per row), then two kernels that recompute P = exp(S - lse):
//             dK/dV, one block per 64-key block streaming 32-query tiles (dV += P^T dO, dK += dS^T Q), and
//             dQ, one block per 64-query block streaming 32-key tiles (dQ += dS K), dS = P (dO V^T - delta).
//             Each block owns the rows it writes: no atomics, the result is deterministic.
//
// CUDA cores (fp32, exact; fp16/bf16 on GPUs before sm_80 or without MMFAST_CUDA_TENSOR_CORES=1): fp32 FMAs
// on fp32 copies of the tiles. 256 threads; thread t owns kRowsPerThread = 2 rows of the block's 64-row
// tile (rows 2 * (t / 8) + {0, 1}) and, of every streamed tile, the columns t % 8 + 8 j, so a row's
// statistics reduce over 8 adjacent lanes with three shuffles. Shared tiles use an odd row pitch (d + 1,
// tile + 1) so that the 8 lanes reading down a column hit 8 banks.
//
// Tensor cores (fp16/bf16 on sm_80+): the "tensor cores" section below, mma.m16n8k16 through mmfast/mma.cuh.
// On the H200 of 2026-12-04 the CUDA-core kernels were correct in every dtype but 0.28-0.83x SDPA in bf16;
// the tensor-core ones are tested in CI on the emulator (tests/test_cuda_emulation.py) and compiled for
// sm_90a without spills (tests/test_mma_emulation.py: forward 95-168 registers, dK/dV 54-240, dQ 72-166 at
// d = 16-128), and still wait for a GPU run to be validated and timed.
#include "mmfast/cross_attention_cuda.h"
#include "mmfast/cuda_launch.cuh"
#include "mmfast/cuda_utils.cuh"
#include "mmfast/mma.cuh"

#include <algorithm>
#include <cstdint>

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;            // lanes sharing a tile row; tx = threadIdx.x % kGroup
constexpr int kBlockRows = 64;       // the block's own tile: queries (forward, dQ) or keys (dK/dV)
constexpr int kRowsPerThread = kBlockRows * kGroup / kThreads;  // 2
constexpr int kForwardKeyTile = 64;  // keys per streamed tile in the forward
constexpr int kBackwardTile = 32;    // queries (dK/dV) or keys (dQ) per streamed tile in the backward
static_assert(kRowsPerThread * kThreads == kBlockRows * kGroup, "every tile row has exactly kGroup lanes");

// ---- typed views of the launchers' operands --------------------------------------------------------
template <typename T>
struct Rows {  // one [B, H, L, d] operand, read-only
  const T* data;
  int64_t sb, sh, sl;
  __device__ const T* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

template <typename T>
struct OutRows {
  T* data;
  int64_t sb, sh, sl;
  __device__ T* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

template <typename T>
Rows<T> typed(HeadRows x) {
  return {static_cast<const T*>(x.data), x.batch_stride, x.head_stride, x.row_stride};
}

template <typename T>
OutRows<T> typed(MutableHeadRows x) {
  return {static_cast<T*>(x.data), x.batch_stride, x.head_stride, x.row_stride};
}

template <typename T>
struct Params {
  int64_t batch, heads, q_len, head_dim;
  int segments;
  int64_t key_len[2];
  int64_t key_blocks[2];  // 64-key blocks per segment (dK/dV grid)
  int64_t row_blocks;     // 64-query blocks (forward and dQ grids)
  int splits;             // forward key splits (split-K; 1: none)
  int64_t split_keys;     // keys per split (a multiple of the forward key tile) when splits > 1
  float scale;
  Rows<T> q, k[2], v[2], out, grad_out;
  OutRows<T> out_w, grad_q, grad_k[2], grad_v[2];
  float* lse_w;
  float* split_out;  // splits > 1: [splits, B*H, Lq, d] fp32, each split's normalized output
  float* split_lse;  // splits > 1: [splits, B*H, Lq] fp32, each split's log-sum-exp
  const float* lse;
  float* delta_w;
  const float* delta;
};

// ---- tile helpers ------------------------------------------------------------------------------------
// Copies rows [r0, r0 + n) of one head into tile[ROWS][ld]; rows >= n and columns >= d (up to the padded
// head dim D) become 0, so padded rows and columns add nothing to any product. Whole block (THREADS threads).
// The CUDA-core kernels' tiles are fp32; the tensor-core kernels' keep T (fp16/bf16, mmfast/mma.cuh).
template <int ROWS, int D, int THREADS = kThreads, typename Tile, typename T>
__device__ __forceinline__ void load_tile(Tile* tile, int ld, const T* head, int64_t row_stride, int64_t r0,
                                          int64_t n, int d) {
  if constexpr (std::is_same_v<Tile, float>) {
    for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
      const int r = e / D, c = e % D;
      tile[r * ld + c] = (r < n && c < d) ? to_float(head[(r0 + r) * row_stride + c]) : 0.f;
    }
  } else {
    static_assert(std::is_same_v<Tile, T>, "T tiles hold the operands' own type");
    load_rows_tile<ROWS, D, THREADS>(tile, ld, head, row_stride, r0, n, d);
  }
}

// acc[i][j] = sum_c A[row0 + i][c] * B[tx + 8 j][c] over the padded head dim: the thread's rows of the
// block tile A against its columns of the streamed tile B (both [rows][ld] fp32 in shared memory).
template <int R, int C, int D>
__device__ __forceinline__ void tile_dots(const float* A, int lda, int row0, const float* B, int ldb, int tx,
                                          float (&acc)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) acc[i][j] = 0.f;
#pragma unroll 8
  for (int c = 0; c < D; ++c) {
    float a[R], b[C];
#pragma unroll
    for (int i = 0; i < R; ++i) a[i] = A[(row0 + i) * lda + c];
#pragma unroll
    for (int j = 0; j < C; ++j) b[j] = B[(tx + kGroup * j) * ldb + c];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < C; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// acc[i][c] += sum_n M[row0 + i][n] * X[n][tx + 8 c]: the thread's rows of an [rows][N] tile (P, dS, ...)
// times its head-dim columns of an [N][ldx] tile (V, dO, Q or K).
template <int R, int DC, int N>
__device__ __forceinline__ void tile_matmul_acc(const float* M, int ldm, int row0, const float* X, int ldx, int tx,
                                                float (&acc)[R][DC]) {
#pragma unroll 4
  for (int n = 0; n < N; ++n) {
    float m[R];
#pragma unroll
    for (int i = 0; i < R; ++i) m[i] = M[(row0 + i) * ldm + n];
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const float x = X[n * ldx + tx + kGroup * c];
#pragma unroll
      for (int i = 0; i < R; ++i) acc[i][c] = fmaf(m[i], x, acc[i][c]);
    }
  }
}

// Max / sum over the 8 lanes of a tile row (lanes 8k..8k+7 of a warp); every lane gets the result.
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = 1; o < kGroup; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = 1; o < kGroup; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Writes the thread's [R][DC] accumulators times `factor` (per row) to rows row_begin + row0 + i < n_rows.
template <int R, int DC, typename T>
__device__ __forceinline__ void store_rows(T* head, int64_t row_stride, int64_t row_begin, int64_t n_rows, int row0,
                                           int tx, int d, const float (&acc)[R][DC], const float (&factor)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = row_begin + row0 + i;
    if (r >= n_rows) continue;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int col = tx + kGroup * c;
      if (col < d) head[r * row_stride + col] = from_float<T>(acc[i][c] * factor[i]);
    }
  }
}

// Streams keys [begin, end) of head (b, h) — indices into the concatenation of segment 0 and segment 1,
// which is never built — through k_tile [KT][k_ld] and v_tile [KT][v_ld] (fp32, or T for the tensor-core
// kernels) and calls body(kn) once per tile (kn = the tile's valid keys) after both are loaded. The first
// barrier also publishes whatever the block wrote to shared memory before the loop.
template <int KT, int D, int THREADS = kThreads, typename T, typename Tile, typename Body>
__device__ __forceinline__ void for_each_key_tile(const Params<T>& p, int64_t b, int64_t h, int64_t begin,
                                                  int64_t end, Tile* k_tile, int k_ld, Tile* v_tile, int v_ld,
                                                  Body&& body) {
  const int d = static_cast<int>(p.head_dim);
  int64_t seg_start = 0;
  for (int seg = 0; seg < p.segments; seg_start += p.key_len[seg], ++seg) {
    const T* k_head = p.k[seg].head(b, h);
    const T* v_head = p.v[seg].head(b, h);
    const int64_t from = std::max<int64_t>(begin - seg_start, 0);
    const int64_t len = std::min<int64_t>(end - seg_start, p.key_len[seg]);
    for (int64_t k0 = from; k0 < len; k0 += KT) {
      const int kn = static_cast<int>(std::min<int64_t>(KT, len - k0));
      __syncthreads();  // the previous tile's readers are done
      load_tile<KT, D, THREADS>(k_tile, k_ld, k_head, p.k[seg].sl, k0, kn, d);
      load_tile<KT, D, THREADS>(v_tile, v_ld, v_head, p.v[seg].sl, k0, kn, d);
      __syncthreads();
      body(kn);
    }
  }
}

// Shared-memory floats per kernel for padded head dim D (odd pitches, see the header comment).
template <int D>
constexpr int forward_smem_floats() {
  return 2 * kBlockRows * (D + 1) + kForwardKeyTile * D + kBlockRows * (kForwardKeyTile + 1);
}
template <int D>
constexpr int dkdv_smem_floats() {
  return 2 * kBlockRows * (D + 1) + 2 * kBackwardTile * (D + 1) + 2 * kBlockRows * (kBackwardTile + 1) +
         2 * kBackwardTile;
}
template <int D>
constexpr int dq_smem_floats() {
  return 2 * kBlockRows * (D + 1) + 2 * kBackwardTile * (D + 1) + kBlockRows * (kBackwardTile + 1);
}

// ================================ forward ========================================================
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const Params<T> p) {
  constexpr int R = kRowsPerThread, KT = kForwardKeyTile, C = KT / kGroup, DC = D / kGroup;
  constexpr int LD = D + 1, PLD = KT + 1;
  MMFAST_DYNAMIC_SMEM(float, smem);
  float* q_tile = smem;                     // [64][LD]
  float* k_tile = q_tile + kBlockRows * LD;  // [KT][LD]
  float* v_tile = k_tile + KT * LD;          // [KT][D]
  float* p_tile = v_tile + KT * D;           // [64][PLD]

  const int tx = threadIdx.x % kGroup, row0 = threadIdx.x / kGroup * R;
  const int64_t bh_blocks = p.batch * p.heads;
  const int64_t split = blockIdx.x / (bh_blocks * p.row_blocks), rest = blockIdx.x % (bh_blocks * p.row_blocks);
  const int64_t bh = rest / p.row_blocks, q0 = rest % p.row_blocks * kBlockRows;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int d = static_cast<int>(p.head_dim);
  const int64_t key_begin = p.splits > 1 ? split * p.split_keys : 0;
  const int64_t key_end = p.splits > 1 ? key_begin + p.split_keys : p.key_len[0] + p.key_len[1];
  load_tile<kBlockRows, D>(q_tile, LD, p.q.head(b, h), p.q.sl, q0, p.q_len - q0, d);

  float o[R][DC];
  online_softmax::State<float> st[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    st[i] = online_softmax::empty_state<float>();
#pragma unroll
    for (int c = 0; c < DC; ++c) o[i][c] = 0.f;
  }

  for_each_key_tile<KT, D>(p, b, h, key_begin, key_end, k_tile, LD, v_tile, D, [&](int kn) {
    float s[R][C];
    tile_dots<R, C, D>(q_tile, LD, row0, k_tile, LD, tx, s);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        s[i][j] = tx + kGroup * j < kn ? s[i][j] * p.scale : -INFINITY;
        tile_max = fmaxf(tile_max, s[i][j]);  // fmaxf skips NaN: a NaN logit poisons the sum below instead
      }
      const float factor = online_softmax::advance(st[i], group_max(tile_max));
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        // -inf logits (masked keys) add exactly 0, never the NaN of (-inf) - (-inf).
        const float e = s[i][j] == -INFINITY ? 0.f : fast_exp(s[i][j] - st[i].max);
        sum += e;
        p_tile[(row0 + i) * PLD + tx + kGroup * j] = e;
      }
      st[i].sum += group_sum(sum);
#pragma unroll
      for (int c = 0; c < DC; ++c) o[i][c] *= factor;
    }
    __syncthreads();
    tile_matmul_acc<R, DC, KT>(p_tile, PLD, row0, v_tile, D, tx, o);
  });

  float inv_sum[R];
  float* lse = p.splits > 1 ? p.split_lse + split * bh_blocks * p.q_len : p.lse_w;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    inv_sum[i] = 1.f / st[i].sum;  // a row with no finite logit has sum 0: NaN out, as the reference
    const int64_t r = q0 + row0 + i;
    if (tx == 0 && r < p.q_len) lse[bh * p.q_len + r] = st[i].max + logf(st[i].sum);
  }
  if (p.splits > 1) {  // this split's normalized output, merged by attention_split_merge_kernel
    float* head = p.split_out + ((split * bh_blocks + bh) * p.q_len) * p.head_dim;
    store_rows<R, DC>(head, p.head_dim, q0, p.q_len, row0, tx, d, o, inv_sum);
  } else {
    store_rows<R, DC>(p.out_w.head(b, h), p.out_w.sl, q0, p.q_len, row0, tx, d, o, inv_sum);
  }
}

// Split-K merge, one warp per query row: lse = logsumexp_s lse_s, out = sum_s exp(lse_s - lse) out_s.
// A split whose keys gave the row no finite logit (lse_s = -inf) adds nothing; NaN stays NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_split_merge_kernel(const Params<T> p, int64_t total_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (r >= total_rows) return;  // the whole warp leaves together; no barrier follows
  online_softmax::State<float> st = online_softmax::empty_state<float>();
  for (int s = 0; s < p.splits; ++s) {  // exp(lse_s - max) summed with the running max: one pass
    const float l = p.split_lse[s * total_rows + r];
    online_softmax::advance(st, l);
    st.sum += l == -INFINITY ? 0.f : fast_exp(l - st.max);
  }
  const float lse = st.max + logf(st.sum);
  // No split saw a finite logit: NaN, as the unsplit kernel's 0 / 0 and the reference's softmax.
  const float empty = st.sum == 0.f ? NAN : 0.f;
  const int64_t bh = r / p.q_len, i = r % p.q_len, b = bh / p.heads, h = bh % p.heads;
  T* out = p.out_w.head(b, h) + i * p.out_w.sl;
  for (int c = lane; c < p.head_dim; c += 32) {
    float acc = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float l = p.split_lse[s * total_rows + r];
      if (l != -INFINITY) acc = fmaf(fast_exp(l - lse), p.split_out[(s * total_rows + r) * p.head_dim + c], acc);
    }
    out[c] = from_float<T>(acc + empty);
  }
  if (lane == 0) p.lse_w[r] = lse;
}

// ================================ backward =======================================================
// delta[bh, i] = sum_c grad_out[i, c] * out[i, c], one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const Params<T> p, int64_t total_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (r >= total_rows) return;  // the whole warp leaves together; no barrier follows
  const int64_t bh = r / p.q_len, i = r % p.q_len, b = bh / p.heads, h = bh % p.heads;
  const T* go = p.grad_out.head(b, h) + i * p.grad_out.sl;
  const T* o = p.out.head(b, h) + i * p.out.sl;
  float acc = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) acc = fmaf(to_float(go[c]), to_float(o[c]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta_w[r] = acc;
}

// dK, dV of one 64-key block of one segment: stream the queries in tiles of 32.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(const Params<T> p) {
  constexpr int R = kRowsPerThread, QT = kBackwardTile, C = QT / kGroup, DC = D / kGroup;
  constexpr int LD = D + 1, PLD = QT + 1;
  MMFAST_DYNAMIC_SMEM(float, smem);
  float* k_tile = smem;                        // [64][LD]
  float* v_tile = k_tile + kBlockRows * LD;     // [64][LD]
  float* q_tile = v_tile + kBlockRows * LD;     // [QT][LD]
  float* do_tile = q_tile + QT * LD;            // [QT][LD]
  float* pt_tile = do_tile + QT * LD;           // [64][PLD]  P^T
  float* dst_tile = pt_tile + kBlockRows * PLD;  // [64][PLD]  dS^T
  float* lse_tile = dst_tile + kBlockRows * PLD;  // [QT]
  float* delta_tile = lse_tile + QT;              // [QT]

  const int tx = threadIdx.x % kGroup, row0 = threadIdx.x / kGroup * R;
  const int64_t blocks = p.key_blocks[0] + p.key_blocks[1];
  const int64_t bh = blockIdx.x / blocks, kb = blockIdx.x % blocks;
  const int seg = kb < p.key_blocks[0] ? 0 : 1;
  const int64_t k0 = (kb - (seg == 0 ? 0 : p.key_blocks[0])) * kBlockRows;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int d = static_cast<int>(p.head_dim);
  const int64_t kn = std::min<int64_t>(kBlockRows, p.key_len[seg] - k0);
  load_tile<kBlockRows, D>(k_tile, LD, p.k[seg].head(b, h), p.k[seg].sl, k0, kn, d);
  load_tile<kBlockRows, D>(v_tile, LD, p.v[seg].head(b, h), p.v[seg].sl, k0, kn, d);

  const T* q_head = p.q.head(b, h);
  const T* do_head = p.grad_out.head(b, h);
  const float* lse = p.lse + bh * p.q_len;
  const float* delta = p.delta + bh * p.q_len;
  float dk[R][DC], dv[R][DC];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int c = 0; c < DC; ++c) dk[i][c] = dv[i][c] = 0.f;

  for (int64_t q0 = 0; q0 < p.q_len; q0 += QT) {
    const int64_t qn = std::min<int64_t>(QT, p.q_len - q0);
    __syncthreads();  // the previous tile's readers are done
    load_tile<QT, D>(q_tile, LD, q_head, p.q.sl, q0, qn, d);
    load_tile<QT, D>(do_tile, LD, do_head, p.grad_out.sl, q0, qn, d);
    for (int i = threadIdx.x; i < QT; i += kThreads) {
      // A padded query gets lse = +inf: P = exp(-inf) = 0, so it adds nothing.
      lse_tile[i] = i < qn ? lse[q0 + i] : INFINITY;
      delta_tile[i] = i < qn ? delta[q0 + i] : 0.f;
    }
    __syncthreads();

    float s[R][C], dp[R][C];
    tile_dots<R, C, D>(k_tile, LD, row0, q_tile, LD, tx, s);    // S^T = K Q^T
    tile_dots<R, C, D>(v_tile, LD, row0, do_tile, LD, tx, dp);  // dP^T = V dO^T
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const int qi = tx + kGroup * j;
        const float pr = fast_exp(s[i][j] * p.scale - lse_tile[qi]);  // a NaN lse keeps its column NaN
        pt_tile[(row0 + i) * PLD + qi] = pr;
        dst_tile[(row0 + i) * PLD + qi] = pr * (dp[i][j] - delta_tile[qi]);
      }
    }
    __syncthreads();
    tile_matmul_acc<R, DC, QT>(pt_tile, PLD, row0, do_tile, LD, tx, dv);   // dV += P^T dO
    tile_matmul_acc<R, DC, QT>(dst_tile, PLD, row0, q_tile, LD, tx, dk);   // dK += dS^T Q
  }
  float one[R], scale[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    one[i] = 1.f;
    scale[i] = p.scale;
  }
  const int64_t len = p.key_len[seg];
  store_rows<R, DC>(p.grad_k[seg].head(b, h), p.grad_k[seg].sl, k0, len, row0, tx, d, dk, scale);
  store_rows<R, DC>(p.grad_v[seg].head(b, h), p.grad_v[seg].sl, k0, len, row0, tx, d, dv, one);
}

// dQ of one 64-query block: stream the keys of both segments in tiles of 32.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(const Params<T> p) {
  constexpr int R = kRowsPerThread, KT = kBackwardTile, C = KT / kGroup, DC = D / kGroup;
  constexpr int LD = D + 1, PLD = KT + 1;
  MMFAST_DYNAMIC_SMEM(float, smem);
  float* q_tile = smem;                       // [64][LD]
  float* do_tile = q_tile + kBlockRows * LD;   // [64][LD]
  float* k_tile = do_tile + kBlockRows * LD;   // [KT][LD]
  float* v_tile = k_tile + KT * LD;            // [KT][LD]
  float* ds_tile = v_tile + KT * LD;           // [64][PLD]

  const int tx = threadIdx.x % kGroup, row0 = threadIdx.x / kGroup * R;
  const int64_t bh = blockIdx.x / p.row_blocks, q0 = blockIdx.x % p.row_blocks * kBlockRows;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int d = static_cast<int>(p.head_dim);
  const int64_t qn = p.q_len - q0;
  load_tile<kBlockRows, D>(q_tile, LD, p.q.head(b, h), p.q.sl, q0, qn, d);
  load_tile<kBlockRows, D>(do_tile, LD, p.grad_out.head(b, h), p.grad_out.sl, q0, qn, d);
  float lse[R], delta[R], dq[R][DC];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = q0 + row0 + i;
    lse[i] = r < p.q_len ? p.lse[bh * p.q_len + r] : INFINITY;
    delta[i] = r < p.q_len ? p.delta[bh * p.q_len + r] : 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) dq[i][c] = 0.f;
  }

  for_each_key_tile<KT, D>(p, b, h, 0, p.key_len[0] + p.key_len[1], k_tile, LD, v_tile, LD, [&](int kn) {
    float s[R][C], dp[R][C];
    tile_dots<R, C, D>(q_tile, LD, row0, k_tile, LD, tx, s);    // S = Q K^T
    tile_dots<R, C, D>(do_tile, LD, row0, v_tile, LD, tx, dp);  // dP = dO V^T
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const int kj = tx + kGroup * j;
        const float pr = kj < kn ? fast_exp(s[i][j] * p.scale - lse[i]) : 0.f;
        ds_tile[(row0 + i) * PLD + kj] = pr * (dp[i][j] - delta[i]);
      }
    }
    __syncthreads();
    tile_matmul_acc<R, DC, KT>(ds_tile, PLD, row0, k_tile, LD, tx, dq);  // dQ += dS K
  });
  float scale[R];
#pragma unroll
  for (int i = 0; i < R; ++i) scale[i] = p.scale;
  store_rows<R, DC>(p.grad_q.head(b, h), p.grad_q.sl, q0, p.q_len, row0, tx, d, dq, scale);
}

// ================================ tensor cores (fp16/bf16, sm_80+) ======================================
// The same plan on mma.m16n8k16 (mmfast/mma.cuh): 4 warps per block, each owning 16 of the block's 64 rows;
// tiles stay T in shared memory (pitch D + 8: ldmatrix without bank conflicts); products accumulate in fp32
// registers as C fragments, the softmax statistics stay fp32, and the probabilities (P, dS) are rounded
// to T only as the A operand of the next product, as FlashAttention-2 does. A lane holds rows g and g + 8
// of its warp's 16 (g = lane / 4) and, in every 8-column fragment, columns 2t and 2t + 1 (t = lane % 4):
// a row's statistics reduce over the 4 lanes of its group with two shuffles.
constexpr int kMmaThreads = 128;
constexpr int kMmaWarpRows = 16;
static_assert(kMmaThreads / 32 * kMmaWarpRows == kBlockRows, "4 warps of 16 rows make the 64-row block tile");

template <int D>
constexpr int kMmaPitch = D + 8;
template <int D>
constexpr int forward_mma_smem_bytes() {
  return (kBlockRows + 2 * kForwardKeyTile) * kMmaPitch<D> * 2;
}
template <int D>
constexpr int backward_mma_smem_bytes() {  // both backward kernels: two 64-row tiles, two 32-row tiles
  return (2 * kBlockRows + 2 * kBackwardTile) * kMmaPitch<D> * 2 + 2 * kBackwardTile * 4;
}

// The block's dynamic shared memory as T tiles (extern __shared__ arrays of one name must share one type in a
// translation unit: uint4 serves both T, 16-byte aligned for ldmatrix).
template <typename T>
__device__ __forceinline__ T* mma_shared_tiles() {
  MMFAST_DYNAMIC_SMEM(uint4, mma_smem);
  return reinterpret_cast<T*>(mma_smem);
}

// Max / sum over the 4 lanes holding one row of a C fragment.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Writes a warp's 16 x D accumulator times factor[row half] to rows row_begin + (g, g + 8) < n_rows,
// columns < d, of a row-major head (T, or fp32 for split-K partials).
template <int D, typename Out>
__device__ __forceinline__ void store_warp_rows(Out* head, int64_t row_stride, int64_t row_begin, int64_t n_rows,
                                                int d, int lane, const float (&acc)[D / 8][4],
                                                const float (&factor)[2]) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = row_begin + g + 8 * half;
    if (r >= n_rows) continue;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * t + e;
        if (col < d) head[r * row_stride + col] = from_float<Out>(acc[j][2 * half + e] * factor[half]);
      }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) attention_forward_mma_kernel(const Params<T> p) {
  constexpr int KT = kForwardKeyTile, LD = kMmaPitch<D>;
  T* smem = mma_shared_tiles<T>();
  T* q_tile = smem;                     // [64][LD]
  T* k_tile = q_tile + kBlockRows * LD;  // [KT][LD]
  T* v_tile = k_tile + KT * LD;          // [KT][LD]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int64_t bh_blocks = p.batch * p.heads;
  const int64_t split = blockIdx.x / (bh_blocks * p.row_blocks), rest = blockIdx.x % (bh_blocks * p.row_blocks);
  const int64_t bh = rest / p.row_blocks, q0 = rest % p.row_blocks * kBlockRows;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int d = static_cast<int>(p.head_dim);
  const int64_t key_begin = p.splits > 1 ? split * p.split_keys : 0;
  const int64_t key_end = p.splits > 1 ? key_begin + p.split_keys : p.key_len[0] + p.key_len[1];
  const int64_t warp_q0 = q0 + warp * kMmaWarpRows;
  // A warp whose 16 rows are all padding (SAM's 7 tokens use 1 of 4) skips the products, not the barriers.
  const bool active = warp_q0 < p.q_len;
  load_tile<kBlockRows, D, kMmaThreads>(q_tile, LD, p.q.head(b, h), p.q.sl, q0, p.q_len - q0, d);
  const T* q_warp = q_tile + warp * kMmaWarpRows * LD;

  float o[D / 8][4] = {};
  online_softmax::State<float> st[2] = {online_softmax::empty_state<float>(), online_softmax::empty_state<float>()};
  for_each_key_tile<KT, D, kMmaThreads>(p, b, h, key_begin, key_end, k_tile, LD, v_tile, LD, [&](int kn) {
    if (!active) return;
    float s[KT / 8][4] = {};
    warp_mma_abt<T, KT, D>(s, q_warp, LD, k_tile, LD, lane);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < KT / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[j][2 * half + e];
          x = 8 * j + 2 * t + e < kn ? x * p.scale : -INFINITY;
          tile_max = fmaxf(tile_max, x);  // fmaxf skips NaN: a NaN logit poisons the sum below instead
        }
      const float factor = online_softmax::advance(st[half], quad_max(tile_max));
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < KT / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[j][2 * half + e];
          x = x == -INFINITY ? 0.f : fast_exp(x - st[half].max);  // masked keys add exactly 0
          sum += x;
        }
      st[half].sum += quad_sum(sum);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][2 * half] *= factor;
        o[j][2 * half + 1] *= factor;
      }
    }
    warp_mma_cb<T, KT, D>(o, s, v_tile, LD, lane);  // O += P V
  });
  if (!active) return;  // no barrier follows

  float inv_sum[2];
  float* lse = p.splits > 1 ? p.split_lse + split * bh_blocks * p.q_len : p.lse_w;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    inv_sum[half] = 1.f / st[half].sum;  // a row with no finite logit has sum 0: NaN out, as the reference
    const int64_t r = warp_q0 + lane / 4 + 8 * half;
    if (t == 0 && r < p.q_len) lse[bh * p.q_len + r] = st[half].max + logf(st[half].sum);
  }
  if (p.splits > 1) {  // this split's normalized output, merged by attention_split_merge_kernel
    float* head = p.split_out + ((split * bh_blocks + bh) * p.q_len) * p.head_dim;
    store_warp_rows<D>(head, p.head_dim, warp_q0, p.q_len, d, lane, o, inv_sum);
  } else {
    store_warp_rows<D>(p.out_w.head(b, h), p.out_w.sl, warp_q0, p.q_len, d, lane, o, inv_sum);
  }
}

// dK, dV of one 64-key block of one segment (16 keys per warp), streaming the queries in tiles of 32:
// S^T = K Q^T and dP^T = V dO^T on the tensor cores, then dV += P^T dO and dK += dS^T Q.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) attention_dkdv_mma_kernel(const Params<T> p) {
  constexpr int QT = kBackwardTile, LD = kMmaPitch<D>;
  T* smem = mma_shared_tiles<T>();
  T* k_tile = smem;                       // [64][LD]
  T* v_tile = k_tile + kBlockRows * LD;    // [64][LD]
  T* q_tile = v_tile + kBlockRows * LD;    // [QT][LD]
  T* do_tile = q_tile + QT * LD;           // [QT][LD]
  float* lse_tile = reinterpret_cast<float*>(do_tile + QT * LD);  // [QT]
  float* delta_tile = lse_tile + QT;                              // [QT]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int64_t blocks = p.key_blocks[0] + p.key_blocks[1];
  const int64_t bh = blockIdx.x / blocks, kb = blockIdx.x % blocks;
  const int seg = kb < p.key_blocks[0] ? 0 : 1;
  const int64_t k0 = (kb - (seg == 0 ? 0 : p.key_blocks[0])) * kBlockRows;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int d = static_cast<int>(p.head_dim);
  const int64_t kn = std::min<int64_t>(kBlockRows, p.key_len[seg] - k0);
  const int64_t warp_k0 = k0 + warp * kMmaWarpRows;
  const bool active = warp * kMmaWarpRows < kn;
  load_tile<kBlockRows, D, kMmaThreads>(k_tile, LD, p.k[seg].head(b, h), p.k[seg].sl, k0, kn, d);
  load_tile<kBlockRows, D, kMmaThreads>(v_tile, LD, p.v[seg].head(b, h), p.v[seg].sl, k0, kn, d);
  const T* k_warp = k_tile + warp * kMmaWarpRows * LD;
  const T* v_warp = v_tile + warp * kMmaWarpRows * LD;

  const T* q_head = p.q.head(b, h);
  const T* do_head = p.grad_out.head(b, h);
  const float* lse = p.lse + bh * p.q_len;
  const float* delta = p.delta + bh * p.q_len;
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  for (int64_t q0 = 0; q0 < p.q_len; q0 += QT) {
    const int64_t qn = std::min<int64_t>(QT, p.q_len - q0);
    __syncthreads();  // the previous tile's readers are done
    load_tile<QT, D, kMmaThreads>(q_tile, LD, q_head, p.q.sl, q0, qn, d);
    load_tile<QT, D, kMmaThreads>(do_tile, LD, do_head, p.grad_out.sl, q0, qn, d);
    for (int i = threadIdx.x; i < QT; i += kMmaThreads) {
      // A padded query gets lse = +inf: P = exp(-inf) = 0, so it adds nothing.
      lse_tile[i] = i < qn ? lse[q0 + i] : INFINITY;
      delta_tile[i] = i < qn ? delta[q0 + i] : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    float pt[QT / 8][4] = {}, dst[QT / 8][4] = {};
    warp_mma_abt<T, QT, D>(pt, k_warp, LD, q_tile, LD, lane);   // S^T = K Q^T
    warp_mma_abt<T, QT, D>(dst, v_warp, LD, do_tile, LD, lane);  // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < QT / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qi = 8 * j + 2 * t + i % 2;
        pt[j][i] = fast_exp(pt[j][i] * p.scale - lse_tile[qi]);  // a NaN lse keeps its column NaN
        dst[j][i] = pt[j][i] * (dst[j][i] - delta_tile[qi]);
      }
    warp_mma_cb<T, QT, D>(dv, pt, do_tile, LD, lane);  // dV += P^T dO
    warp_mma_cb<T, QT, D>(dk, dst, q_tile, LD, lane);  // dK += dS^T Q
  }
  if (!active) return;
  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  const int64_t len = p.key_len[seg];
  store_warp_rows<D>(p.grad_k[seg].head(b, h), p.grad_k[seg].sl, warp_k0, len, d, lane, dk, scale);
  store_warp_rows<D>(p.grad_v[seg].head(b, h), p.grad_v[seg].sl, warp_k0, len, d, lane, dv, one);
}

// dQ of one 64-query block (16 queries per warp), streaming the keys of both segments in tiles of 32.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) attention_dq_mma_kernel(const Params<T> p) {
  constexpr int KT = kBackwardTile, LD = kMmaPitch<D>;
  T* smem = mma_shared_tiles<T>();
  T* q_tile = smem;                       // [64][LD]
  T* do_tile = q_tile + kBlockRows * LD;   // [64][LD]
  T* k_tile = do_tile + kBlockRows * LD;   // [KT][LD]
  T* v_tile = k_tile + KT * LD;            // [KT][LD]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int64_t bh = blockIdx.x / p.row_blocks, q0 = blockIdx.x % p.row_blocks * kBlockRows;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int d = static_cast<int>(p.head_dim);
  const int64_t qn = p.q_len - q0, warp_q0 = q0 + warp * kMmaWarpRows;
  const bool active = warp_q0 < p.q_len;
  load_tile<kBlockRows, D, kMmaThreads>(q_tile, LD, p.q.head(b, h), p.q.sl, q0, qn, d);
  load_tile<kBlockRows, D, kMmaThreads>(do_tile, LD, p.grad_out.head(b, h), p.grad_out.sl, q0, qn, d);
  const T* q_warp = q_tile + warp * kMmaWarpRows * LD;
  const T* do_warp = do_tile + warp * kMmaWarpRows * LD;
  float lse[2], delta[2], dq[D / 8][4] = {};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = warp_q0 + lane / 4 + 8 * half;
    lse[half] = r < p.q_len ? p.lse[bh * p.q_len + r] : INFINITY;
    delta[half] = r < p.q_len ? p.delta[bh * p.q_len + r] : 0.f;
  }

  for_each_key_tile<KT, D, kMmaThreads>(p, b, h, 0, p.key_len[0] + p.key_len[1], k_tile, LD, v_tile, LD,
                                        [&](int kn) {
    if (!active) return;
    float s[KT / 8][4] = {}, ds[KT / 8][4] = {};
    warp_mma_abt<T, KT, D>(s, q_warp, LD, k_tile, LD, lane);    // S = Q K^T
    warp_mma_abt<T, KT, D>(ds, do_warp, LD, v_tile, LD, lane);  // dP = dO V^T
#pragma unroll
    for (int j = 0; j < KT / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int half = i / 2;
        const float pr = 8 * j + 2 * t + i % 2 < kn ? fast_exp(s[j][i] * p.scale - lse[half]) : 0.f;
        ds[j][i] = pr * (ds[j][i] - delta[half]);
      }
    warp_mma_cb<T, KT, D>(dq, ds, k_tile, LD, lane);  // dQ += dS K
  });
  if (!active) return;
  const float scale[2] = {p.scale, p.scale};
  store_warp_rows<D>(p.grad_q.head(b, h), p.grad_q.sl, warp_q0, p.q_len, d, lane, dq, scale);
}

// ---- launch helpers ----------------------------------------------------------------------------------
// f(std::integral_constant<int, D>) for the padded head dim D of d (16..128; d <= D, zero-padded).
template <typename F>
cudaError_t dispatch_head_dim(int64_t d, F&& f) {
  if (d <= 16) return f(std::integral_constant<int, 16>{});
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if (d <= 128) return f(std::integral_constant<int, 128>{});
  return cudaErrorInvalidValue;
}

template <typename Kernel, typename P>
cudaError_t launch(Kernel kernel, int64_t blocks, int threads, int64_t smem_bytes, const P& params,
                   cudaStream_t stream) {
  if (cudaError_t e = allow_smem(kernel, smem_bytes); e != cudaSuccess) return e;
  MMFAST_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, smem_bytes, stream, params);
  return cudaGetLastError();
}

constexpr int64_t float_bytes(int floats) {
  return static_cast<int64_t>(floats) * static_cast<int64_t>(sizeof(float));
}

template <typename T>
Params<T> make_params(const AttentionShape& s, HeadRows q, const HeadRows (&k)[2], const HeadRows (&v)[2],
                      float scale) {
  Params<T> p{};
  p.batch = s.batch;
  p.heads = s.heads;
  p.q_len = s.q_len;
  p.head_dim = s.head_dim;
  p.segments = s.segments;
  p.row_blocks = (s.q_len + kBlockRows - 1) / kBlockRows;
  p.splits = 1;
  p.scale = scale;
  p.q = typed<T>(q);
  for (int seg = 0; seg < 2; ++seg) {
    const bool used = seg < s.segments;
    p.key_len[seg] = used ? s.key_len[seg] : 0;
    p.key_blocks[seg] = used ? (s.key_len[seg] + kBlockRows - 1) / kBlockRows : 0;
    p.k[seg] = typed<T>(k[seg]);
    p.v[seg] = typed<T>(v[seg]);
  }
  return p;
}

}  // namespace

int64_t attention_smem_bytes(int64_t head_dim) {
  int floats = 0;
  const cudaError_t e = dispatch_head_dim(head_dim, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    // The tensor-core kernels' T tiles take less than the fp32 tiles of the CUDA-core ones.
    static_assert(forward_mma_smem_bytes<D>() <= 4 * forward_smem_floats<D>() &&
                  backward_mma_smem_bytes<D>() <= 4 * dq_smem_floats<D>());
    floats = std::max({forward_smem_floats<D>(), dkdv_smem_floats<D>(), dq_smem_floats<D>()});
    return cudaSuccess;
  });
  return e == cudaSuccess ? static_cast<int64_t>(floats) * static_cast<int64_t>(sizeof(float)) : int64_t{-1};
}

bool attention_tensor_cores(DType dtype) { return tensor_core_dtype(dtype); }

int64_t device_smem_limit() { return max_dynamic_smem(); }

int device_sm_count() { return cached_device_attribute<cudaDevAttrMultiProcessorCount>(1); }

int attention_forward_splits(const AttentionShape& shape, int sm_count) {
  // Split the keys when the (batch*head, query block) grid would leave SMs idle — SAM's token -> image
  // attention at one prompt is B*H = 8 blocks of 7 queries over 4096 keys on a 132-SM H100 — into at most
  // kMaxSplits ranges of >= 2 key tiles, for >= 2 blocks per SM (the Triton kernel's rule, 264 programs).
  constexpr int kMaxSplits = 32;
  const int64_t blocks = shape.batch * shape.heads * ((shape.q_len + kBlockRows - 1) / kBlockRows);
  const int64_t keys = shape.key_len[0] + (shape.segments > 1 ? shape.key_len[1] : 0);
  const int64_t tiles = (keys + kForwardKeyTile - 1) / kForwardKeyTile;
  const int64_t want = 2 * static_cast<int64_t>(sm_count);
  if (blocks >= want || tiles < 4) return 1;
  const int64_t splits = std::min<int64_t>({(want + blocks - 1) / blocks, tiles / 2, kMaxSplits});
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  return static_cast<int>((tiles + tiles_per_split - 1) / tiles_per_split);  // no empty split
}

cudaError_t cross_attention_forward(DType dtype, const AttentionShape& shape, HeadRows q, const HeadRows (&k)[2],
                                    const HeadRows (&v)[2], float scale, MutableHeadRows out, float* lse,
                                    int splits, float* split_scratch, bool tensor_cores, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(shape, q, k, v, scale);
    p.out_w = typed<T>(out);
    p.lse_w = lse;
    const int64_t rows = shape.batch * shape.heads * shape.q_len;
    if (splits > 1) {
      const int64_t keys = p.key_len[0] + p.key_len[1];
      const int64_t tiles = (keys + kForwardKeyTile - 1) / kForwardKeyTile;
      p.splits = splits;
      p.split_keys = (tiles + splits - 1) / splits * kForwardKeyTile;
      p.split_out = split_scratch;
      p.split_lse = split_scratch + splits * rows * shape.head_dim;
    }
    return dispatch_head_dim(shape.head_dim, [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      const int64_t blocks = p.splits * shape.batch * shape.heads * p.row_blocks;
      cudaError_t e;
      if constexpr (std::is_same_v<T, float>) {
        e = launch(attention_forward_kernel<T, D>, blocks, kThreads, float_bytes(forward_smem_floats<D>()), p,
                   stream);
      } else {
        e = tensor_cores ? launch(attention_forward_mma_kernel<T, D>, blocks, kMmaThreads,
                                  forward_mma_smem_bytes<D>(), p, stream)
                         : launch(attention_forward_kernel<T, D>, blocks, kThreads,
                                  float_bytes(forward_smem_floats<D>()), p, stream);
      }
      if (e != cudaSuccess || p.splits == 1) return e;
      constexpr int kWarps = kThreads / 32;
      MMFAST_LAUNCH(attention_split_merge_kernel<T>, static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0,
                    stream, p, rows);
      return cudaGetLastError();
    });
  });
}

cudaError_t cross_attention_backward(DType dtype, const AttentionShape& shape, HeadRows q, const HeadRows (&k)[2],
                                     const HeadRows (&v)[2], HeadRows out, HeadRows grad_out, const float* lse,
                                     float scale, float* delta, MutableHeadRows grad_q,
                                     const MutableHeadRows (&grad_k)[2], const MutableHeadRows (&grad_v)[2],
                                     bool tensor_cores, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    Params<T> p = make_params<T>(shape, q, k, v, scale);
    p.out = typed<T>(out);
    p.grad_out = typed<T>(grad_out);
    p.lse = lse;
    p.delta_w = delta;
    p.delta = delta;
    p.grad_q = typed<T>(grad_q);
    for (int seg = 0; seg < 2; ++seg) {
      p.grad_k[seg] = typed<T>(grad_k[seg]);
      p.grad_v[seg] = typed<T>(grad_v[seg]);
    }
    const int64_t bh = shape.batch * shape.heads, rows = bh * shape.q_len;
    constexpr int kWarps = kThreads / 32;
    MMFAST_LAUNCH(attention_delta_kernel<T>, static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream,
                  p, rows);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    return dispatch_head_dim(shape.head_dim, [&](auto dc) {
      constexpr int D = decltype(dc)::value;
      const int64_t key_blocks = bh * (p.key_blocks[0] + p.key_blocks[1]), query_blocks = bh * p.row_blocks;
      if constexpr (!std::is_same_v<T, float>) {
        if (tensor_cores) {
          constexpr int64_t bytes = backward_mma_smem_bytes<D>();
          if (cudaError_t e = launch(attention_dkdv_mma_kernel<T, D>, key_blocks, kMmaThreads, bytes, p, stream);
              e != cudaSuccess)
            return e;
          return launch(attention_dq_mma_kernel<T, D>, query_blocks, kMmaThreads, bytes, p, stream);
        }
      }
      if (cudaError_t e = launch(attention_dkdv_kernel<T, D>, key_blocks, kThreads,
                                 float_bytes(dkdv_smem_floats<D>()), p, stream);
          e != cudaSuccess)
        return e;
      return launch(attention_dq_kernel<T, D>, query_blocks, kThreads, float_bytes(dq_smem_floats<D>()), p,
                    stream);
    });
  });
}

}  // namespace mmfast::cuda
