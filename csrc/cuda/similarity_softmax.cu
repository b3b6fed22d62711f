// CUDA kernels of mmfast::similarity_softmax / similarity_topk (+ backward) and their launchers.
// The GEMMs run in cuBLAS (at::mm in similarity_softmax_api.cpp); these kernels do everything
// around them in as few passes over the N x C matrix as the math allows:
//
//   forward   normalize_rows (x = image / ||image||, y likewise, inverse norms)  -> cuBLAS x @ y^T
//             into the output (fp16/bf16 with MMFAST_CUDA_TENSOR_CORES=1: similarity_dots_kernel on the
//             tensor cores) -> similarity_epilogue: ONE read + ONE write of the output
//             (eager reads/writes it again for `* scale`, `+ bias` and the softmax).
//   backward  activation_backward (ds, one pass; the row's g and p cached in shared memory for the
//             softmax's second sweep; ds rows padded to 16 bytes, so cuBLAS takes its aligned tensor-core
//             kernels at an odd class count) -> cuBLAS ds @ y, ds^T @ x (fp32 out) -> normalize_backward
//             (grad through the normalization + per-row grad_scale partials) -> sum_pair.
//   top-k     per class chunk: cuBLAS x @ y_chunk^T (fp32 scratch [N, chunk]) -> topk_merge_chunk
//             (online log-sum-exp + running sorted top-k per row) ... -> topk_finalize.
//             fp16/bf16, k <= 32 with MMFAST_CUDA_TENSOR_CORES=1: topk_tiles_kernel takes the logits from
//             tensor-core tiles and keeps each row's top-k and (max, sum-exp) on chip, per group of
//             column tiles -> topk_merge_groups -> the same topk_finalize; no [N, chunk] scratch.
//             Backward recomputes the chunk's logits the same way -> topk_backward_tile -> the
//             two GEMMs per chunk -> the same normalize_backward / sum_pair. Opted in (fp16/bf16),
//             topk_backward_fused_kernel makes the chunk's ds from tensor-core tiles (no fp32 dots).
//
// Why the GEMM multiplies normalized copies, not raw features: raw fp16 dot products overflow
// (|a| |b| > 65504, e.g. two rows of norm 256) or lose precision in fp16 subnormals (norms ~1e-3),
// where cos in [-1, 1] cannot. Writing the copies costs one pass over the (N + C) x D inputs
// (estimated from the bytes moved: ~80 MB, ~25 us at N=4096, C=21843, D=768 fp16, under 10% of
// the op), and the same copies are the operands the backward GEMMs need anyway. The epilogue then
// only applies scale and bias.
//
// Determinism: no floating-point atomics anywhere; every reduction is a fixed tree per block, and
// cross-block sums go through per-row partials and one fixed-order sum_pair block.
#include "mmfast/cuda_launch.cuh"
#include "mmfast/cuda_utils.cuh"
#include "mmfast/mma.cuh"
#include "mmfast/similarity_softmax_cuda.h"

#include <algorithm>

namespace mmfast::cuda {
namespace {

// Grid size from a count the glue has bounded (rows < 2^31, see similarity_softmax_api.cpp).
inline unsigned grid(int64_t n) { return static_cast<unsigned>(n); }

// Bytes that cache `cols` elements of T with the pad that aligns the body (see cached_row).
template <typename T>
__host__ __device__ int64_t row_cache_bytes(int64_t cols) {
  return ((cols + kVec<T>) * static_cast<int64_t>(sizeof(T)) + 15) / 16 * 16;
}

// The shared-memory copy of a row: element j at cached + j, where the pad puts the row's 16-byte
// aligned body vectors on 16-byte boundaries of shared memory (the row itself starts anywhere).
template <typename T>
__device__ __forceinline__ T* cached_row(unsigned char* base, RowSplit sp) {
  constexpr int V = kVec<T>;
  return reinterpret_cast<T*>(base) + (V - sp.head % V) % V;
}

// ================================ forward ======================================================

// ---- the dot products on the tensor cores (fp16/bf16, sm_80+; opt-in, see similarity_dots_fused) ----------
// out [n, c] (T) = x [n, d] . y [c, d]^T, fp32 accumulation, one 128 x 128 tile per block (8 warps x 16 rows,
// mma.cuh's block_tile_dots over 64-wide feature slices), written as T pairs. In place of cuBLAS's GEMM into the
// output, which the H200 run measured at 94 TFLOP/s for fp16 N=4096, C=21843, D=768 (1.46 ms): an odd C leaves
// the output rows unaligned for cuBLAS; here an odd row only costs element stores at its unaligned pairs.
// L2 traffic at that shape: each block reads 2 x 128 x D features, 2.1 GB in all (NOT measured on a GPU).
constexpr int kDotTile = 128, kDotK = 64, kDotThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDotThreads)
    similarity_dots_kernel(const T* __restrict__ x, const T* __restrict__ y, int64_t n, int64_t c, int64_t d,
                           T* __restrict__ out) {
  __shared__ __align__(16) T row_tile[kDotTile * (kDotK + 8)];
  __shared__ __align__(16) T col_tile[kDotTile * (kDotK + 8)];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kDotTile, j0 = static_cast<int64_t>(blockIdx.y) * kDotTile;
  float acc[kDotTile / 8][4];
  block_tile_dots<T, kDotTile, kDotTile, kDotK, kDotThreads>(acc, row_tile, col_tile, x, y, d, r0, n, j0, c);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t r = r0 + warp * 16 + g + 8 * half;
    if (r >= n) continue;
#pragma unroll
    for (int j = 0; j < kDotTile / 8; ++j) {
      const int64_t col = j0 + 8 * j + 2 * t;
      if (col < c) store_pair(out + r * c, c, col, acc[j][2 * half], acc[j][2 * half + 1]);
    }
  }
}

