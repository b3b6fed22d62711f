// mmfast._C: the operator schemas (TORCH_LIBRARY) and the Python module's build facts.
//
// Every kernel is a dispatcher operator in the `mmfast` namespace. Schemas live here, in one place;
// CPU kernels register in csrc/cpu/<op>.cpp and CUDA kernels in csrc/cuda/<op>_api.cpp with
// TORCH_LIBRARY_IMPL. Autograd of the forward operators is C++ too (csrc/autograd.cpp, the Autograd key);
// fake (meta) impls are registered from Python (mmfast/ops/<op>.py).
#include <torch/library.h>

#ifndef MMFAST_NO_PYTHON
#include <torch/extension.h>

#include <string>

#include "mmfast/operators.h"
#ifdef MMFAST_WITH_CUDA
#include "mmfast/sam_attention_cuda.h"
#endif
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef MMFAST_VERSION
#define MMFAST_VERSION "0.0.0"
#endif

TORCH_LIBRARY(mmfast, m) {
  // ---- similarity_softmax (mmfast/ops/similarity_softmax.py) ----
  // out = act(scale * normalize(image) @ normalize(text).T + bias); act in {"softmax","sigmoid","none"}.
  // inv_norm_* are 1 / max(||row||, 1e-12) in fp32 (ones when normalize=False), kept for backward.
  m.def("similarity_softmax(Tensor image, Tensor text, Tensor logit_scale, Tensor? logit_bias, "
        "bool normalize, str activation) -> (Tensor out, Tensor inv_norm_image, Tensor inv_norm_text)");
  m.def("similarity_softmax_backward(Tensor grad_out, Tensor out, Tensor image, Tensor text, "
        "Tensor inv_norm_image, Tensor inv_norm_text, Tensor logit_scale, bool normalize, str activation) "
        "-> (Tensor grad_image, Tensor grad_text, Tensor grad_logit_scale, Tensor grad_logit_bias)");
  // Top-k of the same row without the N x C matrix: values [N,k] (activation applied; softmax uses
  // the row log-sum-exp row_lse [N], fp32), indices [N,k] int64, both sorted by descending logit.
  m.def("similarity_topk(Tensor image, Tensor text, Tensor logit_scale, Tensor? logit_bias, "
        "bool normalize, str activation, int k) "
        "-> (Tensor values, Tensor indices, Tensor row_lse, Tensor inv_norm_image, Tensor inv_norm_text)");
  m.def("similarity_topk_backward(Tensor grad_values, Tensor values, Tensor indices, Tensor row_lse, "
        "Tensor image, Tensor text, Tensor inv_norm_image, Tensor inv_norm_text, Tensor logit_scale, "
        "Tensor? logit_bias, bool normalize, str activation) "
        "-> (Tensor grad_image, Tensor grad_text, Tensor grad_logit_scale, Tensor grad_logit_bias)");

  // ---- cross_attention (mmfast/ops/cross_attention.py; the Perceiver and SAM attention core) ----
  // out = softmax(scale * q @ cat(k, k2)^T) @ cat(v, v2): q [B,H,Lq,d], k/v [B,H,Lk,d], optional second
  // key/value segment k2/v2 [B,H,Lk2,d] attended after k/v (never concatenated in memory). out [B,H,Lq,d]
  // in q's dtype; lse [B,H,Lq] the rows' log-sum-exp in fp32 (fp64 for fp64 inputs), kept for backward.
  m.def("cross_attention(Tensor q, Tensor k, Tensor v, Tensor? k2, Tensor? v2, float scale) "
        "-> (Tensor out, Tensor lse)");
  // Fused backward (recomputes P from q, k, lse). grad_k2/grad_v2 are empty tensors when k2/v2 are None.
  m.def("cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? k2, Tensor? v2, "
        "Tensor out, Tensor lse, float scale) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_k2, Tensor grad_v2)");
  // ---- end cross_attention ----

  // ---- contrastive losses (mmfast/ops/contrastive_loss.py; CLIP InfoNCE and SigLIP) ----
  // BLOCK primitives: rows [Bi,D] x cols [Bt,D] (same dtype), logits x_ij = scale*rows_i.cols_j + bias,
  // never materialized. Positive pairs are (i, i + label_offset) where that column is in the block
  // (csrc/include/mmfast/contrastive.h). A single process is one block with offset 0; the local loss and
  // ring exchanges (Inf-CL, SigLIP neighbour exchange) call them once per block. Statistics and the
  // scale/bias gradients are fp32 (fp64 for fp64 inputs, which the CPU kernels accept for gradcheck).
  //
  // CLIP forward: row_lse [Bi] = logsumexp_j x_ij, col_lse [Bt] = logsumexp_i x_ij, pos_logits [Bi] =
  // x_{i,i+label_offset} (0 for rows whose positive is outside the block). The symmetric CE of a single
  // process is ((row_lse - pos).sum() + (col_lse - pos).sum()) / (2B). Blocks merge by logaddexp of lses.
  m.def("clip_loss_block(Tensor rows, Tensor cols, Tensor logit_scale, Tensor? logit_bias, int label_offset) "
        "-> (Tensor row_lse, Tensor col_lse, Tensor pos_logits)");
  // CLIP backward: recomputes the logits tile by tile. With P_row = exp(x - row_lse[:,None]) and P_col =
  // exp(x - col_lse[None,:]) (pass the GLOBAL lses to get the gradient of a loss over many blocks), dL/dx =
  // grad_row_lse[:,None]*P_row + grad_col_lse[None,:]*P_col + grad_pos_logits[i]*[j == i+label_offset];
  // a None grad drops its term. Returns dL/d(rows, cols) in the input dtype and dL/d(scale, bias) 0-dim.
  m.def("clip_loss_block_backward(Tensor rows, Tensor cols, Tensor logit_scale, Tensor? logit_bias, "
        "int label_offset, Tensor row_lse, Tensor col_lse, Tensor? grad_row_lse, Tensor? grad_col_lse, "
        "Tensor? grad_pos_logits) "
        "-> (Tensor grad_rows, Tensor grad_cols, Tensor grad_logit_scale, Tensor grad_logit_bias)");
  // SigLIP: loss_sum (0-dim) = sum_ij softplus(-y_ij * x_ij), y = +1 on the pairs (i, i) when has_positives
  // (the block holds this rank's own texts), else -1 everywhere (another rank's texts: negatives only).
  // The gradient dL/dx = sigmoid(x) - [positive] needs no row statistics, so the same pass returns the
  // gradients of loss_sum w.r.t. rows, cols (input dtype), scale and bias (0-dim); autograd only scales
  // them by the upstream gradient. compute_grad=False skips the two gradient GEMMs (grads come back empty).
  m.def("siglip_loss_block(Tensor rows, Tensor cols, Tensor logit_scale, Tensor? logit_bias, bool has_positives, "
        "bool compute_grad) "
        "-> (Tensor loss_sum, Tensor grad_rows, Tensor grad_cols, Tensor grad_logit_scale, Tensor grad_logit_bias)");
  // ---- end contrastive losses ----

  // ---- SAM's fused cross-attention blocks (mmfast/ops/sam_attention.py; forward only, no autograd) ----
  // LayerNorm(residual + attention + out_proj) of a mask-decoder cross-attention in one kernel, on the folded
  // operands of sam_attention's rearrangements (math in csrc/include/mmfast/sam_attention_cuda.h). Batch-1
  // x / residual (image -> token) and k / v (token -> image) are shared by every batch entry.
  // image -> token: x [B|1, L, C], key_folded [B, H*keys, C], key_bias [B, H*keys], value_folded [B, H*keys, Co],
  // out_bias [Co], residual [B|1, L, Co] -> [B, L, Co]; scores = scale * (x key_folded^T + key_bias).
  m.def("sam_image_to_token(Tensor x, Tensor key_folded, Tensor key_bias, Tensor value_folded, Tensor out_bias, "
        "Tensor residual, Tensor norm_weight, Tensor norm_bias, float scale, float eps, int keys_per_head) -> Tensor");
  // token -> image: query_folded [B, H*Lq, C] (row h*Lq + l), query_bias [B, H*Lq], scores = scale * (query_folded
  // k^T + query_bias),
  // k / v [B|1, L, C], v_weight [H*d, C], out_weight [Co, H*d], residual [B, Lq, Co] -> [B, Lq, Co].
  m.def("sam_token_to_image(Tensor query_folded, Tensor query_bias, Tensor k, Tensor v, Tensor v_weight, "
        "Tensor v_bias, Tensor out_weight, Tensor out_bias, Tensor residual, Tensor norm_weight, Tensor norm_bias, "
        "float scale, float eps, int heads) -> Tensor");
}

