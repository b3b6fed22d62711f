// CPU kernels of the contrastive-loss block operators mmfast::clip_loss_block, clip_loss_block_backward
// and siglip_loss_block (schemas and block semantics in csrc/mmfast.cpp; the losses built from them in
// mmfast/ops/contrastive_loss.py).
//
// The Bi x Bt logits are never stored. The block is cut into kTile x kTile tiles; each tile is one GEMM
// into a per-thread scratch tile (512 x 512 fp32 = 1 MB, inside this CPU's 2 MB L2) followed by a
// vectorized epilogue over it:
//   CLIP forward   1 GEMM per tile: online row and column log-sum-exps, positive logits;
//   CLIP backward  3 GEMMs per tile: recompute the dots, G = dL/dx in place, dRows += s*G@cols,
//                  dCols += s*G^T@rows;
//   SigLIP         the same 3 GEMMs, the loss summed in the epilogue that writes G = sigmoid(x) - [pos].
// So CLIP costs 4 B x B x D GEMMs forward+backward (open_clip's autograd runs 6) and SigLIP 3.
//
// Threads: rows and columns are split into C chunks each and the C x C blocks of chunks are visited in C
// rounds; round r holds the blocks (p, (p + r) % C), which share no row chunk and no column chunk, so the
// thread that runs a block writes the statistics and gradients of its rows and columns directly: no
// locks, no per-thread copies of dCols, and every sum is taken in the same order on every run
// (deterministic for a given thread count). Each thread runs single-threaded GEMMs (MKL goes sequential
// inside a parallel region): measured here, one thread does 130-140 GFLOP/s on 512 x 512 x 768 tiles, a
// 2-thread MKL call on such a tile 30-70. The kernels reach 87-96% of that tile-GEMM rate (CPU time).
//
// dtypes: every GEMM accumulates in fp32 and writes fp32 (the logits are fp32 dot products whatever the
// input dtype). bf16 runs MKL's bf16 x bf16 -> fp32 GEMM straight on the features (AMX here: 400-575
// GFLOP/s on one thread against 120-140 for fp32), with the gradient tile G rounded to bf16 for the two
// gradient GEMMs, as autograd would hold it; torch's MKL exports that GEMM and we bind it weakly, so a
// torch without MKL falls back to the fp16 path. fp16 GEMMs fp32 copies of each tile's panels (fp16
// could not hold G: 1/(2B)-sized coefficients times small probabilities underflow it). fp64 runs in
// fp64 (gradcheck). Statistics and scale/bias gradients are fp32 (fp64); feature gradients accumulate
// in fp32 and are returned in the input dtype.
#include "mmfast/cpu_utils.h"  // first: selects at::vec's CPU_CAPABILITY

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <exception>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "mmfast/contrastive.h"
#include "mmfast/online_softmax.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// MKL's CBLAS bf16 GEMM (C = alpha * op(A) @ op(B) + beta * C, bf16 inputs, fp32 accumulation and
// output), exported by torch's libtorch_cpu when it is built with MKL. Weak: null without it.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const c10::BFloat16* a, int lda, const c10::BFloat16* b, int ldb,
                                       float beta, float* c, int ldc) __attribute__((weak));