// One warp per row: two sweeps over a D-long row (sum of squares, then the scaled copy); the
// second re-reads from L1/L2 (rows are a few KB). __fsqrt_rn/__frcp_rn keep the norm IEEE-exact
// under --use_fast_math, so inv matches F.normalize's 1 / max(||row||, eps) to rounding.
template <typename T>
__global__ void __launch_bounds__(256)
    normalize_rows_kernel(const T* __restrict__ src, int64_t rows, int64_t dim, float* __restrict__ inv,
                          bool compute_inv, float eps, T* __restrict__ dst) {
  constexpr int V = kVec<T>;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;  // a whole warp leaves together; no block-wide barrier follows
  const T* a = src + r * dim;
  const RowSplit sp = split_row(a, dim);
  auto load = [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(a + j); };

  float s;
  if (compute_inv) {
    float ss = 0.f;
    for_each_chunk<V>(sp, dim, lane, 32, load, [&](int64_t, const auto& f, auto w) {
#pragma unroll
      for (int i = 0; i < decltype(w)::value; ++i) ss = fmaf(f.f(i), f.f(i), ss);
    });
    ss = warp_sum(ss);
    s = __frcp_rn(fmaxf(__fsqrt_rn(ss), eps));
    if (lane == 0) inv[r] = s;
  } else {
    s = inv[r];
  }
  if (dst == nullptr) return;
  T* x = dst + r * dim;
  for_each_chunk<V>(sp, dim, lane, 32, load, [&](int64_t j, const auto& f, auto w) {
    constexpr int W = decltype(w)::value;
    float o[W];
#pragma unroll
    for (int i = 0; i < W; ++i) o[i] = f.f(i) * s;
    store_f32<W>(x + j, o);
  });
}

// Softmax epilogue, one block per row, in place. Sweep 1 reads the dot products d (16-byte loads,
// 4 in flight per thread), forms l = scale * d + bias, keeps a per-thread online (max, sum-exp) and,
// when the row fits (use_cache), copies the raw row into shared memory; one block merge gives the
// row's (max, sum). Sweep 2 re-reads the row from shared memory (or from L2 when it did not fit)
// and writes exp(l - max) / sum over it. HBM traffic: one read + one write of the row, the floor.
template <typename T>
__global__ void __launch_bounds__(512)
    softmax_rows_kernel(T* __restrict__ out, int64_t cols, const float* __restrict__ scale_p,
                        const float* __restrict__ bias_p, bool use_cache) {
  MMFAST_DYNAMIC_SMEM(unsigned char, smem);
  __shared__ float red[66];
  constexpr int V = kVec<T>;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  T* row = out + static_cast<int64_t>(blockIdx.x) * cols;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  const RowSplit sp = split_row(row, cols);
  T* cache = cached_row<T>(smem, sp);

  SoftmaxState st = empty_softmax_state();
  for_each_chunk<V>(
      sp, cols, tid, nthreads, [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(row + j); },
      [&](int64_t j, const auto& f, auto w) {
        constexpr int W = decltype(w)::value;
        if (use_cache) store_raw<W>(cache + j, f);
        float l[W];
#pragma unroll
        for (int i = 0; i < W; ++i) l[i] = fmaf(scale, f.f(i), bias);
        softmax_add(st, l);
      });
  st = block_reduce(st, red);
  const float m = st.max;
  const float inv_s = __frcp_rn(st.sum);  // sum >= 1 when the row has a finite logit

  // Each thread re-reads only the chunks it cached itself, so no barrier is needed in between
  // (block_reduce has them anyway).
  auto sweep2 = [&](const T* src) {
    for_each_chunk<V>(
        sp, cols, tid, nthreads, [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(src + j); },
        [&](int64_t j, const auto& f, auto w) {
          constexpr int W = decltype(w)::value;
          float o[W];
#pragma unroll
          for (int i = 0; i < W; ++i) o[i] = fast_exp(fmaf(scale, f.f(i), bias) - m) * inv_s;
          store_f32<W>(row + j, o);
        });
  };
  if (use_cache) {
    sweep2(cache);
  } else {
    sweep2(row);
  }
}

// sigmoid / identity epilogue: elementwise over the whole [rows, cols] buffer (no row structure
// needed), grid-stride with 16-byte accesses.
template <typename T, Act A>
__global__ void __launch_bounds__(256)
    pointwise_epilogue_kernel(T* __restrict__ out, int64_t n, const float* __restrict__ scale_p,
                              const float* __restrict__ bias_p) {
  constexpr int V = kVec<T>;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  const int tid = blockIdx.x * blockDim.x + threadIdx.x, nthreads = gridDim.x * blockDim.x;
  const RowSplit sp = split_row(out, n);
  for_each_chunk<V, 2>(
      sp, n, tid, nthreads, [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(out + j); },
      [&](int64_t j, const auto& f, auto w) {
        constexpr int W = decltype(w)::value;
        float o[W];
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const float l = fmaf(scale, f.f(i), bias);
          // __frcp_rn(inf) = 0: very negative logits give 0, not NaN.
          o[i] = A == Act::kSigmoid ? __frcp_rn(1.f + fast_exp(-l)) : l;
        }
        store_f32<W>(out + j, o);
      });
}

// ================================ backward =====================================================

// W values stored as T at p: one 16-byte store where p's row has the alignment of the rows the chunk was loaded
// from (aligned), else element by element (a padded ds row: its 16-byte boundaries fall elsewhere).
template <int W, typename T>
__device__ __forceinline__ void store_f32_or_elements(T* p, const float (&x)[W], bool aligned) {
  if (W == 1 || aligned) {
    store_f32<W>(p, x);
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) p[i] = from_float<T>(x[i]);
  }
}

