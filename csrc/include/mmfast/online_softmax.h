// Online (streaming) softmax and log-sum-exp merge math, for rows whose logits arrive in tiles.
//
// A row seen so far is summarized by State{max, sum}: max = the largest logit, sum = sum_j exp(s_j - max).
// Each new tile may raise the max; the old sum (and any output accumulated with weights exp(s_j - max),
// e.g. the attention output O = sum_j p_j v_j) is then rescaled by exp(old_max - new_max). Two states of
// the same row computed over disjoint key ranges (split-K, or two key segments) merge the same way.
// The statistics are kept in fp32 (or fp64) whatever the input dtype.
//
// Scalar, header-only and free of ATen so the CPU kernels and, later, CUDA kernels share it: under nvcc
// every function is __host__ __device__.
#pragma once

#include <math.h>

#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MMFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMFAST_HOST_DEVICE inline
#endif

namespace mmfast::online_softmax {

// expf/logf on float, exp/log on double; the C names resolve in both host and device code.
MMFAST_HOST_DEVICE float exp_(float x) { return ::expf(x); }
MMFAST_HOST_DEVICE double exp_(double x) { return ::exp(x); }
MMFAST_HOST_DEVICE float log_(float x) { return ::logf(x); }
MMFAST_HOST_DEVICE double log_(double x) { return ::log(x); }

template <typename T>
struct State {
  T max;  // largest logit seen; -inf before the first one
  T sum;  // sum_j exp(s_j - max)
};

template <typename T>
MMFAST_HOST_DEVICE State<T> empty_state() {
  return {-std::numeric_limits<T>::infinity(), T(0)};
}

// exp(old_max - new_max), the factor that rebases a sum (or accumulator) kept relative to old_max onto
// new_max >= old_max. An empty row (old_max = -inf) gives 0, never the NaN of (-inf) - (-inf).
template <typename T>
MMFAST_HOST_DEVICE T rebase_factor(T old_max, T new_max) {
  return old_max == -std::numeric_limits<T>::infinity() ? T(0) : exp_(old_max - new_max);
}

// Raises the running max to cover a tile whose largest logit is tile_max and rebases the sum. Returns
// the factor the caller applies to its output accumulator; the caller then computes the tile's
// p_j = exp(s_j - state.max) and adds sum_j p_j to state.sum. A NaN tile_max poisons the row (the
// comparison is written so that NaN wins), as a NaN logit poisons the reference softmax.
template <typename T>
MMFAST_HOST_DEVICE T advance(State<T>& state, T tile_max) {
  const T new_max = (tile_max > state.max || tile_max != tile_max) ? tile_max : state.max;
  const T factor = rebase_factor(state.max, new_max);
  state.max = new_max;
  state.sum *= factor;
  return factor;
}

// Merges two partial states of one row over disjoint key ranges. *factor_a / *factor_b rebase the
// parts' accumulators: O = factor_a * O_a + factor_b * O_b (then divide by the merged sum).
template <typename T>
MMFAST_HOST_DEVICE State<T> merge(const State<T>& a, const State<T>& b, T* factor_a, T* factor_b) {
  const T new_max = (b.max > a.max || b.max != b.max) ? b.max : a.max;
  *factor_a = rebase_factor(a.max, new_max);
  *factor_b = rebase_factor(b.max, new_max);
  return {new_max, a.sum * *factor_a + b.sum * *factor_b};
}

// The row's log-sum-exp, max + log(sum): what the fused backward needs to recompute p_j = exp(s_j - lse).
template <typename T>
MMFAST_HOST_DEVICE T log_sum_exp(const State<T>& state) {
  return state.max + log_(state.sum);
}

// p_j from a stored log-sum-exp (backward recomputation).
template <typename T>
MMFAST_HOST_DEVICE T prob_from_lse(T logit, T lse) {
  return exp_(logit - lse);
}

}  // namespace mmfast::online_softmax
