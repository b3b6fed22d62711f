// Types shared by the CUDA launchers' headers (csrc/include/mmfast/*_cuda.h) and the operator glue:
// plain C++, no torch and no CUDA device headers, so both nvcc and the host compiler include it.
#pragma once

namespace mmfast::cuda {

// The element types the CUDA kernels are instantiated for (the glue maps at::ScalarType to it with
// kernel_dtype in mmfast/cuda_glue.h; the .cu files map it to a C++ type with dispatch_dtype).
enum class DType { kFloat32, kFloat16, kBFloat16 };

}  // namespace mmfast::cuda