// ds = dL/dlogits for one row per block, plus the row's sum of ds (grad_logit_bias partial).
// softmax: sweep 1 r = sum g * p (caching g and p in shared memory when they fit), sweep 2
// ds = p * (g - r). sigmoid: one sweep, ds = g * p * (1 - p). none: ds is g itself; only the sum.
template <typename T, Act A>
__global__ void __launch_bounds__(512)
    activation_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, T* __restrict__ ds,
                               int64_t ds_stride, int64_t cols, float* __restrict__ row_sum_ds, bool use_cache) {
  MMFAST_DYNAMIC_SMEM(unsigned char, smem);
  __shared__ float red[33];
  constexpr int V = kVec<T>;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * cols;
  const T* g = grad_out + offset;
  const T* p = A == Act::kNone ? nullptr : out + offset;  // kNone: out and ds are null
  T* d = A == Act::kNone ? nullptr : ds + static_cast<int64_t>(blockIdx.x) * ds_stride;
  const RowSplit sp = split_row(g, cols);  // g and p share it: same dtype, cols, aligned bases
  const bool ds_like_g = A == Act::kNone || split_row(d, cols).head == sp.head;  // else a padded ds row

  float sum_ds = 0.f;
  if constexpr (A == Act::kSoftmax) {
    T* cache_g = cached_row<T>(smem, sp);
    T* cache_p = cached_row<T>(smem + row_cache_bytes<T>(cols), sp);
    float r = 0.f;
    for_each_chunk<V>(
        sp, cols, tid, nthreads,
        [&](int64_t j, auto w) {
          constexpr int W = decltype(w)::value;
          return Two<Raw<T, W>, Raw<T, W>>{load_raw<W>(g + j), load_raw<W>(p + j)};
        },
        [&](int64_t j, const auto& f, auto w) {
          constexpr int W = decltype(w)::value;
          if (use_cache) {
            store_raw<W>(cache_g + j, f.a);
            store_raw<W>(cache_p + j, f.b);
          }
#pragma unroll
          for (int i = 0; i < W; ++i) r = fmaf(f.a.f(i), f.b.f(i), r);
        });
    r = block_sum(r, red);
    auto sweep2 = [&](const T* gs, const T* ps) {
      for_each_chunk<V>(
          sp, cols, tid, nthreads,
          [&](int64_t j, auto w) {
            constexpr int W = decltype(w)::value;
            return Two<Raw<T, W>, Raw<T, W>>{load_raw<W>(gs + j), load_raw<W>(ps + j)};
          },
          [&](int64_t j, const auto& f, auto w) {
            constexpr int W = decltype(w)::value;
            float o[W];
#pragma unroll
            for (int i = 0; i < W; ++i) {
              o[i] = f.b.f(i) * (f.a.f(i) - r);
              sum_ds += o[i];
            }
            store_f32_or_elements<W>(d + j, o, ds_like_g);
          });
    };
    if (use_cache) {
      sweep2(cache_g, cache_p);
    } else {
      sweep2(g, p);
    }
  } else if constexpr (A == Act::kSigmoid) {
    // U = 2: two arrays, so still four 16-byte loads in flight; U = 4 made ptxas spill 8 bytes
    // (fp16, sm_90a) for no gain.
    for_each_chunk<V, 2>(
        sp, cols, tid, nthreads,
        [&](int64_t j, auto w) {
          constexpr int W = decltype(w)::value;
          return Two<Raw<T, W>, Raw<T, W>>{load_raw<W>(g + j), load_raw<W>(p + j)};
        },
        [&](int64_t j, const auto& f, auto w) {
          constexpr int W = decltype(w)::value;
          float o[W];
#pragma unroll
          for (int i = 0; i < W; ++i) {
            const float pv = f.b.f(i);
            o[i] = f.a.f(i) * pv * (1.f - pv);
            sum_ds += o[i];
          }
          store_f32_or_elements<W>(d + j, o, ds_like_g);
        });
  } else {
    for_each_chunk<V>(
        sp, cols, tid, nthreads, [&](int64_t j, auto w) { return load_raw<decltype(w)::value>(g + j); },
        [&](int64_t, const auto& f, auto w) {
#pragma unroll
          for (int i = 0; i < decltype(w)::value; ++i) sum_ds += f.f(i);
        });
  }
  sum_ds = block_sum(sum_ds, red);
  if (tid == 0) row_sum_ds[blockIdx.x] = sum_ds;
}

// Gradient through s = scale * normalize(a) . (other side), one warp per D-long row:
// grad_a = scale * inv * (g - [||a|| >= eps] * x * (x . g)) with x = a * inv recomputed in fp32
// from the raw row (more precise than the rounded copy the GEMM used). Scalar coalesced accesses:
// g is fp32 and a is T, so their 16-byte vectors differ in length; this pass moves (N + C) x D
// elements, small next to the N x C passes.
template <typename T>
__global__ void __launch_bounds__(256)
    normalize_backward_kernel(const float* __restrict__ grad_unit, const T* __restrict__ src,
                              const float* __restrict__ inv, int64_t rows, int64_t dim,
                              const float* __restrict__ scale_p, bool normalize, float eps,
                              T* __restrict__ grad_src, float* __restrict__ row_dot) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const float* g = grad_unit + r * dim;
  const T* a = src + r * dim;
  T* o = grad_src + r * dim;
  const float iv = normalize ? inv[r] : 1.f;
  float dot = 0.f, ss = 0.f;
#pragma unroll 4
  for (int64_t k = lane; k < dim; k += 32) {
    const float av = to_float(a[k]);
    dot = fmaf(av * iv, g[k], dot);
    ss = fmaf(av, av, ss);
  }
  dot = warp_sum(dot);
  ss = warp_sum(ss);
  if (row_dot != nullptr && lane == 0) row_dot[r] = dot;
  // F.normalize divides by clamp_min(norm, eps): the norm's gradient flows only where norm >= eps.
  const float proj = (normalize && __fsqrt_rn(ss) >= eps) ? dot : 0.f;
  const float c = *scale_p * iv;
#pragma unroll 4
  for (int64_t k = lane; k < dim; k += 32) {
    const float x = to_float(a[k]) * iv;
    o[k] = from_float<T>(c * (g[k] - x * proj));
  }
}

__global__ void __launch_bounds__(1024)
    sum_pair_kernel(const float* __restrict__ a, int64_t na, const float* __restrict__ b, int64_t nb,
                    float* __restrict__ out_a, float* __restrict__ out_b) {
  __shared__ float red[33];
  float sa = 0.f, sb = 0.f;
  for (int64_t i = threadIdx.x; i < na; i += blockDim.x) sa += a[i];
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) sb += b[i];
  sa = block_sum(sa, red);
  sb = block_sum(sb, red);
  if (threadIdx.x == 0) {
    *out_a = sa;
    *out_b = sb;
  }
}

// ================================ top-k ========================================================

// A (logit, class) pair as one uint64 whose unsigned order is the top-k order: higher logit first,
// then lower class index (ties resolve deterministically), NaN above everything (as torch.topk
// ranks it). High word: the float's bits made monotone (negative: flip all; positive: set the
// sign bit), NaN -> all ones, -0 -> +0. Low word: ~class. Every real key is > 0, so 0 pads.
__device__ __forceinline__ uint64_t topk_key(float l, uint32_t cls) {
  uint32_t ord;
  if (l != l) {
    ord = 0xffffffffu;
  } else {
    const uint32_t u = l == 0.f ? 0u : __float_as_uint(l);
    ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint64_t>(0xffffffffu - cls);
}

__device__ __forceinline__ float key_logit(uint64_t key) {
  const uint32_t ord = static_cast<uint32_t>(key >> 32);
  if (ord == 0xffffffffu) return __uint_as_float(0x7fc00000u);  // NaN
  return __uint_as_float((ord & 0x80000000u) ? (ord & 0x7fffffffu) : ~ord);
}

__device__ __forceinline__ int64_t key_class(uint64_t key) {
  return static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key));
}

