// Host-side helpers shared by the CUDA operators' glue (csrc/cuda/*_api.cpp, compiled by the host
// compiler against torch): dtype mapping for the launchers, operand alignment and the current stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "mmfast/checks.h"
#include "mmfast/cuda_types.h"

namespace mmfast::cuda_glue {

inline cuda::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "mmfast: CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The row launchers' contract: contiguous, 16-byte aligned base. A contiguous view at an odd offset
// (e.g. a row slice of a matrix) is copied once; everything mmfast allocates is aligned already.
inline at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// logit_scale / logit_bias: a 0-dim / [1] scalar on the features' device as a 0-dim fp32 tensor (a no-op
// for what the Python layer passes; a float64 scalar is converted on the device, without a sync).
inline at::Tensor scalar_arg(const at::Tensor& value, const char* name, const at::Tensor& like) {
  check_scalar_tensor(value, name, like);
  return value.reshape({}).to(at::kFloat).contiguous();
}

// The tensor-core kernels (cross-attention, the fused contrastive-loss tiles, similarity_softmax's dot products)
// are opt-in with MMFAST_CUDA_TENSOR_CORES=1 until a GPU run has validated them (benchmarks/gpu_check.sh sets it;
// the emulator tests them in CI); otherwise the kernels the H200 run of 2026-12-04 validated serve every dtype.
// Read once per process.
inline bool tensor_cores_opted_in() {
  static const bool opted_in = [] {
    const char* v = std::getenv("MMFAST_CUDA_TENSOR_CORES");
    return v != nullptr && std::string_view(v) == "1";
  }();
  return opted_in;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace mmfast::cuda_glue
