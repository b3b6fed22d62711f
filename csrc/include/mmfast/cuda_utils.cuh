// Device helpers shared by mmfast's CUDA kernels: dtype conversion, 16-byte vector access to rows
// of any length and alignment, warp/block reductions and the online-softmax (max, sum-exp) state.
// No torch headers: .cu files that include this stay quick to compile (torch's headers cost nvcc
// most of its time per unit).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "mmfast/online_softmax.h"

// The block's dynamic shared memory as `type name[]`. A macro so that tests/native/cuda_emulation.h can
// point it at its CPU buffer (it defines the macro first).
#ifndef MMFAST_DYNAMIC_SMEM
#define MMFAST_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace mmfast::cuda {

// ---- dtype conversion: kernels load T, compute in fp32, store T ---------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// ---- 16-byte vectors ------------------------------------------------------------------------------
// One 16-byte access per thread is what saturates HBM (HOPPER.md); kVec<T> elements per access.
template <typename T>
inline constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <int W>
using Width = std::integral_constant<int, W>;

// W raw elements of a row: a whole 16-byte vector (W == kVec<T>) or one element (W == 1, the
// unaligned ends of a row). Kept raw so a kernel can cache it in shared memory unconverted.
template <typename T, int W>
struct alignas(W == kVec<T> ? 16 : alignof(T)) Raw {
  T v[W];
  __device__ __forceinline__ float f(int i) const { return to_float(v[i]); }
};

// W == kVec<T> needs a 16-byte aligned p; the uint4 round trip makes nvcc emit one 128-bit access.
template <int W, typename T>
__device__ __forceinline__ Raw<T, W> load_raw(const T* p) {
  Raw<T, W> r;
  if constexpr (W == 1) {
    r.v[0] = *p;
  } else {
    static_assert(W == kVec<T>, "vector accesses are 16 bytes");
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  }
  return r;
}

template <int W, typename T>
__device__ __forceinline__ void store_raw(T* p, const Raw<T, W>& r) {
  if constexpr (W == 1) {
    *p = r.v[0];
  } else {
    static_assert(W == kVec<T>, "vector accesses are 16 bytes");
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
  }
}

// Stores W fp32 values as T (rounded to nearest even).
template <int W, typename T>
__device__ __forceinline__ void store_f32(T* p, const float (&x)[W]) {
  Raw<T, W> r;
#pragma unroll
  for (int i = 0; i < W; ++i) r.v[i] = from_float<T>(x[i]);
  store_raw<W>(p, r);
}

// Two fragments loaded together (rows of two arrays at the same position).
template <typename A, typename B>
struct Two {
  A a;
  B b;
};

// A row of n elements starting at `row` splits into a scalar head [0, head) up to the first
// 16-byte boundary, a body [head, body_end) of whole aligned vectors, and a scalar tail
// [body_end, n). Rows of an [R, C] tensor with odd C start at every alignment, so every row kernel
// needs this split. Arrays of one dtype and row length whose base pointers are 16-byte aligned
// (the host code guarantees it) share one split per row.
struct RowSplit {
  int64_t head;
  int64_t body_end;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int64_t n) {
  constexpr int V = kVec<T>;
  const int64_t misalign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % V);
  int64_t head = misalign == 0 ? 0 : V - misalign;
  if (head > n) head = n;
  return {head, head + (n - head) / V * V};
}

// Visits the chunks of a row that thread `tid` of `nthreads` owns: frag = load(j, Width<W>) then
// use(j, frag, Width<W>), with W = V for body vectors (j 16-byte aligned) and W = 1 for the head
// and tail elements. The body is unrolled by U with all U loads issued before the first use, so
// U 16-byte loads per thread are in flight whatever `use` stores (the compiler could not hoist
// loads over stores that may alias). A thread owns the same chunks for the same (split, tid,
// nthreads): a second pass re-reads exactly what the first pass cached.
template <int V, int U = 4, typename Load, typename Use>
__device__ __forceinline__ void for_each_chunk(RowSplit s, int64_t n, int tid, int nthreads, Load&& load,
                                               Use&& use) {
  const int64_t stride = static_cast<int64_t>(nthreads) * V;
  int64_t j = s.head + static_cast<int64_t>(tid) * V;
  for (; j + (U - 1) * stride < s.body_end; j += U * stride) {
    decltype(load(j, Width<V>{})) frag[U];
#pragma unroll
    for (int u = 0; u < U; ++u) frag[u] = load(j + u * stride, Width<V>{});
#pragma unroll
    for (int u = 0; u < U; ++u) use(j + u * stride, frag[u], Width<V>{});
  }
  for (; j < s.body_end; j += stride) use(j, load(j, Width<V>{}), Width<V>{});
  for (int64_t i = tid; i < s.head; i += nthreads) use(i, load(i, Width<1>{}), Width<1>{});
  for (int64_t i = s.body_end + tid; i < n; i += nthreads) use(i, load(i, Width<1>{}), Width<1>{});
}