// Sort buf[0, p) descending, p a power of two <= kSortCap; ends with a barrier.
__device__ void bitonic_sort_desc(uint64_t* buf, int p, int tid, int nthreads) {
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < (p >> 1); i += nthreads) {
        const int lo = ((i & ~(stride - 1)) << 1) | (i & (stride - 1));  // i with a 0 inserted at bit `stride`
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;  // the last stage (size == p) sorts all of it descending
        const uint64_t x = buf[lo], y = buf[hi];
        if ((x < y) == desc) {
          buf[lo] = y;
          buf[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

constexpr int kSortCap = 2048;     // candidates sorted at once: 16 KB of shared memory
constexpr int kTopkThreads = 256;

// One block per row merges a chunk of dot products into the row's running top-k and online
// softmax state. The sorted list of the best min(k, c0) keys so far sits in shared memory; the
// chunk is scanned in sub-tiles of (kSortCap - k) classes: every logit feeds the online
// (max, sum-exp), and only keys above the current k-th best (tau) join a candidate buffer behind the
// list, which is then bitonic-sorted with it (size: the next power of two of list + candidates).
// After the first sub-tile tau is high and few candidates appear (about k * width / classes seen
// for random order), so most sub-tiles are a plain scan. A class enters only with a strictly
// greater key, and new classes have higher indices: ties keep the lower index, as the key says.
__global__ void __launch_bounds__(kTopkThreads)
    topk_merge_chunk_kernel(const float* __restrict__ dots, int64_t width, int64_t c0,
                            const float* __restrict__ scale_p, const float* __restrict__ bias_p, int k,
                            uint64_t* __restrict__ keys, float* __restrict__ row_max, float* __restrict__ row_sum) {
  __shared__ uint64_t buf[kSortCap];
  __shared__ float red[66];
  __shared__ int n_new;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t row = blockIdx.x;
  const float* d = dots + row * width;
  uint64_t* list = keys + row * k;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;

  int listed = static_cast<int>(c0 < k ? c0 : k);  // the list holds the best min(k, c0) of [0, c0)
  for (int i = tid; i < listed; i += nthreads) buf[i] = list[i];
  const int64_t sub_width = kSortCap - k;  // listed + candidates <= kSortCap

  SoftmaxState st = empty_softmax_state();
  for (int64_t s0 = 0; s0 < width; s0 += sub_width) {
    const int64_t s1 = s0 + sub_width < width ? s0 + sub_width : width;
    __syncthreads();  // the list in buf is complete; last sub-tile's readers of n_new are done
    const uint64_t tau = listed == k ? buf[k - 1] : 0ull;
    if (tid == 0) n_new = 0;
    __syncthreads();
    for (int64_t j = s0 + tid; j < s1; j += nthreads) {
      const float l[1] = {fmaf(scale, d[j], bias)};
      softmax_add(st, l);
      const uint64_t key = topk_key(l[0], static_cast<uint32_t>(c0 + j));
      if (key > tau) buf[listed + atomicAdd(&n_new, 1)] = key;  // integer atomic: a slot, not a sum
    }
    __syncthreads();
    const int total = listed + n_new;
    if (total > listed) {  // block-uniform: every thread read the same n_new after the barrier
      int p = 1;
      while (p < total) p <<= 1;
      for (int i = total + tid; i < p; i += nthreads) buf[i] = 0ull;
      __syncthreads();
      bitonic_sort_desc(buf, p, tid, nthreads);
      listed = total < k ? total : k;
    }
  }

  st = block_reduce(st, red);
  if (tid == 0) {
    if (c0 > 0) st = softmax_merge(SoftmaxState{row_max[row], row_sum[row]}, st);
    row_max[row] = st.max;
    row_sum[row] = st.sum;
  }
  for (int i = tid; i < listed; i += nthreads) list[i] = buf[i];
}

// One thread per (row, rank): decode the sorted keys and apply the activation.
template <typename T>
__global__ void __launch_bounds__(256)
    topk_finalize_kernel(const uint64_t* __restrict__ keys, const float* __restrict__ row_max,
                         const float* __restrict__ row_sum, int64_t rows, int k, Act act, T* __restrict__ values,
                         int64_t* __restrict__ indices, float* __restrict__ row_lse) {
  const int64_t total = rows * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const uint64_t key = keys[i];
    const float l = key_logit(key);
    const float m = row_max[r], s = row_sum[r];
    float v;
    if (act == Act::kSoftmax) {
      v = fast_exp(l - m) * __frcp_rn(s);
    } else if (act == Act::kSigmoid) {
      v = __frcp_rn(1.f + fast_exp(-l));
    } else {
      v = l;
    }
    values[i] = from_float<T>(v);
    indices[i] = key_class(key);
    // As the CPU kernel: row_lse is the softmax's log-sum-exp, 0 for sigmoid / none (unused there).
    if (i - r * k == 0) row_lse[r] = act == Act::kSoftmax ? online_softmax::log_sum_exp(SoftmaxState{m, s}) : 0.f;
  }
}

// ---- top-k on the tensor cores (fp16/bf16, k <= kFusedTopK; opt-in, see similarity_topk_fused) -----------
// A block takes 128 rows against one group of consecutive 128-column tiles. Per tile: block_tile_dots (as
// similarity_dots_kernel), the logits l = scale * dot + bias in the accumulators, each lane's online
// (max, sum-exp) of its rows g and g + 8, and then the top-k: lists[row][0, k) in shared memory, the row's best
// keys so far in descending order. Only a logit that is not below the logit of the row's k-th key (tau) can
// enter, so a warp ballots that first and skips the rest of the tile's top-k work when no lane has one (after
// the first tiles the common case: about k * 128 / (columns seen) candidates per row and tile for random
// order). Otherwise the warp stages its 16 x 64 logits per column half in shared memory (the operand tiles,
// free until the next block_tile_dots) and merges, row by row, each lane's keys above tau into the list with a
// warp-wide bitonic merge. Outputs per (group, row): the list and the state, merged by topk_merge_groups.
constexpr int kFusedTopK = 32;      // one list entry per lane in the warp merge
constexpr int kStagePitch = 72;     // floats per staged row of 64 logits
// Blocks per SM: ptxas gives topk_tiles_kernel 128 registers (sm_90a), so 2 blocks of 256 threads fill the 64K
// registers (shared memory would allow 3 of 69.6 KB).
constexpr int kFusedTopkTargetBlocks = 2;

// The 32 keys held one per lane, sorted ascending across the lanes (a bitonic network on shuffles).
__device__ __forceinline__ uint64_t warp_sort_ascending(uint64_t v, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const uint64_t other = __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(v), stride);
      // Runs of `size` lanes alternate ascending / descending, so each pair of runs is bitonic for the next size.
      const bool keep_min = ((lane & stride) == 0) == ((lane & size) == 0);
      if (keep_min ? other < v : other > v) v = other;
    }
  }
  return v;
}

