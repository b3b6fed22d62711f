// Runs the CUDA cross-attention kernels (csrc/cuda/cross_attention.cu, through its real launchers) on CPU
// threads with tests/native/cuda_emulation.h. Driven by tests/test_cuda_emulation.py:
//
//   cross_attention_emulated IN OUT
//
// IN: int64 header[9] = {dtype (0 fp32, 1 fp16, 2 bf16), B, H, Lq, d, Lk, Lk2 (0: one segment),
// flags (1: k/v/k2/v2 hold batch 1 and are read with batch stride 0; 2: q is laid out [B, Lq, H, d];
// 4: fp16/bf16 on the CUDA-core kernels instead of the tensor-core ones),
// the SM count the forward's split-K rule assumes (1: never split)},
// float64 scale, then fp32 arrays in logical [B, H, L, d] order: q, k, v, (k2, v2,) grad_out.
// OUT: fp32 out, lse, grad_q, grad_k, grad_v (, grad_k2, grad_v2), each in logical order with batch B.
#include "cuda_emulation.h"

#include "../../csrc/cuda/cross_attention.cu"

#include <fstream>
#include <iostream>

namespace {

namespace kc = mmfast::cuda;

// A [B, H, L, d] operand stored with strides (sb, sh, sl, 1).
template <typename T>
struct Operand {
  int64_t batch, heads, len, dim, sb, sh, sl;
  std::vector<T> data;
  static Operand contiguous(int64_t b, int64_t h, int64_t l, int64_t d) {
    return {b, h, l, d, h * l * d, l * d, d, std::vector<T>(b * h * l * d)};
  }
  static Operand rows_major(int64_t b, int64_t h, int64_t l, int64_t d) {  // [B, L, H, d] memory
    return {b, h, l, d, l * h * d, d, h * d, std::vector<T>(b * h * l * d)};
  }
  T& at(int64_t b, int64_t h, int64_t l, int64_t c) { return data[b * sb + h * sh + l * sl + c]; }
  kc::HeadRows rows() const { return {data.data(), sb, sh, sl}; }
  kc::MutableHeadRows mutable_rows() { return {data.data(), sb, sh, sl}; }
};

std::vector<float> read_floats(std::istream& in, int64_t n) {
  std::vector<float> v(n);
  in.read(reinterpret_cast<char*>(v.data()), n * static_cast<int64_t>(sizeof(float)));
  if (!in) {
    std::cerr << "short input\n";
    std::exit(2);
  }
  return v;
}

template <typename T>
void fill(Operand<T>& x, const std::vector<float>& logical) {
  int64_t i = 0;
  for (int64_t b = 0; b < x.batch; ++b)
    for (int64_t h = 0; h < x.heads; ++h)
      for (int64_t l = 0; l < x.len; ++l)
        for (int64_t c = 0; c < x.dim; ++c) x.at(b, h, l, c) = kc::from_float<T>(logical[i++]);
}

template <typename T>
void write(std::ostream& out, Operand<T>& x) {
  for (int64_t b = 0; b < x.batch; ++b)
    for (int64_t h = 0; h < x.heads; ++h)
      for (int64_t l = 0; l < x.len; ++l)
        for (int64_t c = 0; c < x.dim; ++c) {
          const float f = kc::to_float(x.at(b, h, l, c));
          out.write(reinterpret_cast<const char*>(&f), sizeof f);
        }
}

template <typename T>
int run(const int64_t (&hdr)[9], double scale, std::istream& in, std::ostream& out) {
  const int64_t B = hdr[1], H = hdr[2], Lq = hdr[3], d = hdr[4], L[2] = {hdr[5], hdr[6]}, flags = hdr[7];
  const bool expand = flags & 1, q_rows_major = flags & 2, cuda_cores = flags & 4;
  const int segments = L[1] > 0 ? 2 : 1;
  const int64_t Bk = expand ? 1 : B;

  Operand<T> q = q_rows_major ? Operand<T>::rows_major(B, H, Lq, d) : Operand<T>::contiguous(B, H, Lq, d);
  fill(q, read_floats(in, B * H * Lq * d));
  std::vector<Operand<T>> k, v;
  for (int s = 0; s < segments; ++s) {
    k.push_back(Operand<T>::contiguous(Bk, H, L[s], d));
    v.push_back(Operand<T>::contiguous(Bk, H, L[s], d));
  }
  for (int s = 0; s < segments; ++s) {
    fill(k[s], read_floats(in, Bk * H * L[s] * d));
    fill(v[s], read_floats(in, Bk * H * L[s] * d));
  }
  Operand<T> grad_out = Operand<T>::contiguous(B, H, Lq, d);
  fill(grad_out, read_floats(in, B * H * Lq * d));

  kc::AttentionShape shape{B, H, Lq, d, segments, {L[0], L[1]}};
  kc::HeadRows k_rows[2]{}, v_rows[2]{};
  for (int s = 0; s < segments; ++s) {
    k_rows[s] = k[s].rows();
    v_rows[s] = v[s].rows();
    if (expand) k_rows[s].batch_stride = v_rows[s].batch_stride = 0;
  }
  Operand<T> o = Operand<T>::rows_major(B, H, Lq, d);  // the glue's [B, Lq, H, d] output layout
  std::vector<float> lse(B * H * Lq), delta(B * H * Lq);
  const int splits = kc::attention_forward_splits(shape, static_cast<int>(hdr[8]));
  std::vector<float> split_scratch(kc::attention_split_scratch_floats(shape, splits));
  std::cout << "forward key splits: " << splits << "\n";  // read by tests/test_cuda_emulation.py
  const auto dtype = std::is_same_v<T, float> ? kc::DType::kFloat32
                     : std::is_same_v<T, __half> ? kc::DType::kFloat16
                                                 : kc::DType::kBFloat16;
  const bool tensor_cores = kc::attention_tensor_cores(dtype) && !cuda_cores;
  std::cout << "tensor cores: " << tensor_cores << "\n";  // read by tests/test_cuda_emulation.py
  if (kc::cross_attention_forward(dtype, shape, q.rows(), k_rows, v_rows, static_cast<float>(scale), o.mutable_rows(),
                                  lse.data(), splits, split_scratch.data(), tensor_cores, nullptr) != cudaSuccess)
    return 3;

  Operand<T> grad_q = Operand<T>::contiguous(B, H, Lq, d);
  std::vector<Operand<T>> grad_k, grad_v;
  kc::MutableHeadRows gk_rows[2]{}, gv_rows[2]{};
  for (int s = 0; s < segments; ++s) {
    grad_k.push_back(Operand<T>::contiguous(B, H, L[s], d));
    grad_v.push_back(Operand<T>::contiguous(B, H, L[s], d));
  }
  for (int s = 0; s < segments; ++s) {
    gk_rows[s] = grad_k[s].mutable_rows();
    gv_rows[s] = grad_v[s].mutable_rows();
  }
  if (kc::cross_attention_backward(dtype, shape, q.rows(), k_rows, v_rows, o.rows(), grad_out.rows(), lse.data(),
                                   static_cast<float>(scale), delta.data(), grad_q.mutable_rows(), gk_rows, gv_rows,
                                   tensor_cores, nullptr) != cudaSuccess)
    return 4;

  write(out, o);
  out.write(reinterpret_cast<const char*>(lse.data()), lse.size() * sizeof(float));
  write(out, grad_q);
  for (int s = 0; s < segments; ++s) {
    write(out, grad_k[s]);
    write(out, grad_v[s]);
  }
  return out ? 0 : 5;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: cross_attention_emulated IN OUT\n";
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  std::ofstream out(argv[2], std::ios::binary);
  int64_t hdr[9];
  double scale;
  in.read(reinterpret_cast<char*>(hdr), sizeof hdr);
  in.read(reinterpret_cast<char*>(&scale), sizeof scale);
  if (!in) return 2;
  switch (hdr[0]) {
    case 0:
      return run<float>(hdr, scale, in, out);
    case 1:
      return run<__half>(hdr, scale, in, out);
    case 2:
      return run<__nv_bfloat16>(hdr, scale, in, out);
  }
  return 2;
}