// ---- reductions -------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `scratch` holds 33 floats of shared memory. Deterministic: a fixed shuffle tree per warp, then
// warp 0 sums the warp partials in a fixed order. Safe to call repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // a previous call's readers of scratch[32] are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < nwarps ? scratch[lane] : 0.f;
    w = warp_sum(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// exp through ex2.approx: the kernels are built with --use_fast_math, so expf is __expf anyway;
// spelled out so the choice stays when flags change. Relative error ~2 ulp plus |x| * 2^-24.
__device__ __forceinline__ float fast_exp(float x) { return exp2f(x * 1.4426950408889634f); }

// Online softmax (max, sum-exp) of a set of logits: the state and its merge come from
// mmfast/online_softmax.h (shared with the CPU kernels); this adds the per-logit update the GPU
// kernels use and warp/block merges. NaN logits make the sum NaN (the row's softmax is NaN, as in
// torch); -inf logits add nothing; an empty set is {-inf, 0}. The merge is associative up to
// rounding, so a fixed reduction tree is deterministic.
using SoftmaxState = online_softmax::State<float>;

__device__ __forceinline__ SoftmaxState empty_softmax_state() { return online_softmax::empty_state<float>(); }

// Adds W logits: one rescale per call, then one exp per logit (a per-logit rescale would cost ptxas
// two MUFU.EX2 per logit after if-conversion; measured in the SASS of softmax_rows_kernel).
template <int W>
__device__ __forceinline__ void softmax_add(SoftmaxState& st, const float (&l)[W]) {
  float top = l[0];
#pragma unroll
  for (int i = 1; i < W; ++i) top = fmaxf(top, l[i]);  // fmaxf skips NaN: the max is never NaN
  if (top > st.max) {  // rescale what was summed so far (exp(-inf) = 0 the first time)
    st.sum *= fast_exp(st.max - top);
    st.max = top;
  }
#pragma unroll
  for (int i = 0; i < W; ++i) {
    if (l[i] != -INFINITY) st.sum += fast_exp(l[i] - st.max);  // a NaN logit makes the sum NaN
  }
}

__device__ __forceinline__ SoftmaxState softmax_merge(const SoftmaxState& a, const SoftmaxState& b) {
  float fa, fb;
  return online_softmax::merge(a, b, &fa, &fb);
}

__device__ __forceinline__ SoftmaxState warp_reduce(SoftmaxState st) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const SoftmaxState other{__shfl_xor_sync(0xffffffffu, st.max, o), __shfl_xor_sync(0xffffffffu, st.sum, o)};
    st = softmax_merge(st, other);
  }
  return st;
}

// Block-wide merge of SoftmaxStates; every thread gets the result. `scratch` holds 66 floats.
__device__ __forceinline__ SoftmaxState block_reduce(SoftmaxState st, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  st = warp_reduce(st);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = st.max;
    scratch[33 + warp] = st.sum;
  }
  __syncthreads();
  if (warp == 0) {
    SoftmaxState w = empty_softmax_state();
    if (lane < nwarps) w = SoftmaxState{scratch[lane], scratch[33 + lane]};
    w = warp_reduce(w);
    if (lane == 0) {
      scratch[32] = w.max;
      scratch[65] = w.sum;
    }
  }
  __syncthreads();
  return SoftmaxState{scratch[32], scratch[65]};
}

// Threads per block for a row kernel: enough that each thread handles ~4 vectors, 32..max_threads.
// Small rows get a single warp (a 256-thread block on a 100-class row would idle 90% of it).
inline int row_block_threads(int64_t n, int vec, int max_threads) {
  int threads = 32;
  while (threads < max_threads && static_cast<int64_t>(threads) * vec * 4 < n) threads *= 2;
  return threads;
}

}  // namespace mmfast::cuda