// list: a descending list, one key per lane (0 past its end); cand: up to 32 keys, one per lane, 0 for none.
// Returns the 32 largest keys of both, descending: max(list[i], sorted cand[i]) pairs a descending with an
// ascending sequence, which leaves the 32 largest as one bitonic sequence; a bitonic merge sorts it.
__device__ __forceinline__ uint64_t warp_merge_top(uint64_t list, uint64_t cand, int lane) {
  cand = warp_sort_ascending(cand, lane);
  uint64_t m = list > cand ? list : cand;
#pragma unroll
  for (int stride = 16; stride > 0; stride >>= 1) {
    const uint64_t other = __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(m), stride);
    if ((lane & stride) == 0 ? other > m : other < m) m = other;
  }
  return m;
}

template <typename T>
__global__ void __launch_bounds__(kDotThreads)
    topk_tiles_kernel(const T* __restrict__ x, const T* __restrict__ y, int64_t n, int64_t c, int64_t d,
                      const float* __restrict__ scale_p, const float* __restrict__ bias_p, int k,
                      int64_t tiles_per_group, uint64_t* __restrict__ part_keys, float* __restrict__ part_max,
                      float* __restrict__ part_sum) {
  constexpr int kTileElems = kDotTile * (kDotK + 8);
  // The operand tiles during the products, then each warp's staged logits (16 rows x kStagePitch floats).
  __shared__ __align__(16) unsigned char tiles[2 * kTileElems * sizeof(T)];
  static_assert(kDotThreads / 32 * 16 * kStagePitch * sizeof(float) <= sizeof(tiles), "staging fits the tiles");
  MMFAST_DYNAMIC_SMEM(uint64_t, lists);  // [kDotTile][k]
  T* row_tile = reinterpret_cast<T*>(tiles);
  T* col_tile = row_tile + kTileElems;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float* stage = reinterpret_cast<float*>(tiles) + warp * 16 * kStagePitch;
  uint64_t* warp_lists = lists + warp * 16 * k;  // a warp reads and writes only its own 16 rows' lists
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kDotTile, row_g = r0 + warp * 16 + g;
  const bool row_valid[2] = {row_g < n, row_g + 8 < n};
  const int64_t col_tiles = (c + kDotTile - 1) / kDotTile;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_group;
  const int64_t tile_end = tile_begin + tiles_per_group < col_tiles ? tile_begin + tiles_per_group : col_tiles;
  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;

  for (int i = lane; i < 16 * k; i += 32) warp_lists[i] = 0ull;
  __syncwarp();
  SoftmaxState st[2] = {empty_softmax_state(), empty_softmax_state()};
  float acc[kDotTile / 8][4];
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t j0 = tile * kDotTile;
    block_tile_dots<T, kDotTile, kDotTile, kDotK, kDotThreads>(acc, row_tile, col_tile, x, y, d, r0, n, j0, c);
    bool candidate[2][2] = {{false, false}, {false, false}};  // [row g / g + 8][column half]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint64_t tau = warp_lists[(g + 8 * h) * k + k - 1];
      const float lowest = tau == 0ull ? -INFINITY : key_logit(tau);  // a list not yet full takes anything
      float l[kDotTile / 4];
#pragma unroll
      for (int j = 0; j < kDotTile / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = j0 + 8 * j + 2 * t + e;
          float& v = acc[j][2 * h + e];
          v = col < c ? fmaf(scale, v, bias) : -INFINITY;
          l[2 * j + e] = v;
          candidate[h][j / 8] |= row_valid[h] && !(v < lowest);  // NaN ranks first: a candidate too
        }
      }
      softmax_add(st[h], l);
    }
    __syncthreads();  // every warp is done with the operand tiles: they become the staging area
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const unsigned need[2] = {__ballot_sync(0xffffffffu, candidate[0][half]),
                                __ballot_sync(0xffffffffu, candidate[1][half])};
      if ((need[0] | need[1]) == 0u) continue;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int j = 8 * half + jj;
        stage[g * kStagePitch + 8 * jj + 2 * t] = acc[j][0];
        stage[g * kStagePitch + 8 * jj + 2 * t + 1] = acc[j][1];
        stage[(g + 8) * kStagePitch + 8 * jj + 2 * t] = acc[j][2];
        stage[(g + 8) * kStagePitch + 8 * jj + 2 * t + 1] = acc[j][3];
      }
      __syncwarp();
      for (int ri = 0; ri < 16; ++ri) {
        if (((need[ri / 8] >> (4 * (ri % 8))) & 0xfu) == 0u) continue;  // warp-uniform: a ballot
        uint64_t* list = warp_lists + ri * k;
        const uint64_t tau = list[k - 1];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = j0 + 64 * half + 2 * lane + e;
          uint64_t key = col < c ? topk_key(stage[ri * kStagePitch + 2 * lane + e], static_cast<uint32_t>(col)) : 0ull;
          if (key <= tau) key = 0ull;
          if (__ballot_sync(0xffffffffu, key != 0ull) == 0u) continue;
          const uint64_t top = warp_merge_top(lane < k ? list[lane] : 0ull, key, lane);
          __syncwarp();  // every lane has read the list before it changes
          if (lane < k) list[lane] = top;
          __syncwarp();
        }
      }
      __syncwarp();  // the staged half is read before the next one overwrites it
    }
  }

  // Each row's state is spread over the 4 lanes t of its group: merge them in a fixed tree.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      const SoftmaxState other{__shfl_xor_sync(0xffffffffu, st[h].max, o), __shfl_xor_sync(0xffffffffu, st[h].sum, o)};
      st[h] = softmax_merge(st[h], other);
    }
    if (t == 0 && row_valid[h]) {
      part_max[blockIdx.y * n + row_g + 8 * h] = st[h].max;
      part_sum[blockIdx.y * n + row_g + 8 * h] = st[h].sum;
    }
  }
  for (int i = lane; i < 16 * k; i += 32) {
    const int64_t row = r0 + warp * 16 + i / k;
    if (row < n) part_keys[(blockIdx.y * n + row) * k + i % k] = warp_lists[i];
  }
}

