// Runs tests/native/mma_tile_gemm.cu (mmfast/mma.cuh's tensor-core wrappers) on CPU threads with
// tests/native/cuda_emulation.h. Run by tests/test_mma_emulation.py in three modes:
//   gemm bf16|fp16 M N K     the tile GEMM on deterministic inputs; prints its errors against a float64 GEMM of
//                            the same rounded inputs (see run_gemm)
//   mma bf16|fp16 IN OUT     the mma probe: IN = int32 warps, then per thread a[4] (u32), b[2] (u32), c[4] (f32);
//                            OUT = per thread d[4] (f32)
//   ldmatrix IN OUT [SHIFT]  the ldmatrix probe: IN = int32 warps, int32 rows, rows x 8 u16, per thread the
//                            int32 row it addresses; OUT = per thread 15 u32 (see ldmatrix_probe_kernel);
//                            SHIFT (elements) misaligns lane 3's row address
#include "cuda_emulation.h"

#include "mma_tile_gemm.cu"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

namespace mt = mmfast::cuda::mma_test;

void launched(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "launcher returned %d\n", static_cast<int>(e));
    std::exit(2);
  }
}

std::vector<char> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path);
    std::exit(2);
  }
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_file(const char* path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path);
    std::exit(2);
  }
}

// Reads consecutive little-endian values out of an input file.
struct Reader {
  const std::vector<char>& bytes;
  size_t at = 0;
  template <typename X>
  std::vector<X> take(size_t n) {
    if (at + n * sizeof(X) > bytes.size()) {
      std::fprintf(stderr, "input file too short\n");
      std::exit(2);
    }
    std::vector<X> v(n);
    std::memcpy(v.data(), bytes.data() + at, n * sizeof(X));
    at += n * sizeof(X);
    return v;
  }
};

// A deterministic stream in [-1, 1) (64-bit LCG, top bits).
struct Lcg {
  uint64_t state;
  float next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<float>(static_cast<double>(state >> 40) / static_cast<double>(1ull << 23) - 1.0);
  }
};

template <typename T>
float as_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

// C = A @ B through the tile kernel. A and B are followed by 64 NaNs and C by 64 guard floats (all C starts as
// NaN): a read past the inputs or a missing write shows as NaN, a write past C as a changed guard. Prints
//   bound_ratio: max over C of |C - ref| / (K * 2^-24 * sum_k |a_ik b_kj|), the recursive fp32 summation's
//                error bound (the products are exact): <= 1 unless the emulated mma sums wrongly;
//   rel_fro:     ||C - ref||_F / ||ref||_F;  bad: the count of NaN or wrong guard values.
template <typename T>
int run_gemm(int M, int N, int K) {
  constexpr int kGuard = 64;
  Lcg rng{static_cast<uint64_t>(M) * 1000003u + static_cast<uint64_t>(N) * 1009u + K};
  const T nan = mmfast::cuda::from_float<T>(std::numeric_limits<float>::quiet_NaN());
  std::vector<T> a(static_cast<size_t>(M) * K + kGuard, nan), b(static_cast<size_t>(K) * N + kGuard, nan);
  for (size_t i = 0; i < static_cast<size_t>(M) * K; ++i) a[i] = mmfast::cuda::from_float<T>(rng.next());
  for (size_t i = 0; i < static_cast<size_t>(K) * N; ++i) b[i] = mmfast::cuda::from_float<T>(rng.next());
  std::vector<float> c(static_cast<size_t>(M) * N + kGuard, std::numeric_limits<float>::quiet_NaN());
  for (int i = 0; i < kGuard; ++i) c[static_cast<size_t>(M) * N + i] = 1234.5f + i;
  launched(mt::tile_gemm<T>(a.data(), b.data(), c.data(), M, N, K, nullptr));

  double worst_ratio = 0, err2 = 0, ref2 = 0;
  long bad = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double ref = 0, abs_sum = 0;
      for (int k = 0; k < K; ++k) {
        const double p = static_cast<double>(as_float(a[static_cast<size_t>(i) * K + k])) *
                         as_float(b[static_cast<size_t>(k) * N + j]);
        ref += p;
        abs_sum += std::fabs(p);
      }
      const double got = c[static_cast<size_t>(i) * N + j], err = std::fabs(got - ref);
      if (!std::isfinite(got)) {
        ++bad;
        continue;
      }
      const double bound = K * std::ldexp(1.0, -24) * abs_sum;
      const double ratio = err == 0 ? 0 : bound == 0 ? INFINITY : err / bound;
      worst_ratio = std::max(worst_ratio, ratio);
      err2 += err * err;
      ref2 += ref * ref;
    }
  for (int i = 0; i < kGuard; ++i) bad += c[static_cast<size_t>(M) * N + i] != 1234.5f + i;
  std::printf("bound_ratio %.6e rel_fro %.6e bad %ld\n", worst_ratio, ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0,
              bad);
  return 0;
}

