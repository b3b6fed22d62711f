// CUDA kernels of SAM's fused mask-decoder cross-attention blocks (mmfast::sam_image_to_token,
// mmfast::sam_token_to_image) and their launchers; the math is in mmfast/sam_attention_cuda.h.
//
// SAM's cross-attentions pair 4096 image tokens with a few prompt tokens (7 for one point), 8 heads of
// dimension 16. On the H200 (2026-12-04) its TwoWayTransformer took ~5.5 ms upstream at B=1 and at B=16
// alike: launches and host overhead, not arithmetic, set the time (DESIGN.md section 9). So each direction is
// ONE kernel here, attention + output projection + residual + LayerNorm, on the operands of
// mmfast.ops.sam_attention's rearrangements, whose folded weights make the image side's work two GEMV-like
// passes of heads x tokens (56) columns instead of four 4096 x 256 x 128 projections:
//
//   image -> token  one block per 32 image rows: scores against the folded keys (G = heads x keys columns),
//                   each head's softmax in one thread's registers, P @ value_folded + residual, LayerNorm.
//   token -> image  one block per 64 image keys (split-K): the chunk's scores for all G = heads x queries rows,
//                   its softmax partials, P @ v, then v_weight applied to the partial rows (G x head_dim floats
//                   per chunk, not G x channels); the last block of a batch entry merges the chunks in order
//                   (deterministic) and runs v_bias, out_proj, the residual and LayerNorm.
//
// fp32 math on the CUDA cores for every dtype: at SAM's shapes a block's work is ~1 MFLOP and the image side
// is read once (4096 x 256 elements per operand), so the kernels are bound by memory and launch latency, not
// by the multiply-adds (estimated, NOT measured on a GPU). Forward only: the glue runs them where no gradient
// is needed (inference, SAM's automatic mask generator); training keeps the differentiable rearrangements.
#include "mmfast/cuda_launch.cuh"
#include "mmfast/cuda_utils.cuh"
#include "mmfast/sam_attention_cuda.h"

#include <algorithm>