// One block per row: the groups' lists (groups * k <= kSortCap keys, 0 pads) sorted together, the best k kept,
// and the groups' states merged in group order (deterministic).
__global__ void __launch_bounds__(kTopkThreads)
    topk_merge_groups_kernel(const uint64_t* __restrict__ part_keys, const float* __restrict__ part_max,
                             const float* __restrict__ part_sum, int64_t n, int k, int groups,
                             uint64_t* __restrict__ keys, float* __restrict__ row_max, float* __restrict__ row_sum) {
  __shared__ uint64_t buf[kSortCap];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t row = blockIdx.x;
  const int total = groups * k;
  int p = 1;
  while (p < total) p <<= 1;
  for (int i = tid; i < p; i += nthreads) buf[i] = i < total ? part_keys[((i / k) * n + row) * k + i % k] : 0ull;
  __syncthreads();
  bitonic_sort_desc(buf, p, tid, nthreads);
  for (int i = tid; i < k; i += nthreads) keys[row * k + i] = buf[i];
  if (tid == 0) {
    SoftmaxState st = empty_softmax_state();
    for (int grp = 0; grp < groups; ++grp) {
      st = softmax_merge(st, SoftmaxState{part_max[grp * n + row], part_sum[grp * n + row]});
    }
    row_max[row] = st.max;
    row_sum[row] = st.sum;
  }
}

// ds of one class chunk for one row per block (see the header). The row's top-k classes inside the
// chunk are marked in a shared slot table (class -> rank), so the sweep over the chunk is one
// coalesced pass with no search; ranks come from `indices`, which similarity_topk makes distinct.
template <typename T>
__global__ void __launch_bounds__(256)
    topk_backward_tile_kernel(const float* __restrict__ dots, int64_t width, int64_t c0,
                              const float* __restrict__ scale_p, const float* __restrict__ bias_p,
                              const float* __restrict__ row_lse, const int64_t* __restrict__ indices,
                              const T* __restrict__ values, const T* __restrict__ grad_values, int k, Act act,
                              T* __restrict__ ds_tile, float* __restrict__ row_sum_ds, bool first) {
  __shared__ short slot[kMaxChunk];
  __shared__ float term[kMaxTopK];
  __shared__ float red[33];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int64_t row = blockIdx.x;
  const int64_t* idx = indices + row * k;
  const T* v = values + row * k;
  const T* g = grad_values + row * k;

  for (int64_t j = tid; j < width; j += nthreads) slot[j] = -1;
  float r = 0.f;  // softmax: sum_t g_t p_t over the top-k (p = the saved values, as autograd would use)
  if (act == Act::kSoftmax) {
    float part = 0.f;
    for (int t = tid; t < k; t += nthreads) part = fmaf(to_float(g[t]), to_float(v[t]), part);
    r = block_sum(part, red);
  }
  __syncthreads();  // slot initialised before ranks are written into it
  for (int t = tid; t < k; t += nthreads) {
    const float gt = to_float(g[t]), vt = to_float(v[t]);
    term[t] = act == Act::kSoftmax ? vt * (gt - r) : act == Act::kSigmoid ? gt * vt * (1.f - vt) : gt;
    const int64_t c = idx[t] - c0;
    if (c >= 0 && c < width) slot[c] = static_cast<short>(t);
  }
  __syncthreads();

  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
  const float lse = row_lse[row];
  const float* dr = dots != nullptr ? dots + row * width : nullptr;
  T* out = ds_tile + row * width;
  float sum = 0.f;
  for (int64_t j = tid; j < width; j += nthreads) {
    const int t = slot[j];
    float val = 0.f;
    if (t >= 0) {
      val = term[t];
    } else if (act == Act::kSoftmax) {
      val = -fast_exp(fmaf(scale, dr[j], bias) - lse) * r;  // p_j * (0 - r)
    }
    out[j] = from_float<T>(val);
    sum += val;
  }
  sum = block_sum(sum, red);
  if (tid == 0) row_sum_ds[row] = (first ? 0.f : row_sum_ds[row]) + sum;
}

// ---- top-k backward on the tensor cores (fp16/bf16; opt-in, see topk_backward_fused) ---------------------
// One 128 x 128 tile of a class chunk's ds per block, in place of cuBLAS's fp32 [N, W] dots and
// topk_backward_tile: the logits come from block_tile_dots and never leave the registers; ds is
// -exp(l - lse) * r (softmax; 0 for sigmoid / none) except at the row's top-k classes, where it is term_t as in
// topk_backward_tile. The operand tiles, free after the products, hold the tile's class -> rank table
// (128 x 128 shorts, -1: not in the top-k). Per-tile row sums of ds go to tile_row_sums [tiles][rows], added in
// tile order by topk_row_sums_kernel.
template <typename T>
__global__ void __launch_bounds__(kDotThreads)
    topk_backward_fused_kernel(const T* __restrict__ x, const T* __restrict__ y_chunk, int64_t n, int64_t width,
                               int64_t d, int64_t c0, const float* __restrict__ scale_p,
                               const float* __restrict__ bias_p, const float* __restrict__ row_lse,
                               const int64_t* __restrict__ indices, const T* __restrict__ values,
                               const T* __restrict__ grad_values, int k, Act act, T* __restrict__ ds,
                               int64_t ds_stride, float* __restrict__ tile_row_sums) {
  constexpr int kTileElems = kDotTile * (kDotK + 8);
  __shared__ __align__(16) unsigned char tiles[2 * kTileElems * sizeof(T)];
  static_assert(kDotTile * kDotTile * sizeof(short) <= sizeof(tiles), "the rank table fits the tiles");
  __shared__ float row_r[kDotTile];  // softmax: r = sum_t g_t v_t of each row
  T* row_tile = reinterpret_cast<T*>(tiles);
  T* col_tile = row_tile + kTileElems;
  short* rank = reinterpret_cast<short*>(tiles);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kDotTile, j0 = static_cast<int64_t>(blockIdx.y) * kDotTile;

  for (int i = warp; i < kDotTile; i += kDotThreads / 32) {  // one warp per row
    const int64_t row = r0 + i;
    float part = 0.f;
    if (act == Act::kSoftmax && row < n) {
      for (int q = lane; q < k; q += 32) {
        part = fmaf(to_float(grad_values[row * k + q]), to_float(values[row * k + q]), part);
      }
    }
    part = warp_sum(part);
    if (lane == 0) row_r[i] = part;
  }
  float acc[kDotTile / 8][4];
  // Its first barrier also orders the row_r writes before the reads below.
  block_tile_dots<T, kDotTile, kDotTile, kDotK, kDotThreads>(acc, row_tile, col_tile, x, y_chunk, d, r0, n, j0, width);
  __syncthreads();  // every warp is done with the operand tiles: they become the rank table
  for (int i = threadIdx.x; i < kDotTile * kDotTile / 2; i += kDotThreads) {
    reinterpret_cast<uint32_t*>(rank)[i] = 0xffffffffu;  // two ranks of -1
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kDotTile * k; i += kDotThreads) {
    const int64_t row = r0 + i / k;
    if (row >= n) break;  // i only grows
    const int64_t col = indices[row * k + i % k] - c0 - j0;
    if (col >= 0 && col < kDotTile && j0 + col < width) rank[(i / k) * kDotTile + col] = static_cast<short>(i % k);
  }
  __syncthreads();

  const float scale = *scale_p;
  const float bias = bias_p != nullptr ? *bias_p : 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int local = warp * 16 + g + 8 * h;
    const int64_t row = r0 + local;
    const bool valid = row < n;
    const float lse = valid ? row_lse[row] : 0.f, r = row_r[local];
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kDotTile / 8; ++j) {
      float v[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * t + e;
        const int q = rank[local * kDotTile + col];
        if (!valid || j0 + col >= width) {
          v[e] = 0.f;
        } else if (q >= 0) {
          const float gq = to_float(grad_values[row * k + q]), vq = to_float(values[row * k + q]);
          v[e] = act == Act::kSoftmax ? vq * (gq - r) : act == Act::kSigmoid ? gq * vq * (1.f - vq) : gq;
        } else {
          v[e] = act == Act::kSoftmax ? -fast_exp(fmaf(scale, acc[j][2 * h + e], bias) - lse) * r : 0.f;  // p_j (0 - r)
        }
        sum += v[e];
      }
      if (valid && j0 + 8 * j + 2 * t < width) store_pair(ds + row * ds_stride, width, j0 + 8 * j + 2 * t, v[0], v[1]);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (t == 0 && valid) tile_row_sums[blockIdx.y * n + row] = sum;
  }
}