#ifndef MMFAST_NO_PYTHON
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast native kernels (operators are in torch.ops.mmfast)";
  m.attr("__version__") = MMFAST_VERSION;
#ifdef MMFAST_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = MMFAST_CUDA_ARCHS;
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = "";
#endif
#ifdef MMFAST_WITH_CUDA
  // Shared memory the fused SAM blocks need (mmfast/ops/sam_attention.py compares it with the device's opt-in
  // limit and runs the unfused arrangement where it does not fit).
  m.def("sam_image_to_token_smem_bytes", [](int64_t heads, int64_t keys, int64_t channels, int64_t out_channels) {
    return mmfast::cuda::image_to_token_smem_bytes({1, 1, channels, out_channels, heads, keys});
  });
  m.def("sam_token_to_image_smem_bytes", [](int64_t heads, int64_t queries, int64_t channels, int64_t head_dim,
                                            int64_t out_channels) {
    return mmfast::cuda::token_to_image_smem_bytes({1, queries, 1, channels, heads, head_dim, out_channels});
  });
#endif
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "Threads the CPU kernels' OpenMP regions use.");

  // Eager entry points of the native forward operators, for mmfast/ops outside torch.compile (which traces
  // the torch.ops calls): the same operators through their typed dispatcher handles, so the same dispatch
  // (autograd, CPU/CUDA kernels, Python dispatch modes), returning only what the Python function uses. A
  // torch.ops call parses its arguments against the schema and boxes them: mmfast::cross_attention on tiny
  // inputs, one thread, 2-core dev CPU, took 5.5 us that way and 3.9 us this way. __torch_function__ is not
  // consulted here; mmfast/ops takes torch.ops where an argument or mode has one. The GIL is released as
  // torch's own bindings do.
  namespace ops = mmfast::ops;
  using at::Tensor;
  using OptTensor = std::optional<Tensor>;
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("similarity_softmax", [](const Tensor& image, const Tensor& text, const Tensor& scale, const OptTensor& bias,
                                 bool normalize, const std::string& activation) {
    return std::get<0>(ops::SimilaritySoftmax::handle().call(image, text, scale, bias, normalize, activation));
  }, no_gil);
  m.def("similarity_topk", [](const Tensor& image, const Tensor& text, const Tensor& scale, const OptTensor& bias,
                              bool normalize, const std::string& activation, int64_t k) {
    auto out = ops::SimilarityTopk::handle().call(image, text, scale, bias, normalize, activation, k);
    return std::make_tuple(std::get<0>(out), std::get<1>(out));
  }, no_gil);
  m.def("cross_attention", [](const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& k2,
                              const OptTensor& v2, double scale) {
    return std::get<0>(ops::CrossAttention::handle().call(q, k, v, k2, v2, scale));
  }, no_gil);
  m.def("clip_loss_block", [](const Tensor& rows, const Tensor& cols, const Tensor& scale, const OptTensor& bias,
                              int64_t label_offset) {
    return ops::ClipLossBlock::handle().call(rows, cols, scale, bias, label_offset);
  }, no_gil);
  m.def("siglip_loss_block", [](const Tensor& rows, const Tensor& cols, const Tensor& scale, const OptTensor& bias,
                                bool has_positives, bool compute_grad) {
    return std::get<0>(ops::SiglipLossBlock::handle().call(rows, cols, scale, bias, has_positives, compute_grad));
  }, no_gil);
}
#endif
