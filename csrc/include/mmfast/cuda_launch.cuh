// Host-side launch helpers shared by mmfast's .cu files (compiled by nvcc only): the DType -> C++
// type dispatch and the opt-in for more than 48 KB of dynamic shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "mmfast/cuda_types.h"

// Every kernel launch goes through this macro, so that tests/native/cuda_emulation.h can run the
// kernels on CPU threads (it defines MMFAST_LAUNCH first): the kernels' index math, barriers and
// shuffles are then tested on machines without a GPU.
#ifndef MMFAST_LAUNCH
#define MMFAST_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#endif

namespace mmfast::cuda {

// f(T{}) with T = float, __half or __nv_bfloat16 per dtype; returns f's cudaError_t.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// An attribute of the current device, cached per device (the query is a driver call); `fallback` when
// it cannot be read.
template <cudaDeviceAttr Attr>
int cached_device_attribute(int fallback) {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return fallback;
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, Attr, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return fallback;
    }
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Whether dtype's products can run on the current device's tensor cores (mma.sync: fp16/bf16 on sm_80+; fp32
// stays exact on the CUDA cores or cuBLAS, no TF32).
inline bool tensor_core_dtype(DType dtype) {
  return dtype != DType::kFloat32 && cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(0) >= 8;
}

// launch(T{}) with T = __half or __nv_bfloat16 per dtype, then the launch's error; fp32 has no tensor-core kernel:
// cudaErrorInvalidValue.
template <typename Launch>
cudaError_t dispatch_tensor_core_dtype(DType dtype, Launch&& launch) {
  return dispatch_dtype(dtype, [&](auto tag) {
    if constexpr (std::is_same_v<decltype(tag), float>) {
      return cudaErrorInvalidValue;
    } else {
      launch(tag);
      return cudaGetLastError();
    }
  });
}

// Opt-in shared-memory limit per block of the current device.
inline int64_t max_dynamic_smem() {
  return cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
}

// Dynamic shared memory above the default 48 KB needs the kernel's opt-in first.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace mmfast::cuda
