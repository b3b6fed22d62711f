// Launchers of SAM's fused mask-decoder cross-attention blocks (csrc/cuda/sam_attention.cu), called by the
// operator glue (csrc/cuda/sam_attention_api.cpp). Plain C++: no torch and no CUDA device headers.
//
// Both blocks compute LayerNorm(residual + out_proj(attention(q_proj(q), k_proj(k), v_proj(v)))) for SAM's
// cross-attentions in ONE kernel launch each, on the operands of mmfast.ops.sam_attention's "few keys" /
// "few queries" rearrangements (the short side's projections folded into the other; the glue forms the folded
// operands from the few tokens with small GEMMs). Upstream runs ~15 kernels per block (4 projections, head
// split/merge copies, 2 bmm, softmax, residual add, LayerNorm).
//
// Contract: device pointers on the current device; T-typed arrays (void*, dtype `dtype`) contiguous, except the
// batch strides given (0 = one operand shared by every batch entry); fp32 math, T output. Each returns the
// launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "mmfast/cuda_types.h"

namespace mmfast::cuda {

// ---- image -> token (few keys) -------------------------------------------------------------------------------
// out[b, r, :] = LayerNorm(residual[b, r, :] + out_bias + sum_g P[b, r, g] * value_folded[b, g, :]) * norm_weight +
// norm_bias, with g = h * keys + j over heads x keys, scores[b, r, g] = scale * (x[b, r, :] . key_folded[b, g, :] +
// key_bias[b, g]) and P the softmax of the scores over each head's `keys` entries. (In SAM: x = image + pe,
// key_folded[h*keys + j] = Wq_h^T k_hj, key_bias = bq_h . k_hj, value_folded[h*keys + j] = Wo_h v_hj: out_bias is
// added once since each head's probabilities sum to 1. Scale and bias in the kernel save the glue 4 launches.)
struct ImageToTokenShape {
  int64_t batch, rows, channels, out_channels, heads, keys;
};

// Each thread keeps one head's scores in registers.
inline constexpr int64_t kImageToTokenMaxKeys = 16;

// Shared memory the kernel needs (the folded operands in fp32 plus a row tile); the glue compares it with the
// device's limit (device_smem_limit) and runs the unfused arrangement when it does not fit.
int64_t image_to_token_smem_bytes(const ImageToTokenShape& s);

cudaError_t sam_image_to_token(DType dtype, const ImageToTokenShape& s, const void* x, int64_t x_batch_stride,
                               const void* key_folded, const void* key_bias, const void* value_folded,
                               const void* out_bias, const void* residual, int64_t residual_batch_stride,
                               const void* norm_weight, const void* norm_bias, float scale, float eps, void* out,
                               cudaStream_t stream);

// ---- token -> image (few queries) ----------------------------------------------------------------------------
// attended[b, g, :] = softmax_j(scale * (query_folded[b, g, :] . k[b, j, :] + query_bias[b, g])) @ v[b, :, :] over
// all keys j,
// g = h * queries + l; o[b, l, h*head_dim + i] = attended[b, h*queries + l, :] . v_weight[h*head_dim + i, :] +
// v_bias[h*head_dim + i]; out[b, l, :] = LayerNorm(residual[b, l, :] + o[b, l, :] @ out_weight^T + out_bias).
// The keys are split into chunks of kTokenToImageChunk, one block each; each block applies v_weight to its partial
// attended rows (16x fewer partials than the raw [G, channels] sums at SAM's shapes), and the last block of a batch
// entry to finish (an atomic ticket) merges the partials in chunk order (deterministic) and runs the epilogue.
struct TokenToImageShape {
  int64_t batch, queries, keys, channels, heads, head_dim, out_channels;
};

inline constexpr int64_t kTokenToImageChunk = 64;
// Each thread keeps one channel's partial sums for every (head, query) row in registers.
inline constexpr int64_t kTokenToImageMaxRows = 64;

int64_t token_to_image_chunks(const TokenToImageShape& s);
int64_t token_to_image_smem_bytes(const TokenToImageShape& s);
// fp32 partials the launch needs: batch * chunks * heads * queries * (2 + head_dim).
int64_t token_to_image_scratch_floats(const TokenToImageShape& s);

// tickets: `batch` ints, zero on entry (the glue zeroes them; the kernel leaves them at `chunks`).
cudaError_t sam_token_to_image(DType dtype, const TokenToImageShape& s, const void* query_folded,
                               const void* query_bias, const void* k, const void* v, int64_t kv_batch_stride,
                               const void* v_weight, const void* v_bias, const void* out_weight, const void* out_bias,
                               const void* residual, const void* norm_weight, const void* norm_bias, float scale,
                               float eps, float* scratch, int* tickets, void* out, cudaStream_t stream);

}  // namespace mmfast::cuda