// row_sum_ds[r] (+)= the chunk's per-tile row sums, in tile order (deterministic); set when first.
__global__ void __launch_bounds__(256)
    topk_row_sums_kernel(const float* __restrict__ tile_row_sums, int tiles, int64_t n, float* __restrict__ row_sum_ds,
                         bool first) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  float s = first ? 0.f : row_sum_ds[row];
  for (int i = 0; i < tiles; ++i) s += tile_row_sums[i * n + row];
  row_sum_ds[row] = s;
}

}  // namespace

// ================================ launchers ====================================================

cudaError_t normalize_rows(DType dtype, const void* src, int64_t rows, int64_t dim, float* inv, bool compute_inv,
                           float eps, void* dst, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(normalize_rows_kernel<T>, grid(blocks), kWarps * 32, 0, stream, static_cast<const T*>(src), rows, dim,
                  inv, compute_inv, eps, static_cast<T*>(dst));
    return cudaGetLastError();
  });
}

bool similarity_dots_fused_supported(DType dtype, int64_t cols) {
  return (cols + kDotTile - 1) / kDotTile <= 65535 && tensor_core_dtype(dtype);  // grid.y: column tiles
}

cudaError_t similarity_dots_fused(DType dtype, const void* x, const void* y, int64_t rows, int64_t cols, int64_t dim,
                                  void* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return dispatch_tensor_core_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 blocks(grid((rows + kDotTile - 1) / kDotTile), grid((cols + kDotTile - 1) / kDotTile));
    MMFAST_LAUNCH(similarity_dots_kernel<T>, blocks, kDotThreads, 0, stream, static_cast<const T*>(x),
                  static_cast<const T*>(y), rows, cols, dim, static_cast<T*>(out));
  });
}

cudaError_t similarity_epilogue(DType dtype, void* out, int64_t rows, int64_t cols, const float* scale,
                                const float* bias, Act act, int64_t max_cache_bytes, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (act == Act::kSoftmax) {
      const int threads = row_block_threads(cols, kVec<T>, 512);
      const int64_t bytes = row_cache_bytes<T>(cols);
      const bool use_cache = bytes <= std::min(max_cache_bytes, max_dynamic_smem() - 1024);
      const int64_t smem = use_cache ? bytes : 0;
      if (cudaError_t e = allow_smem(softmax_rows_kernel<T>, smem); e != cudaSuccess) return e;
      MMFAST_LAUNCH(softmax_rows_kernel<T>, grid(rows), threads, smem, stream, static_cast<T*>(out), cols, scale, bias,
                    use_cache);
    } else {
      const int64_t n = rows * cols;
      const int64_t blocks = std::min<int64_t>((n / kVec<T> + 255) / 256 + 1, 16384);
      auto kernel = act == Act::kSigmoid ? pointwise_epilogue_kernel<T, Act::kSigmoid>
                                         : pointwise_epilogue_kernel<T, Act::kNone>;
      MMFAST_LAUNCH(kernel, grid(blocks), 256, 0, stream, static_cast<T*>(out), n, scale, bias);
    }
    return cudaGetLastError();
  });
}

cudaError_t activation_backward(DType dtype, const void* grad_out, const void* out, void* ds, int64_t ds_stride,
                                int64_t rows, int64_t cols, Act act, float* row_sum_ds, int64_t max_cache_bytes,
                                cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int threads = row_block_threads(cols, kVec<T>, 512);
    const auto* g = static_cast<const T*>(grad_out);
    const auto* p = static_cast<const T*>(out);
    auto* d = static_cast<T*>(ds);
    if (act == Act::kSoftmax) {
      const int64_t bytes = 2 * row_cache_bytes<T>(cols);
      const bool use_cache = bytes <= std::min(max_cache_bytes, max_dynamic_smem() - 1024);
      const int64_t smem = use_cache ? bytes : 0;
      auto kernel = activation_backward_kernel<T, Act::kSoftmax>;
      if (cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
      MMFAST_LAUNCH(kernel, grid(rows), threads, smem, stream, g, p, d, ds_stride, cols, row_sum_ds, use_cache);
    } else {
      auto kernel = act == Act::kSigmoid ? activation_backward_kernel<T, Act::kSigmoid>
                                         : activation_backward_kernel<T, Act::kNone>;
      MMFAST_LAUNCH(kernel, grid(rows), threads, 0, stream, g, p, d, ds_stride, cols, row_sum_ds, false);
    }
    return cudaGetLastError();
  });
}

cudaError_t normalize_backward(DType dtype, const float* grad_unit, const void* src, const float* inv, int64_t rows,
                               int64_t dim, const float* scale, bool normalize, float eps, void* grad_src,
                               float* row_dot, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(normalize_backward_kernel<T>, grid(blocks), kWarps * 32, 0, stream, grad_unit,
                  static_cast<const T*>(src), inv, rows, dim, scale, normalize, eps, static_cast<T*>(grad_src),
                  row_dot);
    return cudaGetLastError();
  });
}

cudaError_t sum_pair(const float* a, int64_t na, const float* b, int64_t nb, float* out_a, float* out_b,
                     cudaStream_t stream) {
  MMFAST_LAUNCH(sum_pair_kernel, 1, 1024, 0, stream, a, na, b, nb, out_a, out_b);
  return cudaGetLastError();
}

