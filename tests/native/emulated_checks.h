// What the emulated-kernel drivers (tests/native/*_emulated.cpp) share: device-like buffers, the launcher
// error check, dtype names, and the pass/fail bookkeeping. Include after cuda_emulation.h.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "mmfast/cuda_types.h"

namespace mmfast_emulation::checks {

// ---- device buffers -----------------------------------------------------------------------------------
// 64-byte aligned, as the launchers need 16-byte aligned bases (torch's allocations are).
template <typename X>
struct Aligned {
  using value_type = X;
  Aligned() = default;
  template <typename Y>
  Aligned(const Aligned<Y>&) {}
  X* allocate(size_t n) { return static_cast<X*>(::operator new(n * sizeof(X), std::align_val_t{64})); }
  void deallocate(X* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  bool operator==(const Aligned&) const = default;
};

template <typename X>
using Vec = std::vector<X, Aligned<X>>;

// Filled with 0xff bytes, a NaN in every float type: an entry a kernel should write but does not fails.
template <typename X>
Vec<X> poisoned(int64_t n) {
  Vec<X> v(n);
  if (n > 0) std::memset(static_cast<void*>(v.data()), 0xff, n * sizeof(X));
  return v;
}

template <typename X>
X* data_or_null(Vec<X>& v) {
  return v.empty() ? nullptr : v.data();
}

inline void launched(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "launcher returned %d\n", static_cast<int>(e));
    std::exit(2);
  }
}

template <typename T>
constexpr mmfast::cuda::DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return mmfast::cuda::DType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return mmfast::cuda::DType::kFloat16;
  return mmfast::cuda::DType::kBFloat16;
}

template <typename T>
const char* name_of() {
  if constexpr (std::is_same_v<T, float>) return "fp32";
  if constexpr (std::is_same_v<T, __half>) return "fp16";
  return "bf16";
}

// ---- checks ---------------------------------------------------------------------------------------------
inline int checks = 0, failures = 0;

inline void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

inline void expect_error(double err, double tol, const std::string& what) {  // !(<=): a NaN error fails
  char numbers[64];
  std::snprintf(numbers, sizeof numbers, ": error %.3g > tolerance %.3g", err, tol);
  expect(err <= tol, what + numbers);
}

}  // namespace mmfast_emulation::checks