namespace mmfast {
namespace {

using at::Tensor;
template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Tile edge (rows and columns). 512: the fp32 tile (1 MB) and the epilogue's passes stay in L2, and a
// single-thread GEMM of 512 x 512 x D runs near the 1-thread GEMM peak measured here.
constexpr int64_t kTile = 512;

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// ---- arguments -----------------------------------------------------------------------------------
void check_block(const Tensor& rows, const Tensor& cols) {
  check_feature_pair(rows, "rows", cols, "cols", /*allow_double=*/true);
}

// logit_scale / logit_bias: 0-dim or [1] floating tensors on the features' device.
double scalar_value(const Tensor& value, const char* name, const Tensor& rows) {
  check_scalar_tensor(value, name, rows);
  return value.item<double>();
}

double bias_value(const std::optional<Tensor>& logit_bias, const Tensor& rows) {
  return logit_bias.has_value() ? scalar_value(*logit_bias, "logit_bias", rows) : 0.0;
}

// The dtype of statistics and scalar gradients: fp64 for fp64 features, else fp32.
at::ScalarType stats_dtype(const Tensor& rows) {
  return rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_vector(const Tensor& x, const char* name, int64_t size, const Tensor& rows) {
  MMFAST_CHECK(x.dim() == 1 && x.size(0) == size, name, " must have shape [", size, "], got ", x.sizes());
  MMFAST_CHECK(x.scalar_type() == stats_dtype(rows), name, " must be ", stats_dtype(rows), ", got ", x.scalar_type());
  MMFAST_CHECK(x.device() == rows.device(), name, " is on ", x.device(), " but rows is on ", rows.device());
}

// The kernels are templated on the accumulation type only; fp16/bf16 panels are converted per tile.
template <typename F>
decltype(auto) dispatch_acc(const Tensor& rows, F&& f) {
  return rows.scalar_type() == at::kDouble ? f.template operator()<double>() : f.template operator()<float>();
}

// ---- schedule ------------------------------------------------------------------------------------
struct Range {
  int64_t begin, end;
};

Range chunk(int64_t n, int64_t parts, int64_t p) { return {n * p / parts, n * (p + 1) / parts}; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The block grid: rows and columns cut into `chunks` chunks each, the chunks x chunks blocks visited in
// `chunks` rounds (see the top), `workers` threads taking a round's blocks dynamically. Several chunks
// per thread keep both threads busy when one is slowed down (a shared machine): a round then waits for
// at most one small block, not for half of the work.
constexpr int64_t kChunksPerThread = 4;

struct Schedule {
  int64_t rows, cols, chunks, workers;
  int64_t blocks() const { return chunks * chunks; }  // block ids index per-block partial sums
};

Schedule make_schedule(int64_t rows, int64_t cols) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t most = std::min(ceil_div(rows, kTile), ceil_div(cols, kTile));
  const int64_t chunks = threads == 1 ? 1 : std::clamp<int64_t>(threads * kChunksPerThread, 1, most);
  return {rows, cols, chunks, std::min(threads, chunks)};
}

int worker_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Calls tile_fn(worker, block, r0, m, c0, n) for every tile [r0, r0+m) x [c0, c0+n) of the block grid.
// Within a round no two blocks share a row or a column chunk, and every row (column) chunk meets its
// blocks in round order whichever thread runs them: results do not depend on the thread timing.
template <typename F>
void for_each_tile(const Schedule& s, const F& tile_fn) {
  for (int64_t round = 0; round < s.chunks; ++round) {
    std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(s.workers)
    for (int64_t p = 0; p < s.chunks; ++p) {
      try {
        const Range rr = chunk(s.rows, s.chunks, p), cr = chunk(s.cols, s.chunks, (p + round) % s.chunks);
        for (int64_t r0 = rr.begin; r0 < rr.end; r0 += kTile) {
          for (int64_t c0 = cr.begin; c0 < cr.end; c0 += kTile) {
            tile_fn(worker_index(), round * s.chunks + p, r0, std::min(kTile, rr.end - r0), c0,
                    std::min(kTile, cr.end - c0));
          }
        }
      } catch (...) {
#pragma omp critical(mmfast_contrastive_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  }
}

// ---- GEMMs ---------------------------------------------------------------------------------------
enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };  // CBLAS constants

// bf16 features go straight to MKL's bf16 GEMM when torch's MKL has it (see the top).
bool bf16_gemm(const Tensor& rows) {
  return rows.scalar_type() == at::kBFloat16 && cblas_gemm_bf16bf16f32 != nullptr;
}

// Per-worker scratch: the tile; fp32 copies of the two panels when the features must be converted
// (fp16); the bf16 copy of G for the bf16 gradient GEMMs; one value per tile column.
struct Workspace {
  Tensor tile, row_panel, col_panel, g_bf16, col_values;
};

std::vector<Workspace> make_workspaces(const Schedule& schedule, const Tensor& rows, at::ScalarType acc) {
  const bool bf16 = bf16_gemm(rows), convert = rows.scalar_type() != acc && !bf16;
  const auto opts = rows.options().dtype(acc);
  std::vector<Workspace> ws(schedule.workers);
  for (auto& w : ws) {
    w.tile = at::empty({kTile * kTile}, opts);
    w.col_values = at::empty({kTile}, opts);
    if (convert) {
      w.row_panel = at::empty({kTile, rows.size(1)}, opts);
      w.col_panel = at::empty({kTile, rows.size(1)}, opts);
    }
    if (bf16) w.g_bf16 = at::empty({kTile * kTile}, rows.options());
  }
  return ws;
}

// Rows [start, start+len) of x as a GEMM operand: a view, or a converted copy in buf.
Tensor panel(const Tensor& x, int64_t start, int64_t len, const Tensor& buf) {
  Tensor part = x.narrow(0, start, len);
  if (!buf.defined()) return part;
  Tensor out = buf.narrow(0, 0, len);
  out.copy_(part);
  return out;
}

// [m, n] view of the first m * n elements of a flat buffer.
Tensor matrix(const Tensor& flat, int64_t m, int64_t n) { return flat.narrow(0, 0, m * n).view({m, n}); }

// dots [m, n] = a @ b.T into the worker's scratch tile (contiguous panels a [m, D], b [n, D]).
Tensor tile_dots(const Workspace& w, const Tensor& a, const Tensor& b) {
  Tensor out = matrix(w.tile, a.size(0), b.size(0));
  if (a.scalar_type() == at::kBFloat16) {
    const int m = a.size(0), n = b.size(0), d = a.size(1);
    cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, m, n, d, 1.f, a.const_data_ptr<c10::BFloat16>(), d,
                           b.const_data_ptr<c10::BFloat16>(), d, 0.f, out.data_ptr<float>(), n);
  } else {
    at::mm_out(out, a, b.t());
  }
  return out;
}

// Features as the kernels read them: contiguous (GEMM-friendly) and detached, because the OpenMP worker
// threads do not inherit the dispatcher's below-autograd state and their GEMMs would otherwise record
// autograd history for inputs that require grad.
Tensor kernel_input(const Tensor& x) { return x.contiguous().detach(); }

// Loads count (<= lanes) values; the other lanes hold fill.
template <typename acc_t>
Vec<acc_t> load(const acc_t* p, int64_t count, acc_t fill) {
  if (count == Vec<acc_t>::size()) return Vec<acc_t>::loadu(p);
  return Vec<acc_t>::set(Vec<acc_t>(fill), Vec<acc_t>::loadu(p, count), count);
}

template <typename acc_t>
acc_t lanes_sum(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
acc_t lanes_max(const Vec<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

// v with lane k replaced by value.
template <typename acc_t>
Vec<acc_t> with_lane(const Vec<acc_t>& v, int64_t k, acc_t value) {
  acc_t lanes[Vec<acc_t>::size()];
  v.store(lanes);
  lanes[k] = value;
  return Vec<acc_t>::loadu(lanes);
}

// ---- CLIP forward --------------------------------------------------------------------------------
// One tile of dots [m, n] (scaled in place): raises the running row states and the column (max, sum)
// to this tile and adds its exp-sums. tile_max: n (rounded up to lanes) values of scratch.
template <typename acc_t>
void clip_forward_tile(acc_t* x, int64_t m, int64_t n, acc_t scale, online_softmax::State<acc_t>* row_state,
                       acc_t* col_max, acc_t* col_sum, acc_t* tile_max) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const V neg_inf(-kInf<acc_t>), vscale(scale), zero(acc_t(0));
  for (int64_t j = 0; j < n; j += L) neg_inf.store(tile_max + j);
  // Pass 1: logits = scale * dots in place; row maxima (rebasing the row sums) and the tile's column maxima.
  for (int64_t i = 0; i < m; ++i) {
    acc_t* xi = x + i * n;
    V row_max = neg_inf;
    for (int64_t j = 0; j < n; j += L) {
      const int64_t count = std::min(L, n - j);
      const V v = V::loadu(xi + j, count) * vscale;
      v.store(xi + j, count);
      const V masked = V::set(neg_inf, v, count);
      row_max = at::vec::maximum(row_max, masked);
      at::vec::maximum(V::loadu(tile_max + j), masked).store(tile_max + j);
    }
    online_softmax::advance(row_state[i], lanes_max(row_max));
  }
  // Columns: raise the running maxima to the tile's and rebase their sums (an empty column rebases to 0,
  // as online_softmax::rebase_factor does); tile_max becomes the new running max.
  for (int64_t j = 0; j < n; j += L) {
    const int64_t count = std::min(L, n - j);
    const V old_max = load(col_max + j, count, -kInf<acc_t>);
    const V new_max = at::vec::maximum(old_max, V::loadu(tile_max + j));
    const V factor = V::blendv((old_max - new_max).exp(), zero, old_max == neg_inf);
    (V::loadu(col_sum + j, count) * factor).store(col_sum + j, count);
    new_max.store(col_max + j, count);
    new_max.store(tile_max + j);
  }
  // Pass 2: exp-sums against the running maxima (tail lanes are -inf: exp gives 0, or are not stored).
  for (int64_t i = 0; i < m; ++i) {
    const acc_t* xi = x + i * n;
    const V row_max(row_state[i].max);
    V row_sum = zero;
    for (int64_t j = 0; j < n; j += L) {
      const int64_t count = std::min(L, n - j);
      const V v = load(xi + j, count, -kInf<acc_t>);
      row_sum += (v - row_max).exp();
      (V::loadu(col_sum + j, count) + (v - V::loadu(tile_max + j)).exp()).store(col_sum + j, count);
    }
    row_state[i].sum += lanes_sum(row_sum);
  }
}

template <typename acc_t>
void clip_forward(const Tensor& rows, const Tensor& cols, acc_t scale, acc_t bias, int64_t label_offset,
                  Tensor& row_lse, Tensor& col_lse, Tensor& pos_logits) {
  const int64_t Bi = rows.size(0), Bt = cols.size(0);
  std::vector<online_softmax::State<acc_t>> row_state(Bi, online_softmax::empty_state<acc_t>());
  std::vector<acc_t> col_max(Bt, -kInf<acc_t>), col_sum(Bt, acc_t(0));
  acc_t* pos = pos_logits.data_ptr<acc_t>();
  const Schedule schedule = make_schedule(Bi, Bt);
  const auto ws = make_workspaces(schedule, rows, row_lse.scalar_type());
  for_each_tile(schedule, [&](int worker, int64_t, int64_t r0, int64_t m, int64_t c0, int64_t n) {
    const Workspace& w = ws[worker];
    Tensor dots = tile_dots(w, panel(rows, r0, m, w.row_panel), panel(cols, c0, n, w.col_panel));
    acc_t* x = dots.data_ptr<acc_t>();
    clip_forward_tile<acc_t>(x, m, n, scale, row_state.data() + r0, col_max.data() + c0, col_sum.data() + c0,
                             w.col_values.data_ptr<acc_t>());
    const int64_t diag = label_offset + r0 - c0;  // row i's positive is tile column i + diag
    const auto pr = contrastive::positive_rows(m, n, diag);
    for (int64_t i = pr.begin; i < pr.end; ++i) pos[r0 + i] = x[i * n + i + diag] + bias;
  });
  acc_t* rl = row_lse.data_ptr<acc_t>();
  acc_t* cl = col_lse.data_ptr<acc_t>();
  for (int64_t i = 0; i < Bi; ++i) rl[i] = online_softmax::log_sum_exp(row_state[i]) + bias;
  for (int64_t j = 0; j < Bt; ++j) {
    cl[j] = online_softmax::log_sum_exp(online_softmax::State<acc_t>{col_max[j], col_sum[j]}) + bias;
  }
}

std::tuple<Tensor, Tensor, Tensor> clip_loss_block_cpu(const Tensor& rows, const Tensor& cols,
                                                       const Tensor& logit_scale,
                                                       const std::optional<Tensor>& logit_bias, int64_t label_offset) {
  check_block(rows, cols);
  const double scale = scalar_value(logit_scale, "logit_scale", rows);
  const double bias = bias_value(logit_bias, rows);
  const Tensor r = kernel_input(rows), c = kernel_input(cols);
  const auto stats = r.options().dtype(stats_dtype(r));
  Tensor row_lse = at::empty({r.size(0)}, stats), col_lse = at::empty({c.size(0)}, stats);
  Tensor pos_logits = at::zeros({r.size(0)}, stats);
  dispatch_acc(r, [&]<typename acc_t>() {
    clip_forward<acc_t>(r, c, acc_t(scale), acc_t(bias), label_offset, row_lse, col_lse, pos_logits);
  });
  return {row_lse, col_lse, pos_logits};
}

// ---- shared by the gradient passes ----------------------------------------------------------------
// Feature-gradient accumulators in the accumulation dtype (the outputs themselves when that is the
// input dtype), and the per-block sums behind grad_logit_scale / grad_logit_bias (in double, summed in
// block order).
struct GradAccumulators {
  Tensor rows, cols;
  std::vector<double> scale, bias;

  GradAccumulators(const Tensor& r, const Tensor& c, at::ScalarType acc, int64_t blocks)
      : rows(at::zeros(r.sizes(), r.options().dtype(acc))),
        cols(at::zeros(c.sizes(), c.options().dtype(acc))),
        scale(blocks, 0.0),
        bias(blocks, 0.0) {}

  // dRows[r0:r0+m] += s * G @ b;  dCols[c0:c0+n] += s * G^T @ a   (G = the [m, n] tile of dL/dx).
  void add_tile(const Workspace& w, const Tensor& g, const Tensor& a, const Tensor& b, int64_t r0, int64_t c0,
                double s) {
    if (a.scalar_type() == at::kBFloat16) {
      const int m = a.size(0), n = b.size(0), d = a.size(1);
      Tensor g_bf16 = matrix(w.g_bf16, m, n);
      g_bf16.copy_(g);
      const c10::BFloat16* gp = g_bf16.const_data_ptr<c10::BFloat16>();
      cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kNoTrans, m, d, n, float(s), gp, n,
                             b.const_data_ptr<c10::BFloat16>(), d, 1.f, rows.data_ptr<float>() + r0 * d, d);
      cblas_gemm_bf16bf16f32(kRowMajor, kTrans, kNoTrans, n, d, m, float(s), gp, n,
                             a.const_data_ptr<c10::BFloat16>(), d, 1.f, cols.data_ptr<float>() + c0 * d, d);
      return;
    }
    rows.narrow(0, r0, a.size(0)).addmm_(g, b, 1.0, s);
    cols.narrow(0, c0, b.size(0)).addmm_(g.t(), a, 1.0, s);
  }

  // (grad_rows, grad_cols) in the features' dtype, (grad_logit_scale, grad_logit_bias) 0-dim.
  std::tuple<Tensor, Tensor, Tensor, Tensor> finish(const Tensor& like) const {
    double s = 0.0, b = 0.0;
    for (size_t k = 0; k < scale.size(); ++k) {
      s += scale[k];
      b += bias[k];
    }
    const auto stats = like.options().dtype(stats_dtype(like));
    return {rows.to(like.scalar_type()), cols.to(like.scalar_type()), at::full({}, s, stats), at::full({}, b, stats)};
  }
};

// ---- CLIP backward -------------------------------------------------------------------------------
// Overwrites the dots [m, n] with G = dL/dx; returns (sum G * dots, sum G) of the tile. The positive
// lane of a row (when grad_pos is given) takes contrastive::clip_positive_grad.
template <typename acc_t>
std::pair<double, double> clip_backward_tile(acc_t* x, int64_t m, int64_t n, acc_t scale, const acc_t* grad_row,
                                             const acc_t* row_shift, const acc_t* grad_col, const acc_t* col_shift,
                                             const acc_t* grad_pos, int64_t diag) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const V vscale(scale), zero(acc_t(0));
  const auto pr = contrastive::positive_rows(m, n, diag);
  double grad_scale = 0.0, grad_bias = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    acc_t* xi = x + i * n;
    const int64_t jp = (grad_pos != nullptr && i >= pr.begin && i < pr.end) ? i + diag : -1;  // positive column
    const acc_t gr = grad_row ? grad_row[i] : acc_t(0), rs = grad_row ? row_shift[i] : acc_t(0);
    const V coef_row(gr), shift_row(rs);
    V sum_g_dot = zero, sum_g = zero;
    for (int64_t j = 0; j < n; j += L) {
      const int64_t count = std::min(L, n - j);
      const V dot = V::loadu(xi + j, count);
      const V logit = dot * vscale;
      V g = zero;
      if (grad_row) g = coef_row * (logit - shift_row).exp();
      if (grad_col) {
        g = at::vec::fmadd(V::loadu(grad_col + j, count), (logit - V::loadu(col_shift + j, count)).exp(), g);
      }
      g = V::set(zero, g, count);  // tail lanes: exp of a padding logit may be inf
      if (jp >= j && jp < j + count) {
        const acc_t gc = grad_col ? grad_col[jp] : acc_t(0);
        g = with_lane(g, jp - j, contrastive::clip_positive_grad(xi[jp] * scale, gr, rs, gc,
                                                                 grad_col ? col_shift[jp] : acc_t(0), grad_pos[i]));
      }
      sum_g_dot = at::vec::fmadd(g, dot, sum_g_dot);
      sum_g += g;
      g.store(xi + j, count);
    }
    grad_scale += lanes_sum(sum_g_dot);
    grad_bias += lanes_sum(sum_g);
  }
  return {grad_scale, grad_bias};
}

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> clip_backward(const Tensor& rows, const Tensor& cols, acc_t scale,
                                                         acc_t bias, int64_t label_offset, const Tensor& row_lse,
                                                         const Tensor& col_lse, const Tensor& grad_row,
                                                         const Tensor& grad_col, const Tensor& grad_pos) {
  const int64_t Bi = rows.size(0), Bt = cols.size(0);
  // P = exp(scale * dot + bias - lse) = exp(scale * dot - shift) with shift = lse - bias.
  auto shifts = [bias](const Tensor& lse) {
    const Tensor l = lse.contiguous();
    std::vector<acc_t> shift(l.data_ptr<acc_t>(), l.data_ptr<acc_t>() + l.numel());
    for (acc_t& v : shift) v -= bias;
    return shift;
  };
  const std::vector<acc_t> row_shift = shifts(row_lse), col_shift = shifts(col_lse);
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  const acc_t *gr = ptr(grad_row), *gc = ptr(grad_col), *gp = ptr(grad_pos);
  const acc_t *rs = row_shift.data(), *cs = col_shift.data();
  const Schedule schedule = make_schedule(Bi, Bt);
  const auto ws = make_workspaces(schedule, rows, row_lse.scalar_type());
  GradAccumulators acc(rows, cols, row_lse.scalar_type(), schedule.blocks());
  for_each_tile(schedule, [&](int worker, int64_t block, int64_t r0, int64_t m, int64_t c0, int64_t n) {
    const Workspace& w = ws[worker];
    const Tensor a = panel(rows, r0, m, w.row_panel), b = panel(cols, c0, n, w.col_panel);
    Tensor g = tile_dots(w, a, b);
    const auto [ds, db] = clip_backward_tile<acc_t>(g.data_ptr<acc_t>(), m, n, scale, gr ? gr + r0 : nullptr, rs + r0,
                                                    gc ? gc + c0 : nullptr, cs + c0, gp ? gp + r0 : nullptr,
                                                    label_offset + r0 - c0);
    acc.scale[block] += ds;
    acc.bias[block] += db;
    acc.add_tile(w, g, a, b, r0, c0, scale);
  });
  return acc.finish(rows);
}

Tensor optional_grad(const std::optional<Tensor>& grad, const char* name, int64_t size, const Tensor& rows) {
  if (!grad.has_value()) return Tensor();
  check_vector(*grad, name, size, rows);
  return grad->contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> clip_loss_block_backward_cpu(
    const Tensor& rows, const Tensor& cols, const Tensor& logit_scale, const std::optional<Tensor>& logit_bias,
    int64_t label_offset, const Tensor& row_lse, const Tensor& col_lse, const std::optional<Tensor>& grad_row_lse,
    const std::optional<Tensor>& grad_col_lse, const std::optional<Tensor>& grad_pos_logits) {
  check_block(rows, cols);
  const double scale = scalar_value(logit_scale, "logit_scale", rows);
  const double bias = bias_value(logit_bias, rows);
  check_vector(row_lse, "row_lse", rows.size(0), rows);
  check_vector(col_lse, "col_lse", cols.size(0), rows);
  const Tensor gr = optional_grad(grad_row_lse, "grad_row_lse", rows.size(0), rows);
  const Tensor gc = optional_grad(grad_col_lse, "grad_col_lse", cols.size(0), rows);
  const Tensor gp = optional_grad(grad_pos_logits, "grad_pos_logits", rows.size(0), rows);
  const Tensor r = kernel_input(rows), c = kernel_input(cols);
  return dispatch_acc(r, [&]<typename acc_t>() {
    return clip_backward<acc_t>(r, c, acc_t(scale), acc_t(bias), label_offset, row_lse, col_lse, gr, gc, gp);
  });
}

// ---- SigLIP --------------------------------------------------------------------------------------
// A negative pair costs softplus(x) with gradient sigmoid(x), both from e = exp(-|x|); the positive lane
// of a row takes contrastive::siglip_positive. Returns the tile's loss sum and (when with_grad,
// overwriting the dots with G) sum G * dots and sum G.
template <typename acc_t>
std::tuple<double, double, double> siglip_tile(acc_t* x, int64_t m, int64_t n, acc_t scale, acc_t bias, bool positives,
                                               int64_t diag, bool with_grad) {
  using V = Vec<acc_t>;
  constexpr int64_t L = V::size();
  const V vscale(scale), vbias(bias), zero(acc_t(0)), one(acc_t(1));
  const auto pr = positives ? contrastive::positive_rows(m, n, diag) : contrastive::PositiveRows{0, 0};
  double loss = 0.0, grad_scale = 0.0, grad_bias = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    acc_t* xi = x + i * n;
    const int64_t jp = (i >= pr.begin && i < pr.end) ? i + diag : -1;  // positive column
    V sum_loss = zero, sum_g_dot = zero, sum_g = zero;
    for (int64_t j = 0; j < n; j += L) {
      const int64_t count = std::min(L, n - j);
      const V dot = V::loadu(xi + j, count);
      const V logit = at::vec::fmadd(dot, vscale, vbias);
      const V e = (zero - logit.abs()).exp();
      V l = V::set(zero, at::vec::maximum(logit, zero) + e.log1p(), count);
      V g = zero;
      if (with_grad) {
        const V r = one / (one + e);
        g = V::set(zero, V::blendv(e * r, r, logit >= zero), count);  // sigmoid(logit)
      }
      if (jp >= j && jp < j + count) {
        const auto p = contrastive::siglip_positive(xi[jp] * scale + bias);
        l = with_lane(l, jp - j, p.loss);
        if (with_grad) g = with_lane(g, jp - j, p.grad);
      }
      sum_loss += l;
      if (with_grad) {
        sum_g_dot = at::vec::fmadd(g, dot, sum_g_dot);
        sum_g += g;
        g.store(xi + j, count);
      }
    }
    loss += lanes_sum(sum_loss);
    if (with_grad) {
      grad_scale += lanes_sum(sum_g_dot);
      grad_bias += lanes_sum(sum_g);
    }
  }
  return {loss, grad_scale, grad_bias};
}

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip(const Tensor& rows, const Tensor& cols, acc_t scale,
                                                          acc_t bias, bool has_positives, bool compute_grad) {
  const int64_t Bi = rows.size(0), Bt = cols.size(0);
  const at::ScalarType acc_dtype = stats_dtype(rows);
  const Schedule schedule = make_schedule(Bi, Bt);
  const auto ws = make_workspaces(schedule, rows, acc_dtype);
  std::vector<double> loss(schedule.blocks(), 0.0);
  std::optional<GradAccumulators> acc;
  if (compute_grad) acc.emplace(rows, cols, acc_dtype, schedule.blocks());
  for_each_tile(schedule, [&](int worker, int64_t block, int64_t r0, int64_t m, int64_t c0, int64_t n) {
    const Workspace& w = ws[worker];
    const Tensor a = panel(rows, r0, m, w.row_panel), b = panel(cols, c0, n, w.col_panel);
    Tensor g = tile_dots(w, a, b);
    const auto [l, ds, db] = siglip_tile<acc_t>(g.data_ptr<acc_t>(), m, n, scale, bias, has_positives, r0 - c0,
                                                compute_grad);
    loss[block] += l;
    if (compute_grad) {
      acc->scale[block] += ds;
      acc->bias[block] += db;
      acc->add_tile(w, g, a, b, r0, c0, scale);
    }
  });
  double total = 0.0;
  for (const double l : loss) total += l;
  const Tensor loss_sum = at::full({}, total, rows.options().dtype(acc_dtype));
  if (!compute_grad) {
    // Four distinct empty tensors: outputs must not alias one another.
    auto none = [&](at::ScalarType dtype) { return at::empty({0}, rows.options().dtype(dtype)); };
    return {loss_sum, none(rows.scalar_type()), none(rows.scalar_type()), none(acc_dtype), none(acc_dtype)};
  }
  auto [gr, gc, gs, gb] = acc->finish(rows);
  return {loss_sum, gr, gc, gs, gb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip_loss_block_cpu(const Tensor& rows, const Tensor& cols,
                                                                        const Tensor& logit_scale,
                                                                        const std::optional<Tensor>& logit_bias,
                                                                        bool has_positives, bool compute_grad) {
  check_block(rows, cols);
  const double scale = scalar_value(logit_scale, "logit_scale", rows);
  const double bias = bias_value(logit_bias, rows);
  const Tensor r = kernel_input(rows), c = kernel_input(cols);
  return dispatch_acc(r, [&]<typename acc_t>() {
    return siglip<acc_t>(r, c, acc_t(scale), acc_t(bias), has_positives, compute_grad);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("clip_loss_block", &clip_loss_block_cpu);
  m.impl("clip_loss_block_backward", &clip_loss_block_backward_cpu);
  m.impl("siglip_loss_block", &siglip_loss_block_cpu);
}

}  // namespace mmfast