cudaError_t topk_merge_chunk(const float* dots, int64_t rows, int64_t width, int64_t c0, const float* scale,
                             const float* bias, int k, uint64_t* keys, float* row_max, float* row_sum,
                             cudaStream_t stream) {
  if (k < 1 || k > kMaxTopK || c0 < 0 || c0 + width > 0xffffffffll) return cudaErrorInvalidValue;
  if (rows == 0 || width == 0) return cudaSuccess;
  MMFAST_LAUNCH(topk_merge_chunk_kernel, grid(rows), kTopkThreads, 0, stream, dots, width, c0, scale, bias, k, keys,
                row_max, row_sum);
  return cudaGetLastError();
}

int topk_fused_groups(int64_t rows, int64_t cols, int k, int sm_count) {
  const int64_t row_tiles = (rows + kDotTile - 1) / kDotTile, col_tiles = (cols + kDotTile - 1) / kDotTile;
  if (row_tiles == 0 || col_tiles == 0 || k < 1) return 1;
  const int64_t target = static_cast<int64_t>(kFusedTopkTargetBlocks) * std::max(sm_count, 1);
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(col_tiles, kSortCap / k));
  const int64_t want = std::clamp<int64_t>((target + row_tiles - 1) / row_tiles, 1, most);
  const int64_t per_group = (col_tiles + want - 1) / want;
  return static_cast<int>((col_tiles + per_group - 1) / per_group);  // no group left without a tile
}

int topk_fused_groups(int64_t rows, int64_t cols, int k) {
  return topk_fused_groups(rows, cols, k, cached_device_attribute<cudaDevAttrMultiProcessorCount>(1));
}

bool similarity_topk_fused_supported(DType dtype, int k, int64_t cols) {
  return tensor_core_dtype(dtype) && k >= 1 && k <= kFusedTopK && cols <= 0xffffffffll;
}

cudaError_t similarity_topk_fused(DType dtype, const void* x, const void* y, int64_t rows, int64_t cols, int64_t dim,
                                  const float* scale, const float* bias, int k, int groups, uint64_t* part_keys,
                                  float* part_max, float* part_sum, uint64_t* keys, float* row_max, float* row_sum,
                                  cudaStream_t stream) {
  if (k < 1 || k > kFusedTopK || groups < 1 || groups > kSortCap / k || cols > 0xffffffffll) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t col_tiles = (cols + kDotTile - 1) / kDotTile;
  const int64_t tiles_per_group = (col_tiles + groups - 1) / groups;
  const int64_t lists_bytes = static_cast<int64_t>(kDotTile) * k * sizeof(uint64_t);
  cudaError_t attribute = cudaSuccess;
  const cudaError_t launched = dispatch_tensor_core_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // Always set: the default dynamic limit is 48 KB less the kernel's 36 KB of static tiles.
    attribute = cudaFuncSetAttribute(topk_tiles_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(lists_bytes));
    if (attribute != cudaSuccess) return;
    const dim3 blocks(grid((rows + kDotTile - 1) / kDotTile), static_cast<unsigned>(groups));
    MMFAST_LAUNCH(topk_tiles_kernel<T>, blocks, kDotThreads, lists_bytes, stream, static_cast<const T*>(x),
                  static_cast<const T*>(y), rows, cols, dim, scale, bias, k, tiles_per_group, part_keys, part_max,
                  part_sum);
    MMFAST_LAUNCH(topk_merge_groups_kernel, grid(rows), kTopkThreads, 0, stream, part_keys, part_max, part_sum, rows,
                  k, groups, keys, row_max, row_sum);
  });
  return attribute != cudaSuccess ? attribute : launched;
}

cudaError_t topk_finalize(DType dtype, const uint64_t* keys, const float* row_max, const float* row_sum, int64_t rows,
                          int k, Act act, void* values, int64_t* indices, float* row_lse, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((rows * k + 255) / 256, 65535);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(topk_finalize_kernel<T>, grid(blocks), 256, 0, stream, keys, row_max, row_sum, rows, k, act,
                  static_cast<T*>(values), indices, row_lse);
    return cudaGetLastError();
  });
}

cudaError_t topk_backward_tile(DType dtype, const float* dots, int64_t rows, int64_t width, int64_t c0,
                               const float* scale, const float* bias, const float* row_lse, const int64_t* indices,
                               const void* values, const void* grad_values, int k, Act act, void* ds_tile,
                               float* row_sum_ds, bool first, cudaStream_t stream) {
  if (k < 1 || k > kMaxTopK || width > kMaxChunk || (act == Act::kSoftmax && dots == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0 || width == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    MMFAST_LAUNCH(topk_backward_tile_kernel<T>, grid(rows), 256, 0, stream, dots, width, c0, scale, bias, row_lse,
                  indices, static_cast<const T*>(values), static_cast<const T*>(grad_values), k, act,
                  static_cast<T*>(ds_tile), row_sum_ds, first);
    return cudaGetLastError();
  });
}


bool topk_backward_fused_supported(DType dtype) { return tensor_core_dtype(dtype); }

cudaError_t topk_backward_fused(DType dtype, const void* x, const void* y_chunk, int64_t rows, int64_t width,
                                int64_t dim, int64_t c0, const float* scale, const float* bias, const float* row_lse,
                                const int64_t* indices, const void* values, const void* grad_values, int k, Act act,
                                void* ds, int64_t ds_stride, float* tile_row_sums, float* row_sum_ds, bool first,
                                cudaStream_t stream) {
  if (k < 1 || k > kMaxTopK || width > kMaxChunk || ds_stride < width) return cudaErrorInvalidValue;
  if (rows == 0 || width == 0) return cudaSuccess;
  const int64_t tiles = (width + kDotTile - 1) / kDotTile;
  return dispatch_tensor_core_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 blocks(grid((rows + kDotTile - 1) / kDotTile), grid(tiles));
    MMFAST_LAUNCH(topk_backward_fused_kernel<T>, blocks, kDotThreads, 0, stream, static_cast<const T*>(x),
                  static_cast<const T*>(y_chunk), rows, width, dim, c0, scale, bias, row_lse, indices,
                  static_cast<const T*>(values), static_cast<const T*>(grad_values), k, act, static_cast<T*>(ds),
                  ds_stride, tile_row_sums);
    MMFAST_LAUNCH(topk_row_sums_kernel, grid((rows + 255) / 256), 256, 0, stream, tile_row_sums,
                  static_cast<int>(tiles), rows, row_sum_ds, first);
  });
}

}  // namespace mmfast::cuda
