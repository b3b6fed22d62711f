// Launchers of the cross_attention CUDA kernels (csrc/cuda/cross_attention.cu), called by the operator
// glue (csrc/cuda/cross_attention_api.cpp). Plain C++: no torch and no CUDA device headers.
//
// Contract: pointers are device pointers on the current device; every operand is a [B, H, L, d] view
// with a unit stride on d and any B/H/L strides (permuted heads, stride-0 expanded batches); T-typed
// arrays have dtype `dtype`; lse and delta are contiguous fp32 [B, H, Lq]. The glue checks shapes, head
// dims (16..128) and that the block's shared memory fits (attention_smem_bytes). Each launcher returns
// the first failing launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mmfast/cuda_types.h"

namespace mmfast::cuda {

// Element (b, h, l, c) of an operand lives at data + b * batch_stride + h * head_stride + l * row_stride + c.
struct HeadRows {
  const void* data;
  int64_t batch_stride, head_stride, row_stride;
};

struct MutableHeadRows {
  void* data;
  int64_t batch_stride, head_stride, row_stride;
};

// q [B, H, Lq, d]; segment s of the keys/values is [B, H, key_len[s], d] (segments = 1 or 2; the
// second is attended after the first, as if concatenated).
struct AttentionShape {
  int64_t batch, heads, q_len, head_dim;
  int segments;
  int64_t key_len[2];
};

// The largest dynamic shared memory any of the kernels needs for this head dim (bytes).
int64_t attention_smem_bytes(int64_t head_dim);

// The dynamic shared memory a block may opt in to on the current device (bytes), and its SM count.
int64_t device_smem_limit();
int device_sm_count();

// How many key ranges the forward splits the keys into (split-K) for this shape on a device with
// sm_count SMs: 1 when the (batch*head, 64-query block) grid fills the device already.
int attention_forward_splits(const AttentionShape& shape, int sm_count);

// Floats of scratch the forward needs with `splits` > 1: each split's output and log-sum-exp.
inline int64_t attention_split_scratch_floats(const AttentionShape& shape, int splits) {
  return splits > 1 ? splits * shape.batch * shape.heads * shape.q_len * (shape.head_dim + 1) : 0;
}

// Whether fp16/bf16 attention runs on the tensor-core kernels (mma.sync, sm_80 and later) on the current
// device; fp32 always runs on the CUDA cores, exact (no TF32).
bool attention_tensor_cores(DType dtype);

// out = softmax(scale * q k^T) v over both segments; lse [B, H, Lq] = the rows' log-sum-exp. With
// splits > 1 (attention_forward_splits) each of `splits` blocks per query block attends a range of the
// keys into split_scratch (attention_split_scratch_floats) and a second kernel merges them by their
// log-sum-exps. tensor_cores (attention_tensor_cores) picks the mma kernels for fp16/bf16; fp32 ignores it.
cudaError_t cross_attention_forward(DType dtype, const AttentionShape& shape, HeadRows q, const HeadRows (&k)[2],
                                    const HeadRows (&v)[2], float scale, MutableHeadRows out, float* lse,
                                    int splits, float* split_scratch, bool tensor_cores, cudaStream_t stream);

// The fused backward: delta = rowsum(grad_out * out) into the scratch `delta` [B, H, Lq], then dK/dV
// (one block per key block, streaming the queries) and dQ (one block per query block, streaming the keys):
// two kernels that each own their outputs, so no atomics and a deterministic result.
cudaError_t cross_attention_backward(DType dtype, const AttentionShape& shape, HeadRows q, const HeadRows (&k)[2],
                                     const HeadRows (&v)[2], HeadRows out, HeadRows grad_out, const float* lse,
                                     float scale, float* delta, MutableHeadRows grad_q,
                                     const MutableHeadRows (&grad_k)[2], const MutableHeadRows (&grad_v)[2],
                                     bool tensor_cores, cudaStream_t stream);

}  // namespace mmfast::cuda