template <typename T>
int run_mma_probe(const char* in, const char* out) {
  const std::vector<char> bytes = read_file(in);
  Reader r{bytes};
  const int warps = r.take<int32_t>(1)[0];
  const size_t threads = 32 * static_cast<size_t>(warps);
  std::vector<uint32_t> a(4 * threads), b(2 * threads);
  std::vector<float> c(4 * threads);
  for (size_t t = 0; t < threads; ++t) {
    const auto at = r.take<uint32_t>(6);
    std::copy(at.begin(), at.begin() + 4, a.begin() + 4 * t);
    std::copy(at.begin() + 4, at.end(), b.begin() + 2 * t);
    const auto ct = r.take<float>(4);
    std::copy(ct.begin(), ct.end(), c.begin() + 4 * t);
  }
  std::vector<float> d(4 * threads, std::numeric_limits<float>::quiet_NaN());
  launched(mt::mma_probe<T>(a.data(), b.data(), c.data(), d.data(), warps, nullptr));
  write_file(out, d.data(), d.size() * sizeof(float));
  return 0;
}

int run_ldmatrix_probe(const char* in, const char* out, int shift) {
  const std::vector<char> bytes = read_file(in);
  Reader r{bytes};
  const auto head = r.take<int32_t>(2);
  const int warps = head[0], n_rows = head[1];
  const std::vector<uint16_t> rows = r.take<uint16_t>(8 * static_cast<size_t>(n_rows));
  const std::vector<int32_t> row_of_thread = r.take<int32_t>(32 * static_cast<size_t>(warps));
  for (int32_t row : row_of_thread)
    if (row < 0 || row >= n_rows) {
      std::fprintf(stderr, "row %d out of range\n", row);
      return 2;
    }
  std::vector<uint32_t> regs(mt::kLdmatrixProbeWords * 32 * static_cast<size_t>(warps), 0xdeadbeefu);
  launched(mt::ldmatrix_probe(rows.data(), n_rows, row_of_thread.data(), shift, regs.data(), warps, nullptr));
  write_file(out, regs.data(), regs.size() * sizeof(uint32_t));
  return 0;
}

int usage() {
  std::fprintf(stderr, "usage: mma_emulated gemm bf16|fp16 M N K | mma bf16|fp16 IN OUT | ldmatrix IN OUT [SHIFT]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string mode = argv[1];
  if (mode == "ldmatrix" && (argc == 4 || argc == 5))
    return run_ldmatrix_probe(argv[2], argv[3], argc == 5 ? std::atoi(argv[4]) : 0);
  if (argc < 3) return usage();
  const std::string dtype = argv[2];
  if (dtype != "bf16" && dtype != "fp16") return usage();
  const bool bf16 = dtype == "bf16";
  if (mode == "gemm" && argc == 6) {
    const int M = std::atoi(argv[3]), N = std::atoi(argv[4]), K = std::atoi(argv[5]);
    if (M < 0 || N < 0 || K < 0) return usage();
    return bf16 ? run_gemm<__nv_bfloat16>(M, N, K) : run_gemm<__half>(M, N, K);
  }
  if (mode == "mma" && argc == 5)
    return bf16 ? run_mma_probe<__nv_bfloat16>(argv[3], argv[4]) : run_mma_probe<__half>(argv[3], argv[4]);
  return usage();
}
