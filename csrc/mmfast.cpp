// mmfast._C: the operator schemas (TORCH_LIBRARY) and the Python module's build facts.
//
// Every kernel is a dispatcher operator in the `mmfast` namespace. Schemas live here, in one place;
// CPU kernels register in csrc/cpu/<op>.cpp and CUDA kernels in csrc/cuda/<op>_api.cpp with
// TORCH_LIBRARY_IMPL. Fake (meta) impls and autograd are registered from Python (mmfast/ops/<op>.py).
#include <torch/library.h>

#ifndef MMFAST_NO_PYTHON
#include <torch/extension.h>
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
  m.def("openmp_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "Threads the CPU kernels' OpenMP regions use.");
}
#endif