namespace mmfast::cuda {
namespace {

constexpr int kThreads = 256;

// ================================ image -> token ===============================================
constexpr int kRowGroup = 8;                            // threads per image row
constexpr int kImageRows = kThreads / kRowGroup;        // image rows per block

struct ImageToTokenLayout {  // offsets in floats into the block's shared memory
  int64_t key, value, key_bias, tile, probs, total;
  int64_t key_stride, tile_stride, probs_stride;
};

// The +1 strides keep the eight threads of a row group (each on its own head) on different banks.
__host__ __device__ inline ImageToTokenLayout image_to_token_layout(const ImageToTokenShape& s) {
  ImageToTokenLayout l{};
  const int64_t g = s.heads * s.keys;
  l.key_stride = s.channels + 1;
  l.tile_stride = (s.channels > s.out_channels ? s.channels : s.out_channels) + 1;
  l.probs_stride = g + 1;
  l.key = 0;
  l.value = l.key + g * l.key_stride;
  l.key_bias = l.value + g * s.out_channels;
  l.tile = l.key_bias + g;
  l.probs = l.tile + kImageRows * l.tile_stride;
  l.total = l.probs + kImageRows * l.probs_stride;
  return l;
}

// Sum over `Width` aligned lanes (a power of two <= 32; every lane of the warp must call it), fixed order.
template <int Width>
__device__ __forceinline__ float lanes_sum(float v) {
#pragma unroll
  for (int o = 1; o < Width; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// out_row = LayerNorm(y) * weight + bias for one fp32 row y of n values, by `Width` aligned lanes, `lane` among them
// (values lane, lane + Width, ...): two passes (the mean, then the variance about it: no cancellation). Every lane
// of the warp must call it (shuffles); out_row null: the row is not written (a tile's rows past the end).
template <int Width, typename T>
__device__ __forceinline__ void layer_norm_row(const float* y, int n, int lane, const T* weight, const T* bias,
                                               float eps, T* out_row) {
  float partial = 0.f;
  for (int e = lane; e < n; e += Width) partial += y[e];
  const float mean = lanes_sum<Width>(partial) / static_cast<float>(n);
  partial = 0.f;
  for (int e = lane; e < n; e += Width) partial += (y[e] - mean) * (y[e] - mean);
  const float rstd = 1.f / sqrtf(lanes_sum<Width>(partial) / static_cast<float>(n) + eps);
  if (out_row == nullptr) return;
  for (int e = lane; e < n; e += Width) {
    out_row[e] = from_float<T>((y[e] - mean) * rstd * to_float(weight[e]) + to_float(bias[e]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) image_to_token_kernel(
    ImageToTokenShape s, const T* __restrict__ x, int64_t x_batch_stride, const T* __restrict__ key_folded,
    const T* __restrict__ key_bias, const T* __restrict__ value_folded, const T* __restrict__ out_bias,
    const T* __restrict__ residual, int64_t residual_batch_stride, const T* __restrict__ norm_weight,
    const T* __restrict__ norm_bias, float scale, float eps, T* __restrict__ out) {
  MMFAST_DYNAMIC_SMEM(float, smem);
  const ImageToTokenLayout l = image_to_token_layout(s);
  float* key_s = smem + l.key;
  float* value_s = smem + l.value;
  float* key_bias_s = smem + l.key_bias;
  float* tile = smem + l.tile;  // the x rows, then the residual sums
  float* probs = smem + l.probs;

  const int tid = threadIdx.x;
  // Counts as int (the glue bounds them): 64-bit divisions would be calls (ptxas spilled around them).
  const int64_t b = blockIdx.y, r0 = static_cast<int64_t>(blockIdx.x) * kImageRows;
  const int heads = static_cast<int>(s.heads), keys = static_cast<int>(s.keys);
  const int g_count = heads * keys, c_in = static_cast<int>(s.channels), c_out = static_cast<int>(s.out_channels);
  const T* key_b = key_folded + b * g_count * c_in;
  const T* value_b = value_folded + b * g_count * c_out;
  for (int i = tid; i < g_count * c_in; i += kThreads) key_s[i / c_in * l.key_stride + i % c_in] = to_float(key_b[i]);
  for (int i = tid; i < g_count * c_out; i += kThreads) value_s[i] = to_float(value_b[i]);
  for (int i = tid; i < g_count; i += kThreads) key_bias_s[i] = to_float(key_bias[b * g_count + i]);
  const T* x_b = x + b * x_batch_stride;
  for (int i = tid; i < kImageRows * c_in; i += kThreads) {
    const int r = i / c_in, c = i % c_in;
    tile[r * l.tile_stride + c] = r0 + r < s.rows ? to_float(x_b[(r0 + r) * c_in + c]) : 0.f;
  }
  __syncthreads();

  // Scores and softmax: thread `lane` of a row group takes heads lane, lane + 8, ...; a head's <= 16 scores stay
  // in its registers.
  const int r = tid / kRowGroup, lane = tid % kRowGroup;
  const float* x_row = tile + r * l.tile_stride;
  for (int h = lane; h < heads; h += kRowGroup) {
    const int g0 = h * keys;
    float score[kImageToTokenMaxKeys];
#pragma unroll
    for (int j = 0; j < kImageToTokenMaxKeys; ++j) score[j] = j < keys ? key_bias_s[g0 + j] : 0.f;
    for (int c = 0; c < c_in; ++c) {
      const float xv = x_row[c];
#pragma unroll
      for (int j = 0; j < kImageToTokenMaxKeys; ++j) {
        if (j < keys) score[j] += xv * key_s[(g0 + j) * l.key_stride + c];
      }
    }
    float top = -INFINITY;
#pragma unroll
    for (int j = 0; j < kImageToTokenMaxKeys; ++j) {
      score[j] *= scale;
      if (j < keys) top = fmaxf(top, score[j]);
    }
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kImageToTokenMaxKeys; ++j) {
      if (j < keys) {
        score[j] = fast_exp(score[j] - top);
        sum += score[j];
      }
    }
    const float inv = 1.f / sum;
#pragma unroll
    for (int j = 0; j < kImageToTokenMaxKeys; ++j) {
      if (j < keys) probs[r * l.probs_stride + g0 + j] = score[j] * inv;
    }
  }
  __syncthreads();  // every head's probabilities are in; the x tile is free

  // y = residual + out_bias + P @ value_folded, into the tile (each thread re-reads only what it wrote), then
  // LayerNorm over the row group.
  const int64_t row = r0 + r;
  const bool live = row < s.rows;
  const T* res_row = residual + b * residual_batch_stride + row * c_out;
  const float* p_row = probs + r * l.probs_stride;
  float* y_row = tile + r * l.tile_stride;
  for (int e = lane; e < c_out; e += kRowGroup) {
    float y = live ? to_float(res_row[e]) + to_float(out_bias[e]) : 0.f;
    for (int g = 0; g < g_count; ++g) y += p_row[g] * value_s[g * c_out + e];
    y_row[e] = y;
  }
  layer_norm_row<kRowGroup>(y_row, c_out, lane, norm_weight, norm_bias, eps,
                            live ? out + (b * s.rows + row) * c_out : nullptr);
}

// ================================ token -> image ===============================================
constexpr int kChunk = static_cast<int>(kTokenToImageChunk);
constexpr int kMaxRows = static_cast<int>(kTokenToImageMaxRows);
constexpr int kScoreRowsPerThread = kMaxRows * kChunk / kThreads;  // the score phase: 4 row sets x 64 keys

struct TokenToImageLayout {  // offsets in floats
  int64_t query, kv, scores, query_bias, total;
  int64_t query_stride, kv_stride, scores_stride;
  // In the last block, after the chunk's work: the merged heads [queries, heads*head_dim] and the residual sums
  // [queries, out_channels], over the kv region (sized for both).
  int64_t merged, sums;
};

__host__ __device__ inline TokenToImageLayout token_to_image_layout(const TokenToImageShape& s) {
  TokenToImageLayout l{};
  const int64_t g = s.heads * s.queries, hd = s.heads * s.head_dim;
  l.query_stride = s.channels + 1;
  l.kv_stride = s.channels + 1;
  l.scores_stride = kChunk + 1;
  l.query = 0;
  l.kv = l.query + g * l.query_stride;
  const int64_t kv_floats = kChunk * l.kv_stride, epilogue_floats = s.queries * (hd + s.out_channels);
  l.scores = l.kv + (kv_floats > epilogue_floats ? kv_floats : epilogue_floats);
  l.query_bias = l.scores + g * l.scores_stride;
  l.total = l.query_bias + g;
  l.merged = l.kv;
  l.sums = l.merged + s.queries * hd;
  return l;
}

template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int64_t dst_stride, const T* src, int rows, int valid_rows,
                                          int cols) {
  for (int i = threadIdx.x; i < rows * cols; i += kThreads) {
    const int r = i / cols, c = i % cols;
    dst[r * dst_stride + c] = r < valid_rows ? to_float(src[r * cols + c]) : 0.f;
  }
}

// acc[i] = sum_k a[row_i * a_stride + k] * b[k * b_step] for the rows row_i = first + i * step below `rows` (the
// others stay 0): N rows of a against one column b, all in shared memory, the N sums in registers.
template <int N>
__device__ __forceinline__ void rows_dot_column(float (&acc)[N], const float* a, int64_t a_stride, int first, int step,
                                                int rows, const float* b, int64_t b_step, int n) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
  for (int k = 0; k < n; ++k) {
    const float bk = b[k * b_step];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (first + i * step < rows) acc[i] += a[(first + i * step) * a_stride + k] * bk;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_to_image_kernel(
    TokenToImageShape s, const T* __restrict__ query_folded, const T* __restrict__ query_bias,
    const T* __restrict__ k, const T* __restrict__ v, int64_t kv_batch_stride, const T* __restrict__ v_weight,
    const T* __restrict__ v_bias, const T* __restrict__ out_weight, const T* __restrict__ out_bias,
    const T* __restrict__ residual, const T* __restrict__ norm_weight, const T* __restrict__ norm_bias, float scale,
    float eps, float* scratch, int* tickets, T* __restrict__ out) {
  MMFAST_DYNAMIC_SMEM(float, smem);
  __shared__ int is_last;
  const TokenToImageLayout l = token_to_image_layout(s);
  float* query_s = smem + l.query;  // the folded queries, then the chunk's P @ v rows
  float* kv_s = smem + l.kv;        // the chunk's keys, then its values
  float* scores = smem + l.scores;
  float* query_bias_s = smem + l.query_bias;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = kThreads / 32;
  // Counts as int (the glue bounds them): 64-bit divisions would be calls.
  const int64_t b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x, j0 = chunk * kChunk;
  const int queries = static_cast<int>(s.queries), c_in = static_cast<int>(s.channels);
  const int g_count = static_cast<int>(s.heads) * queries, d = static_cast<int>(s.head_dim);
  const int valid = static_cast<int>(min(static_cast<int64_t>(kChunk), s.keys - j0));
  float* stats = scratch + (b * chunks + chunk) * g_count * 2;  // (max, sum) per row
  float* partial_rows = scratch + s.batch * chunks * g_count * 2 + (b * chunks + chunk) * g_count * d;

  load_rows(query_s, l.query_stride, query_folded + b * g_count * c_in, g_count, g_count, c_in);
  for (int i = tid; i < g_count; i += kThreads) query_bias_s[i] = to_float(query_bias[b * g_count + i]);
  const int64_t kv_offset = b * kv_batch_stride + j0 * c_in;
  load_rows(kv_s, l.kv_stride, k + kv_offset, kChunk, valid, c_in);
  __syncthreads();

  // Scores: thread (row set, key) = (tid / 64, tid % 64) takes rows g = set, set + 4, ... of its key.
  {
    const int key = tid % kChunk, set = tid / kChunk;
    float acc[kScoreRowsPerThread];
    rows_dot_column(acc, query_s, l.query_stride, set, kThreads / kChunk, g_count, kv_s + key * l.kv_stride, 1, c_in);
#pragma unroll
    for (int i = 0; i < kScoreRowsPerThread; ++i) {
      const int g = set + i * (kThreads / kChunk);
      if (g < g_count) scores[g * l.scores_stride + key] = key < valid ? scale * (acc[i] + query_bias_s[g]) : -INFINITY;
    }
  }
  __syncthreads();

  // The chunk's softmax partials: one warp per row, exp(score - chunk max) in place; (max, sum) to the scratch.
  for (int g = warp; g < g_count; g += warps) {
    float* row = scores + g * l.scores_stride;
    float top = -INFINITY;
    for (int j = lane; j < kChunk; j += 32) top = fmaxf(top, row[j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, o));
    float sum = 0.f;
    for (int j = lane; j < kChunk; j += 32) {
      const float p = j < valid ? fast_exp(row[j] - top) : 0.f;
      row[j] = p;
      sum += p;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      stats[g * 2] = top;
      stats[g * 2 + 1] = sum;
    }
  }
  load_rows(kv_s, l.kv_stride, v + kv_offset, kChunk, valid, c_in);  // the keys were last read before the barrier
  __syncthreads();

  // P @ v: thread c keeps channel c of every row (the folded queries' buffer is free since the scores).
  for (int c = tid; c < c_in; c += kThreads) {
    float acc[kMaxRows];
    rows_dot_column(acc, scores, l.scores_stride, 0, 1, g_count, kv_s + c, l.kv_stride, kChunk);
#pragma unroll
    for (int g = 0; g < kMaxRows; ++g) {
      if (g < g_count) query_s[g * l.query_stride + c] = acc[g];
    }
  }
  __syncthreads();

  // v_weight on the partial rows: row g belongs to head g / queries; one warp per (g, i), lanes over channels.
  for (int o = warp; o < g_count * d; o += warps) {
    const int g = o / d, i = o % d, h = g / queries;
    float dot = 0.f;
    const T* w_row = v_weight + (h * d + i) * c_in;
    for (int c = lane; c < c_in; c += 32) dot += query_s[g * l.query_stride + c] * to_float(w_row[c]);
    dot = warp_sum(dot);
    if (lane == 0) partial_rows[o] = dot;
  }

  // The last block of batch entry b to finish merges (threadFenceReduction's ticket: each thread's scratch writes
  // are made visible device-wide before the block takes its ticket).
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(&tickets[b], 1) == static_cast<int>(chunks) - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Merge the chunks in order: o[l, h*d + i] = sum_c w_c partial_c[g, i] / sum_c w_c sum_c + v_bias, with
  // w_c = exp(max_c - max) and g = h * queries + l. volatile: other blocks wrote the scratch.
  const volatile float* all_stats = scratch + b * chunks * g_count * 2;
  const volatile float* all_rows = scratch + s.batch * chunks * g_count * 2 + b * chunks * g_count * d;
  const int hd = static_cast<int>(s.heads) * d, c_out = static_cast<int>(s.out_channels);
  float* merged = smem + l.merged;
  float* sums = smem + l.sums;
  for (int o = tid; o < g_count * d; o += kThreads) {
    const int g = o / d, i = o % d, h = g / queries, q = g % queries;
    float top = -INFINITY;
    for (int64_t c = 0; c < chunks; ++c) top = fmaxf(top, all_stats[(c * g_count + g) * 2]);
    float total = 0.f, value = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float w = fast_exp(all_stats[(c * g_count + g) * 2] - top);
      total += w * all_stats[(c * g_count + g) * 2 + 1];
      value += w * all_rows[c * g_count * d + o];
    }
    merged[q * hd + h * d + i] = value / total + to_float(v_bias[h * d + i]);
  }
  __syncthreads();

  // out_proj + out_bias + residual: one warp per (query, output channel), lanes over the merged heads.
  const T* res_b = residual + b * queries * c_out;
  for (int o = warp; o < queries * c_out; o += warps) {
    const int q = o / c_out, e = o % c_out;
    const T* w_row = out_weight + e * hd;
    float dot = 0.f;
    for (int k2 = lane; k2 < hd; k2 += 32) dot += merged[q * hd + k2] * to_float(w_row[k2]);
    dot = warp_sum(dot);
    if (lane == 0) sums[o] = dot + to_float(out_bias[e]) + to_float(res_b[o]);
  }
  __syncthreads();

  // LayerNorm: one warp per query row.
  for (int q = warp; q < queries; q += warps) {
    layer_norm_row<32>(sums + q * c_out, c_out, lane, norm_weight, norm_bias, eps, out + (b * queries + q) * c_out);
  }
}

inline unsigned blocks(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

}  // namespace

// ================================ launchers ====================================================

int64_t image_to_token_smem_bytes(const ImageToTokenShape& s) {
  return image_to_token_layout(s).total * static_cast<int64_t>(sizeof(float));
}

cudaError_t sam_image_to_token(DType dtype, const ImageToTokenShape& s, const void* x, int64_t x_batch_stride,
                               const void* key_folded, const void* key_bias, const void* value_folded,
                               const void* out_bias, const void* residual, int64_t residual_batch_stride,
                               const void* norm_weight, const void* norm_bias, float scale, float eps, void* out,
                               cudaStream_t stream) {
  if (s.batch <= 0 || s.rows <= 0) return cudaSuccess;
  if (s.keys <= 0 || s.keys > kImageToTokenMaxKeys || s.heads <= 0) return cudaErrorInvalidValue;
  const int64_t smem = image_to_token_smem_bytes(s);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = image_to_token_kernel<T>;
    if (const cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
    MMFAST_LAUNCH(kernel, dim3(blocks(s.rows, kImageRows), static_cast<unsigned>(s.batch)), kThreads, smem, stream,
                  s, static_cast<const T*>(x), x_batch_stride, static_cast<const T*>(key_folded),
                  static_cast<const T*>(key_bias), static_cast<const T*>(value_folded),
                  static_cast<const T*>(out_bias), static_cast<const T*>(residual), residual_batch_stride,
                  static_cast<const T*>(norm_weight), static_cast<const T*>(norm_bias), scale, eps,
                  static_cast<T*>(out));
    return cudaGetLastError();
  });
}

int64_t token_to_image_chunks(const TokenToImageShape& s) { return (s.keys + kChunk - 1) / kChunk; }

int64_t token_to_image_smem_bytes(const TokenToImageShape& s) {
  return token_to_image_layout(s).total * static_cast<int64_t>(sizeof(float));
}

int64_t token_to_image_scratch_floats(const TokenToImageShape& s) {
  return s.batch * token_to_image_chunks(s) * s.heads * s.queries * (2 + s.head_dim);
}

cudaError_t sam_token_to_image(DType dtype, const TokenToImageShape& s, const void* query_folded,
                               const void* query_bias, const void* k, const void* v, int64_t kv_batch_stride,
                               const void* v_weight, const void* v_bias, const void* out_weight, const void* out_bias,
                               const void* residual, const void* norm_weight, const void* norm_bias, float scale,
                               float eps, float* scratch, int* tickets, void* out, cudaStream_t stream) {
  if (s.batch <= 0 || s.queries <= 0) return cudaSuccess;
  if (s.keys <= 0 || s.heads <= 0 || s.head_dim <= 0 || s.heads * s.queries > kTokenToImageMaxRows) {
    return cudaErrorInvalidValue;
  }
  const int64_t smem = token_to_image_smem_bytes(s);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto kernel = token_to_image_kernel<T>;
    if (const cudaError_t e = allow_smem(kernel, smem); e != cudaSuccess) return e;
    MMFAST_LAUNCH(kernel, dim3(static_cast<unsigned>(token_to_image_chunks(s)), static_cast<unsigned>(s.batch)),
                  kThreads, smem, stream, s, static_cast<const T*>(query_folded), static_cast<const T*>(query_bias),
                  static_cast<const T*>(k), static_cast<const T*>(v), kv_batch_stride,
                  static_cast<const T*>(v_weight), static_cast<const T*>(v_bias), static_cast<const T*>(out_weight),
                  static_cast<const T*>(out_bias), static_cast<const T*>(residual),
                  static_cast<const T*>(norm_weight), static_cast<const T*>(norm_bias), scale, eps, scratch, tickets,
                  static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace mmfast::cuda
