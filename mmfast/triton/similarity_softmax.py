"""Triton kernels of similarity_softmax: act(scale * normalize(image) @ normalize(text).T + bias).

Operators defined here (schemas mirror csrc/mmfast.cpp with "_triton" appended; fake impls and
autograd are registered by mmfast/ops/similarity_softmax.py right after this module is imported):
  mmfast::similarity_softmax_triton            -> (out, inv_norm_image, inv_norm_text)
  mmfast::similarity_softmax_backward_triton   -> (grad_image, grad_text, grad_logit_scale, grad_logit_bias)
  mmfast::similarity_topk_triton               -> (values, indices, row_lse, inv_norm_image, inv_norm_text)
  mmfast::similarity_topk_backward_triton      -> the same four gradients

Notation: image [N, D], text [C, D], x_i = image_i * inv_i, y_c = text_c * inv_c (inv = 1/max(||row||, 1e-12),
fp32, ones without normalize), s_ic = scale * inv_i * inv_c * (image_i . text_c) + bias. Normalized copies
of the features are never written to memory: the inverse norms are applied to the GEMM accumulator
(forward) or to the operand tile in registers (backward).

Forward (softmax). Two ways to avoid the N x C logits in fp32:
  (a) per block of rows, loop over all class tiles twice (online max/sum-exp, then recompute and write);
  (b) one GEMM over a 2-D grid of (row, class) tiles that writes exp(s - m_tile) in the output dtype plus
      per-(row, tile) max and sum-exp; a row kernel combines those into the row's max M and sum L, and a
      light elementwise pass rescales by exp(m_tile - M) / L.
  (a) costs 2 x 2NCD FLOPs; (b) costs 2NCD FLOPs + 2NC output-dtype bytes more traffic. At nominal H100
  rates (~600 TFLOP/s bf16 in Triton, ~3 TB/s) the recompute in (a) is cheaper only while D < ~400; CLIP's
  D is 512-1024, and fp32 (IEEE dots on CUDA cores, ~50 TFLOP/s) makes (a) 10x worse. (b) also keeps a full
  2-D grid (N/BM * C/BN programs) where (a) has N/BM programs only (64 at N=4096: half an H100 idle). So (b).
  The stored exp(s - m_tile) is in (0, 1] and the rescale factor is <= 1, so fp16/bf16 storage adds at
  most two roundings (no overflow, and the logits themselves are never rounded to the output dtype).

Backward. ds = dL/ds: p*(g - rowsum(g*p)) (softmax), g*p*(1-p) (sigmoid), g (none). Then
  G = ds @ y [N, D],  H = ds^T @ x [C, D],  grad_image = inv * (scale*G - [norm>eps] x (x . scale*G)) ...
Dense modes: _ds_kernel writes ds once in the features' dtype (one more N x C, as grad_out) and cuBLAS runs
the two GEMMs with fp32 outputs (_dense_gradients; the CUDA backend's scheme). Until 2026-12-05 the two Triton
GEMM kernels rebuilt ds in their prologues from grad_out and out once per block of output features, which the
H200 measured at 0.40x eager (fp16 N=4096, C=21843); the top-k backward still does, since it has no N x C
matrices to read (its ds tiles come from recomputed logits). G and H are fp32 and a row kernel applies the
normalization backward and reduces grad_scale = sum_i x_i.G_i.

Top-k. One program per block of rows sweeps all class tiles once: online log-sum-exp plus a running
top-k kept as sorted 64-bit keys (fp32 logit in an order-preserving integer form, high 32 bits; column,
low 32 bits, so ties go to the lower index). Merging a tile: its top K_PAD by a bitonic top-k (ascending);
max(best, top) is then a bitonic sequence holding the K_PAD largest of both, and one bitonic merge
re-sorts it. k is limited to MAX_TOPK (128).
Its backward recomputes the logit tiles in the same two GEMM kernels, so there is no N x C buffer: softmax
needs them (ds = p*(g_scattered - sum_k g_k v_k) is dense), sigmoid for precision (its ds is non-zero only
at the top-k, but sigma'(s) from a saved value rounded to 1.0 is 0); "none" needs no logits.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from mmfast.triton._utils import (INTERPRET, MIN_DOT_BLOCK, apply_block_overrides, check_feature_pair, device_guard,
                                  dot_precision, mm_fp32, optional_scalar, pow2_block, store_rounded)

ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}
ACT_SOFTMAX: tl.constexpr = tl.constexpr(0)
ACT_SIGMOID: tl.constexpr = tl.constexpr(1)
ACT_NONE: tl.constexpr = tl.constexpr(2)
NORM_EPS: tl.constexpr = tl.constexpr(1e-12)  # F.normalize's eps
KEY_PAD: tl.constexpr = tl.constexpr(-(2**63))  # below every real top-k key
# Largest k of the top-k mode: the running top-k is a [BLOCK_M, K_PAD] register tile of int64 keys and
# each class tile is at least K_PAD wide; 128 keeps both within registers at BLOCK_M = 32.
MAX_TOPK = 128


# ---- shared device functions ---------------------------------------------------------------------
@triton.jit
def _safe_max(m):
    """A running max used as an exp() offset: -inf (nothing seen yet) becomes 0 so exp(-inf - 0) = 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _logits_tile(img_ptr, txt_ptr, offs_m, offs_c, row_ok, col_ok, inv_i, inv_c, scale, bias, D,
                 s_im, s_id, s_tc, s_td,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """s[BLOCK_M, BLOCK_C] in fp32. Per K step: (BLOCK_M + BLOCK_C) * BLOCK_D loads for
    2 * BLOCK_M * BLOCK_C * BLOCK_D FLOPs; the norms and scale cost BLOCK_M * BLOCK_C multiplies, once."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    rows = offs_m.to(tl.int64)
    cols = offs_c.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        a = tl.load(img_ptr + rows[:, None] * s_im + d[None, :] * s_id, mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        b = tl.load(txt_ptr + cols[:, None] * s_tc + d[None, :] * s_td, mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if img_ptr.dtype.element_ty == tl.float32:
        # fp32 features: scale in fp64 and round once (measured in a float64 emulation at scale 100,
        # C=21843: probabilities' relative error 2.6e-6 -> 2.0e-6, the fp32 reference has 2.4e-6);
        # ~4 fp64 ops per element next to the tile's D fp32 FMAs.
        s = (acc.to(tl.float64) * (scale.to(tl.float64) * inv_i.to(tl.float64))[:, None]
             * inv_c.to(tl.float64)[None, :]).to(tl.float32)
    else:
        s = acc * (scale * inv_i)[:, None] * inv_c[None, :]
    if HAS_BIAS:
        s = s + bias
    return s


@triton.jit
def _ds_row_stats(offs_m, row_ok, delta_ptr, lse_ptr, ACT: tl.constexpr, FROM_TOPK: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """The per-row statistics a ds tile needs: delta = rowsum(g * p) (softmax) and, for top-k softmax,
    the row log-sum-exp that rebuilds p; zeros where the activation needs none."""
    if ACT == ACT_SOFTMAX:
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
    else:
        delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if FROM_TOPK and ACT == ACT_SOFTMAX:
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    else:
        lse = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return delta, lse


@triton.jit
def _ds_tile(offs_m, offs_c, row_ok, col_ok, delta, lse,
             g_ptr, p_ptr, idx_ptr, s_gm, s_gc, s_pm, s_pc, K,
             img_ptr, txt_ptr, inv_i, inv_c, scale, bias, D, s_im, s_id, s_tc, s_td,
             ACT: tl.constexpr, FROM_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """ds[BLOCK_M, BLOCK_C] = dL/ds in fp32, zero outside the matrix (it feeds tl.dot).

    Dense (FROM_TOPK False): g, p are tiles of grad_out and out; delta_i = sum_c g_ic p_ic.
    Top-k: g is the k saved gradients per row scattered into the tile (k compares per element) and the
    logits are recomputed: softmax p = exp(s - row_lse), delta_i = sum_k g_ik v_ik; sigmoid's derivative
    sigma(s) sigma(-s) = e / (1 + e)^2 with e = exp(-|s|), exact where the saved value rounded to 1
    (p (1 - p) from a saved fp32 p = 1 would give 0 for any logit above ~17)."""
    rows = offs_m.to(tl.int64)
    if FROM_TOPK:
        g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        hit = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int1)
        for j in range(K):
            cls = tl.load(idx_ptr + rows * K + j, mask=row_ok, other=-1)
            gj = tl.load(g_ptr + rows * s_gm + j * s_gc, mask=row_ok, other=0.0).to(tl.float32)
            is_j = cls[:, None] == offs_c[None, :]
            g += tl.where(is_j, gj[:, None], 0.0)
            hit = hit | is_j
        if ACT != ACT_NONE:
            s = _logits_tile(img_ptr, txt_ptr, offs_m, offs_c, row_ok, col_ok, inv_i, inv_c, scale, bias, D,
                             s_im, s_id, s_tc, s_td, HAS_BIAS, BLOCK_M, BLOCK_C, BLOCK_D, PRECISION)
        if ACT == ACT_SOFTMAX:
            p = tl.exp(s - lse[:, None])
        elif ACT == ACT_SIGMOID:
            e = tl.exp(-tl.abs(s))
            # Only at the top-k: a NaN logit elsewhere must not leak into ds through 0 * NaN.
            g = tl.where(hit, g * (e / ((1.0 + e) * (1.0 + e))), 0.0)
    else:
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * s_gm + offs_c[None, :] * s_gc, mask=mask, other=0.0).to(tl.float32)
        if ACT != ACT_NONE:
            p = tl.load(p_ptr + rows[:, None] * s_pm + offs_c[None, :] * s_pc, mask=mask, other=0.0).to(tl.float32)
        if ACT == ACT_SIGMOID:
            g = g * p * (1.0 - p)
    if ACT == ACT_SOFTMAX:
        ds = p * (g - delta[:, None])
    else:
        ds = g
    return tl.where(row_ok[:, None] & col_ok[None, :], ds, 0.0)


# ---- row kernels ---------------------------------------------------------------------------------
@triton.jit
def _inv_norm_kernel(x_ptr, inv_ptr, R, D, s_r, s_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """inv[r] = 1 / max(||x_r||, eps), rounded once to fp32. Reads R*D elements, writes 4R bytes.

    Summed and inverted in fp64: in fp32 the sum, sqrt and division left up to 1.4e-7 relative error, shared
    by a whole row of logits; at scale 100 that raised the fp32 probabilities' error from 2.6e-6 to 3.7e-6
    and grad_image's to 1.1e-5 at C=21843 (measured). The kernel is memory-bound: fp64 costs nothing on
    H100/H200 (fp64 at half the fp32 rate)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    rows = offs_r.to(tl.int64)
    ss = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * s_r + d[None, :] * s_d, mask=r_ok[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float64)
        ss += tl.sum(x * x, axis=1)
    norm = tl.sqrt(ss)
    # where(norm < eps, eps, norm) rather than maximum: a NaN norm stays NaN, as in clamp_min.
    tl.store(inv_ptr + offs_r, (1.0 / tl.where(norm < NORM_EPS, NORM_EPS, norm)).to(tl.float32), mask=r_ok)


@triton.jit
def _row_dot_kernel(a_ptr, b_ptr, out_ptr, R, L, s_ar, s_al, s_br, s_bl,
                    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[r] = sum_l a[r, l] * b[r, l] in fp32: softmax backward's delta = rowsum(grad * probs)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    rows = offs_r.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = r_ok[:, None] & (offs_l < L)[None, :]
        a = tl.load(a_ptr + rows[:, None] * s_ar + offs_l[None, :] * s_al, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * s_br + offs_l[None, :] * s_bl, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + offs_r, acc, mask=r_ok)


@triton.jit
def _row_max_sum_kernel(tmax_ptr, tsum_ptr, stats_ptr, R, T, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Combine the per-tile (max, sum-exp) of each row into the row's max M and sum L = sum_c exp(s - M).

    (M, L) rather than lse = M + log(L): an fp32 lse near 100 is rounded by up to 4e-6, which becomes a
    4e-6 relative error in every probability of the row (measured: 1.4e-6 vs 3.5e-7 over a test matrix),
    while exp(m_t - M) / L only rounds differences of nearby maxima. Reads 8*R*T bytes."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    rows = offs_r.to(tl.int64)
    m_run = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = r_ok[:, None] & (t < T)[None, :]
        m = tl.load(tmax_ptr + rows[:, None] * T + t[None, :], mask=mask, other=float("-inf"))
        l = tl.load(tsum_ptr + rows[:, None] * T + t[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=1))
        off = _safe_max(m_new)
        l_run = l_run * tl.exp(m_run - off) + tl.sum(l * tl.exp(m - off[:, None]), axis=1)
        m_run = m_new
    tl.store(stats_ptr + offs_r, m_run, mask=r_ok)
    tl.store(stats_ptr + R + offs_r, l_run, mask=r_ok)


@triton.jit
def _softmax_rescale_kernel(out_ptr, tmax_ptr, stats_ptr, R, C, T, TILE_N, BLOCK_R: tl.constexpr,
                            BLOCK_L: tl.constexpr):
    """out[r, c] *= exp(m_t - M_r) / L_r with t = c // TILE_N, the forward's tile of column c: the second half
    of the softmax, in place on the output the GEMM kernel wrote. 2 * R * C output-dtype bytes (the
    per-column gather of m_t hits cache: TILE_N neighbours share it)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = offs_r < R
    rows = offs_r.to(tl.int64)
    mask = r_ok[:, None] & (offs_c < C)[None, :]
    m_t = tl.load(tmax_ptr + rows[:, None] * T + (offs_c // TILE_N)[None, :], mask=mask, other=0.0)
    m_row = tl.load(stats_ptr + offs_r, mask=r_ok, other=0.0)
    l_row = tl.load(stats_ptr + R + offs_r, mask=r_ok, other=1.0)
    # A tile of -inf logits stored zeros; exp(-inf - M) = 0 keeps them zero (a NaN L still poisons the row).
    factor = tl.exp(m_t - _safe_max(m_row)[:, None]) / l_row[:, None]
    ptrs = out_ptr + rows[:, None] * C + offs_c[None, :]
    e = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (e * factor).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(f_ptr, g_ptr, inv_ptr, scale_ptr, out_ptr, xg_ptr, R, D, s_fr, s_fd,
                          NORMALIZE: tl.constexpr, WRITE_XG: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_f = inv * (scale*G - [||f|| > eps] x (x . scale*G)), x = f * inv (F.normalize's gradient: the
    projection vanishes where the norm was clamped). Also xg[r] = x_r . G_r, the row's share of
    grad_scale. Two sweeps over D (the second re-reads f and G from cache): 2*R*D loads, R*D stores."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    rows = offs_r.to(tl.int64)
    inv = tl.load(inv_ptr + offs_r, mask=r_ok, other=1.0)
    scale = tl.load(scale_ptr)
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    fg = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (d < D)[None, :]
        f = tl.load(f_ptr + rows[:, None] * s_fr + d[None, :] * s_fd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * D + d[None, :], mask=mask, other=0.0)
        ss += tl.sum(f * f, axis=1)
        fg += tl.sum(f * g, axis=1)
    xg = inv * fg
    if WRITE_XG:
        tl.store(xg_ptr + offs_r, xg, mask=r_ok)
    if NORMALIZE:
        # x (x . G) = f * (inv * xg); dropped where the norm was clamped (or is NaN: inv carries the NaN).
        proj = tl.where(tl.sqrt(ss) > NORM_EPS, inv * xg, 0.0)
    else:
        proj = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = r_ok[:, None] & (d < D)[None, :]
        f = tl.load(f_ptr + rows[:, None] * s_fr + d[None, :] * s_fd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * D + d[None, :], mask=mask, other=0.0)
        grad = (scale * inv)[:, None] * (g - proj[:, None] * f)
        tl.store(out_ptr + rows[:, None] * D + d[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


# ---- forward -------------------------------------------------------------------------------------
@triton.jit
def _similarity_fwd_kernel(img_ptr, txt_ptr, inv_i_ptr, inv_t_ptr, scale_ptr, bias_ptr, out_ptr, tmax_ptr, tsum_ptr,
                           N, C, D, T, s_im, s_id, s_tc, s_td,
                           ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of act(s): 2*BM*BN*D FLOPs, (BM+BN)*D loads, BM*BN stores.

    Softmax writes exp(s - m_tile) and the tile's (max, sum-exp) per row; _row_max_sum_kernel and
    _softmax_rescale_kernel finish it. Programs are grouped GROUP_M row tiles at a time so consecutive
    programs share text tiles in L2 (the Triton matmul tutorial's ordering)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    group_width = GROUP_M * T
    first_m = (pid // group_width) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_m
    pid_n = (pid % group_width) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < N
    col_ok = offs_c < C
    inv_i = tl.load(inv_i_ptr + offs_m, mask=row_ok, other=1.0)
    inv_c = tl.load(inv_t_ptr + offs_c, mask=col_ok, other=1.0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    s = _logits_tile(img_ptr, txt_ptr, offs_m, offs_c, row_ok, col_ok, inv_i, inv_c, scale, bias, D,
                     s_im, s_id, s_tc, s_td, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    rows = offs_m.to(tl.int64)
    if ACT == ACT_SOFTMAX:
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        e = tl.exp(s - _safe_max(m)[:, None])
        tl.store(tmax_ptr + rows * T + pid_n, m, mask=row_ok)
        tl.store(tsum_ptr + rows * T + pid_n, tl.sum(e, axis=1), mask=row_ok)
        out = e
    elif ACT == ACT_SIGMOID:
        out = tl.sigmoid(s)
    else:
        out = s
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sortable_key(s, offs_c):
    """int64 keys ordered like (s, -column): the fp32 bits made monotone in signed-int order (negative
    floats have their magnitude bits flipped) in the high word, 2^31-1-column in the low word."""
    bits = s.to(tl.int32, bitcast=True)
    # Any NaN (inf * 0 gives a sign-bit NaN) becomes +NaN, which ranks above +inf as in torch.topk.
    bits = tl.where(s != s, 0x7FC00000, bits)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - offs_c).to(tl.int64)[None, :]


# Bitonic top-k on the rows of a [2^ROWS_LOG, 2^COLS_LOG] tile, viewed as a hypercube of 2-long axes (one per
# index bit; column bit j is the last axis but j). A compare-swap along one axis is a min and a max over it:
# the interpreter runs tl.min/tl.max in numpy, while tl.sort/tl.topk's xor-reductions run element by element
# in Python there (measured: 1.2 s per 16 x 64 tile).
@triton.jit
def _half(n_dims: tl.constexpr, axis: tl.constexpr):
    """0 at the first, 1 at the second position of hypercube `axis` (broadcastable over the cube)."""
    return tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (n_dims - axis - 1))


@triton.jit
def _compare_swap(h, bit: tl.constexpr, desc, n_dims: tl.constexpr):
    """Order each pair of entries whose column indices differ only in `bit`: ascending where desc is 0."""
    axis: tl.constexpr = n_dims - 1 - bit
    lo = tl.min(h, axis=axis, keep_dims=True)
    hi = tl.max(h, axis=axis, keep_dims=True)
    return tl.where((_half(n_dims, axis) ^ desc) == 1, hi, lo)


@triton.jit
def _bitonic_merge(h, bits: tl.constexpr, desc, n_dims: tl.constexpr):
    """Sort bitonic runs of 2^bits columns (bits log2 steps)."""
    for i in tl.static_range(bits):
        h = _compare_swap(h, bits - 1 - i, desc, n_dims)
    return h


@triton.jit
def _top_keys(x, ROWS_LOG: tl.constexpr, COLS_LOG: tl.constexpr, K_LOG: tl.constexpr, DESC: tl.constexpr):
    """The 2^K_LOG largest entries of each row of x, sorted (descending if DESC), as [2^ROWS_LOG, 2^K_LOG].

    Sort runs of 2^K_LOG in alternating directions, then repeatedly keep the element-wise max of neighbouring
    runs (an ascending and a descending run: their max is a bitonic run holding the top 2^K_LOG of both)
    and re-sort it with a bitonic merge."""
    n_dims: tl.constexpr = ROWS_LOG + COLS_LOG
    h = tl.reshape(x, [2] * n_dims)
    for s in tl.static_range(1, K_LOG + 1):
        if s < COLS_LOG:
            h = _bitonic_merge(h, s, _half(n_dims, n_dims - 1 - s), n_dims)
        else:
            h = _bitonic_merge(h, s, DESC, n_dims)
    for r in tl.static_range(COLS_LOG - K_LOG):  # the cube has n_dims - r axes here, n_dims - r - 1 after
        h = tl.max(h, axis=n_dims - r - 1 - K_LOG)
        if COLS_LOG - r - 1 > K_LOG:
            h = _bitonic_merge(h, K_LOG, _half(n_dims - r - 1, n_dims - r - 2 - K_LOG), n_dims - r - 1)
        else:
            h = _bitonic_merge(h, K_LOG, DESC, n_dims - r - 1)
    return tl.reshape(h, [2**ROWS_LOG, 2**K_LOG])


@triton.jit
def _topk_fwd_kernel(img_ptr, txt_ptr, inv_i_ptr, inv_t_ptr, scale_ptr, bias_ptr, val_ptr, idx_ptr, lse_ptr,
                     N, C, D, K, s_im, s_id, s_tc, s_td,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr,
                     LOG_M: tl.constexpr, LOG_C: tl.constexpr, LOG_K: tl.constexpr):
    """BLOCK_M rows against every class tile: 2*BM*C*D FLOPs, BM*D + C*D loads, BM*(2k+1) stores; no N x C.

    Per tile: online log-sum-exp, then the tile's top K_PAD keys (bitonic top-k) merged into the running
    best (bitonic merge): ~BM*BC*log2(K_PAD)^2/2 compare-swaps, small next to the tile's BM*BC*D MACs."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    inv_i = tl.load(inv_i_ptr + offs_m, mask=row_ok, other=1.0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    m_run = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best = tl.full((BLOCK_M, K_PAD), KEY_PAD, dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c < C
        inv_c = tl.load(inv_t_ptr + offs_c, mask=col_ok, other=1.0)
        s = _logits_tile(img_ptr, txt_ptr, offs_m, offs_c, row_ok, col_ok, inv_i, inv_c, scale, bias, D,
                         s_im, s_id, s_tc, s_td, HAS_BIAS, BLOCK_M, BLOCK_C, BLOCK_D, PRECISION)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, axis=1))
        off = _safe_max(m_new)
        l_run = l_run * tl.exp(m_run - off) + tl.sum(tl.exp(s - off[:, None]), axis=1)
        m_run = m_new
        keys = tl.where(col_ok[None, :], _sortable_key(s, offs_c), KEY_PAD)
        # Skip the merge when no row's tile maximum beats its current k-th best: after the first tiles most
        # do not (a row's chance to improve on tile t is about K/t for unordered classes).
        if tl.max((tl.max(keys, axis=1) > tl.min(best, axis=1)).to(tl.int32), axis=0) > 0:
            top = _top_keys(keys, LOG_M, LOG_C, LOG_K, 0)  # [BLOCK_M, K_PAD], ascending
            # best is descending and top ascending: their element-wise max is bitonic and holds the K_PAD
            # largest of both.
            merged = tl.reshape(tl.maximum(best, top), [2] * (LOG_M + LOG_K))
            best = tl.reshape(_bitonic_merge(merged, LOG_K, 1, LOG_M + LOG_K), [BLOCK_M, K_PAD])
    lse = m_run + tl.log(l_run)
    # Decode: high word back to fp32 bits, low word back to the column.
    ordered = (best >> 32).to(tl.int32)
    s_top = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    cls = 2147483647 - (best & 0x7FFFFFFF)  # the low word is < 2^31
    if ACT == ACT_SOFTMAX:  # relative to the row max, not lse: see _row_max_sum_kernel
        vals = tl.exp(s_top - _safe_max(m_run)[:, None]) / l_run[:, None]
    elif ACT == ACT_SIGMOID:
        vals = tl.sigmoid(s_top)
    else:
        vals = s_top
    j = tl.arange(0, K_PAD)
    mask = row_ok[:, None] & (j < K)[None, :]
    tl.store(val_ptr + rows[:, None] * K + j[None, :], vals.to(val_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + rows[:, None] * K + j[None, :], cls, mask=mask)
    tl.store(lse_ptr + offs_m, lse, mask=row_ok)


# ---- dense backward: ds once, then cuBLAS -----------------------------------------------------------
@triton.jit
def _ds_kernel(g_ptr, p_ptr, delta_ptr, ds_ptr, part_ptr, N, C, s_gm, s_gc, s_pm, s_pc,
               ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_BF16: tl.constexpr,
               UPCAST: tl.constexpr):
    """ds [N, C] = dL/ds of the dense modes (_ds_tile) rounded to the features' dtype (under the interpreter an
    fp32 buffer holding the rounded values: no numpy casts), and part[class tile, rows] = the tile's fp32 row
    sums of ds (grad_logit_bias's shares). One [BLOCK_M, BLOCK_C] tile per program."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_m < N
    col_ok = offs_c < C
    delta, lse = _ds_row_stats(offs_m, row_ok, delta_ptr, delta_ptr, ACT, False, BLOCK_M)
    # Dense mode: _ds_tile reads g, p and delta only; the top-k arguments (indices, features, norms, scalars)
    # are placeholders.
    ds = _ds_tile(offs_m, offs_c, row_ok, col_ok, delta, lse, g_ptr, p_ptr, g_ptr, s_gm, s_gc, s_pm, s_pc, 0,
                  g_ptr, g_ptr, delta, delta, 1.0, 0.0, 0, 0, 0, 0, 0,
                  ACT, False, False, BLOCK_M, BLOCK_C, 16, "ieee")
    tl.store(part_ptr + tl.program_id(1).to(tl.int64) * N + offs_m, tl.sum(ds, axis=1), mask=row_ok)
    rows = offs_m.to(tl.int64)
    store_rounded(ds_ptr + rows[:, None] * C + offs_c[None, :], ds, row_ok[:, None] & col_ok[None, :], ROUND_BF16,
                  UPCAST)


# ---- top-k backward GEMMs (the logits recomputed per tile) ---------------------------------------
@triton.jit
def _bwd_image_side_kernel(img_ptr, txt_ptr, inv_i_ptr, inv_t_ptr, scale_ptr, bias_ptr,
                           g_ptr, p_ptr, idx_ptr, lse_ptr, delta_ptr, G_ptr, dbias_ptr,
                           N, C, D, K, s_im, s_id, s_tc, s_td, s_gm, s_gc, s_pm, s_pc,
                           ACT: tl.constexpr, FROM_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
    """G[rows, d-block] = sum_c ds[rows, c] y[c, d-block] (fp32), y = text * inv_c made per tile in registers.

    2*BM*C*BDO FLOPs per program (the top-k backward; the dense modes go through _dense_gradients). The
    pid_d == 0 programs also write rowsum(ds), grad_bias's share."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    inv_i = tl.load(inv_i_ptr + offs_m, mask=row_ok, other=1.0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    delta, lse = _ds_row_stats(offs_m, row_ok, delta_ptr, lse_ptr, ACT, FROM_TOPK, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    ds_rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        col_ok = offs_c < C
        inv_c = tl.load(inv_t_ptr + offs_c, mask=col_ok, other=1.0)
        ds = _ds_tile(offs_m, offs_c, row_ok, col_ok, delta, lse, g_ptr, p_ptr, idx_ptr, s_gm, s_gc, s_pm, s_pc, K,
                      img_ptr, txt_ptr, inv_i, inv_c, scale, bias, D, s_im, s_id, s_tc, s_td,
                      ACT, FROM_TOPK, HAS_BIAS, BLOCK_M, BLOCK_C, BLOCK_D, PRECISION)
        ds_rowsum += tl.sum(ds, axis=1)
        y = tl.load(txt_ptr + offs_c.to(tl.int64)[:, None] * s_tc + offs_do[None, :] * s_td,
                    mask=col_ok[:, None] & do_ok[None, :], other=0.0)
        # Normalize the operand, not ds: ds * inv_c (inv_c = 1e12 for a zero row) would overflow fp16.
        y_n = (y.to(tl.float32) * inv_c[:, None]).to(y.dtype)
        acc = tl.dot(ds.to(y.dtype), y_n, acc, input_precision=PRECISION)
    tl.store(G_ptr + rows[:, None] * D + offs_do[None, :], acc, mask=row_ok[:, None] & do_ok[None, :])
    tl.store(dbias_ptr + offs_m, ds_rowsum, mask=row_ok & (pid_d == 0))


@triton.jit
def _bwd_text_side_kernel(img_ptr, txt_ptr, inv_i_ptr, inv_t_ptr, scale_ptr, bias_ptr,
                          g_ptr, p_ptr, idx_ptr, lse_ptr, delta_ptr, H_ptr,
                          N, C, D, K, s_im, s_id, s_tc, s_td, s_gm, s_gc, s_pm, s_pc,
                          ACT: tl.constexpr, FROM_TOPK: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
    """H[classes, d-block] = sum_i ds[i, classes]^T x[i, d-block] (fp32), x = image * inv_i in registers.
    The mirror of _bwd_image_side_kernel: each program sweeps all rows for its class block."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = offs_c < C
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    inv_c = tl.load(inv_t_ptr + offs_c, mask=col_ok, other=1.0)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        inv_i = tl.load(inv_i_ptr + offs_m, mask=row_ok, other=1.0)
        delta, lse = _ds_row_stats(offs_m, row_ok, delta_ptr, lse_ptr, ACT, FROM_TOPK, BLOCK_M)
        ds = _ds_tile(offs_m, offs_c, row_ok, col_ok, delta, lse, g_ptr, p_ptr, idx_ptr, s_gm, s_gc, s_pm, s_pc, K,
                      img_ptr, txt_ptr, inv_i, inv_c, scale, bias, D, s_im, s_id, s_tc, s_td,
                      ACT, FROM_TOPK, HAS_BIAS, BLOCK_M, BLOCK_C, BLOCK_D, PRECISION)
        x = tl.load(img_ptr + offs_m.to(tl.int64)[:, None] * s_im + offs_do[None, :] * s_id,
                    mask=row_ok[:, None] & do_ok[None, :], other=0.0)
        x_n = (x.to(tl.float32) * inv_i[:, None]).to(x.dtype)
        acc = tl.dot(tl.trans(ds.to(x.dtype)), x_n, acc, input_precision=PRECISION)
    tl.store(H_ptr + offs_c.to(tl.int64)[:, None] * D + offs_do[None, :], acc, mask=col_ok[:, None] & do_ok[None, :])


# ---- host side: checks, block sizes, launches ----------------------------------------------------
def _act_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"mmfast: activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}")
    return ACTIVATIONS[activation]


# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per kernel family. BLOCK_N is the class tile (the
# reduction tile of the image-side backward). Under the interpreter each program costs ~50 ms of Python
# whatever its size (measured), so it gets wide tiles. GPU: fp32 runs IEEE dots on CUDA cores; its forward
# tile was the fastest of 4 tried on an H200 (Triton 3.6, 4096 x 1000 x 768: 0.34 ms vs 0.51 ms for
# 64 x 64 x 32); the half-precision forward likewise (0.18 ms; 128 x 128 tiles spilled in the softmax
# epilogue: 0.44 ms). The top-k keeps 32 rows per program so its int64 key tiles stay in registers. The
# top-k tiles are not tuned yet. "backward_features": (BLOCK_DO,), the gradient programs' feature block: each
# program rebuilds its logit tiles over all of D, so D / BLOCK_DO is the number of times the logits are
# recomputed per side. Backward, benchmarks/_triton_sweep.py on an H200 (Triton 3.6, 2026-12-04): half precision
# with 8 warps and BLOCK_DO 256 took fp16 N=4096 C=21843 D=768 forward+backward from 8.89 to 6.61 ms and bf16
# N=4096 C=1000 from 1.85 to 1.21 ms; fp32 stayed (no candidate of 5 beat it by more than noise). Since
# 2026-12-05 "backward" and "backward_features" serve the top-k backward only (the dense one is _ds_kernel +
# cuBLAS); the sweep times them on top-k cases.
_BLOCKS = {
    "interpret": {"forward": (64, 1024, 128, 4, 1), "topk": (64, 1024, 128, 4, 1),
                  "backward": (64, 1024, 128, 4, 1), "backward_features": (256,)},
    "fp32": {"forward": (128, 128, 32, 8, 2), "topk": (32, 64, 32, 4, 3), "backward": (64, 64, 32, 4, 2),
             "backward_features": (128,)},
    "half": {"forward": (128, 64, 64, 4, 3), "topk": (32, 64, 64, 4, 3), "backward": (64, 64, 64, 8, 2),
             "backward_features": (256,)},
}
apply_block_overrides("similarity_softmax", _BLOCKS)


def _table(dtype: torch.dtype) -> str:
    return "interpret" if INTERPRET else ("fp32" if dtype == torch.float32 else "half")


def _gemm_blocks(kind: str, dtype: torch.dtype, n_rows: int, n_cols: int, d: int):
    """_BLOCKS[...][kind] clamped to the problem (every tl.dot dimension stays >= 16)."""
    bm, bn, bd, warps, stages = _BLOCKS[_table(dtype)][kind]
    return (pow2_block(n_rows, MIN_DOT_BLOCK, bm), pow2_block(n_cols, MIN_DOT_BLOCK, bn),
            pow2_block(d, MIN_DOT_BLOCK, bd), warps, stages)


def _row_blocks(length: int):
    """(BLOCK_R, BLOCK_L) of a row kernel: about 4096 elements per program, at most 64 rows (GPU);
    64K elements under the interpreter, where each program costs ~50 ms of Python (measured)."""
    budget, max_rows = (65536, 4096) if INTERPRET else (4096, 64)
    bl = pow2_block(length, 16, budget)
    return max(1, min(max_rows, budget // bl)), bl


def _inv_norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    rows, d = x.shape
    if not normalize:
        return torch.ones(rows, device=x.device, dtype=torch.float32)
    inv = torch.empty(rows, device=x.device, dtype=torch.float32)
    br, bd = _row_blocks(d)
    _inv_norm_kernel[(triton.cdiv(rows, br),)](x, inv, rows, d, x.stride(0), x.stride(1), BLOCK_R=br, BLOCK_D=bd)
    return inv


def _forward(image, text, scale, bias, act: int, inv_i, inv_t) -> torch.Tensor:
    n, d = image.shape
    c = text.shape[0]
    bm, bn, bd, warps, stages = _gemm_blocks("forward", image.dtype, n, c, d)
    tiles_n = triton.cdiv(c, bn)
    out = torch.empty(n, c, device=image.device, dtype=image.dtype)
    # Per-(row, class tile) max and sum-exp of the softmax; other activations pass a dummy pointer.
    stats = torch.empty(2, n, tiles_n, device=image.device, dtype=torch.float32) if act == 0 else inv_i.expand(2, -1)
    grid = (triton.cdiv(n, bm) * tiles_n,)
    _similarity_fwd_kernel[grid](
        image, text, inv_i, inv_t, scale, scale if bias is None else bias, out, stats[0], stats[1],
        n, c, d, tiles_n, image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        ACT=act, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP_M=8,
        PRECISION=dot_precision(image.dtype), num_warps=warps, num_stages=stages)
    if act == 0:
        row_stats = torch.empty(2, n, device=image.device, dtype=torch.float32)
        br, bt = _row_blocks(tiles_n)
        _row_max_sum_kernel[(triton.cdiv(n, br),)](stats[0], stats[1], row_stats, n, tiles_n, BLOCK_R=br, BLOCK_T=bt)
        br, bl = _row_blocks(c)
        _softmax_rescale_kernel[(triton.cdiv(n, br), triton.cdiv(c, bl))](out, stats[0], row_stats, n, c, tiles_n,
                                                                          bn, BLOCK_R=br, BLOCK_L=bl)
    return out


def _topk_forward(image, text, scale, bias, act: int, k: int, inv_i, inv_t):
    n, d = image.shape
    c = text.shape[0]
    k_pad = pow2_block(k, 1, MAX_TOPK)
    bm, bc, bd, warps, stages = _gemm_blocks("topk", image.dtype, n, c, d)
    bc = max(bc, k_pad)  # a class tile holds at least K_PAD candidates
    values = torch.empty(n, k, device=image.device, dtype=image.dtype)
    indices = torch.empty(n, k, device=image.device, dtype=torch.int64)
    row_lse = torch.empty(n, device=image.device, dtype=torch.float32)
    _topk_fwd_kernel[(triton.cdiv(n, bm),)](
        image, text, inv_i, inv_t, scale, scale if bias is None else bias, values, indices, row_lse,
        n, c, d, k, image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        ACT=act, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd, K_PAD=k_pad,
        PRECISION=dot_precision(image.dtype), LOG_M=bm.bit_length() - 1, LOG_C=bc.bit_length() - 1,
        LOG_K=k_pad.bit_length() - 1, num_warps=warps, num_stages=stages)
    return values, indices, row_lse


def _dense_gradients(image, text, inv_i, inv_t, act: int, g, p, delta):
    """G = ds @ y, H = ds^T @ x (fp32) and the row sums of ds for the dense modes: ds [N, C] written once in the
    features' dtype (as autograd would hold it; memory: one more N x C, as grad_out), then cuBLAS. The former
    Triton GEMM kernels rebuilt ds from grad_out and out in their prologues once per block of output features,
    reading those two N x C matrices 2 * D / 256 times: the H200's 0.40x-eager backward at fp16 N=4096, C=21843."""
    n, c = g.shape
    upcast = INTERPRET and image.dtype != torch.float32
    if act == ACTIVATIONS["none"] and not upcast and g.dtype == image.dtype:
        ds, ds_rowsum = g, g.sum(1, dtype=torch.float32)  # ds is grad_out itself (as in the CUDA backend)
    else:
        bm, bc = (64, 1024) if INTERPRET else (32, 128)  # an elementwise pass; NOT tuned on a GPU
        bm, bc = pow2_block(n, 16, bm), pow2_block(c, 16, bc)
        ds = torch.empty(n, c, device=image.device, dtype=torch.float32 if upcast else image.dtype)
        part = torch.empty(triton.cdiv(c, bc), n, device=image.device, dtype=torch.float32)
        _ds_kernel[(triton.cdiv(n, bm), triton.cdiv(c, bc))](
            g, p, inv_i if delta is None else delta, ds, part, n, c, g.stride(0), g.stride(1), p.stride(0),
            p.stride(1), ACT=act, BLOCK_M=bm, BLOCK_C=bc, ROUND_BF16=image.dtype == torch.bfloat16, UPCAST=upcast)
        ds_rowsum = part.sum(0)
    # The normalized operands, rounded to the features' dtype as the former kernels made them per tile.
    x = (image.float() * inv_i[:, None]).to(image.dtype)
    y = (text.float() * inv_t[:, None]).to(text.dtype)
    return mm_fp32(ds, y), mm_fp32(ds.t(), x), ds_rowsum


def _backward(image, text, inv_i, inv_t, scale, bias, act: int, normalize: bool, *, g, p, delta,
              idx=None, lse=None):
    """The four gradients (dense: g=grad_out, p=out, through _dense_gradients; top-k: g=grad_values, p=values,
    idx, lse given, ds tiles rebuilt in the GEMM kernels' prologues). delta is rowsum(g*p) (softmax) or None."""
    n, d = image.shape
    c = text.shape[0]
    from_topk = idx is not None
    if not from_topk:
        G, H, ds_rowsum = _dense_gradients(image, text, inv_i, inv_t, act, g, p, delta)
        return _finish_backward(image, text, inv_i, inv_t, scale, normalize, G, H, ds_rowsum)
    bm, bc, bd, warps, stages = _gemm_blocks("backward", image.dtype, n, c, d)
    bdo = pow2_block(d, MIN_DOT_BLOCK, _BLOCKS[_table(image.dtype)]["backward_features"][0])
    dummy = inv_i  # stands in for pointers a mode does not read
    common = dict(ACT=act, FROM_TOPK=from_topk, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_C=bc, BLOCK_D=bd,
                  BLOCK_DO=bdo, PRECISION=dot_precision(image.dtype), num_warps=warps, num_stages=stages)
    args = (image, text, inv_i, inv_t, scale, scale if bias is None else bias, g, p,
            dummy if idx is None else idx, dummy if lse is None else lse, dummy if delta is None else delta)
    sizes = (n, c, d, idx.shape[1] if from_topk else 0, image.stride(0), image.stride(1), text.stride(0),
             text.stride(1), g.stride(0), g.stride(1), p.stride(0), p.stride(1))
    G = torch.empty(n, d, device=image.device, dtype=torch.float32)
    H = torch.empty(c, d, device=image.device, dtype=torch.float32)
    ds_rowsum = torch.empty(n, device=image.device, dtype=torch.float32)
    _bwd_image_side_kernel[(triton.cdiv(n, bm), triton.cdiv(d, bdo))](*args, G, ds_rowsum, *sizes, **common)
    _bwd_text_side_kernel[(triton.cdiv(c, bc), triton.cdiv(d, bdo))](*args, H, *sizes, **common)
    return _finish_backward(image, text, inv_i, inv_t, scale, normalize, G, H, ds_rowsum)


def _finish_backward(image, text, inv_i, inv_t, scale, normalize: bool, G, H, ds_rowsum):
    """The four gradients from G = ds @ y [N, D] and H = ds^T @ x [C, D] (fp32) and the row sums of ds."""
    n, d = image.shape
    grad_image = torch.empty_like(image, memory_format=torch.contiguous_format)
    grad_text = torch.empty_like(text, memory_format=torch.contiguous_format)
    xg = torch.empty(n, device=image.device, dtype=torch.float32)
    for feat, grad_in, inv, grad_out, write_xg in ((image, G, inv_i, grad_image, True),
                                                   (text, H, inv_t, grad_text, False)):
        rows = feat.shape[0]
        br, bdn = _row_blocks(d)
        _norm_backward_kernel[(triton.cdiv(rows, br),)](
            feat, grad_in, inv, scale, grad_out, xg, rows, d, feat.stride(0), feat.stride(1),
            NORMALIZE=normalize, WRITE_XG=write_xg, BLOCK_R=br, BLOCK_D=bdn)
    return grad_image, grad_text, xg.sum(), ds_rowsum.sum()


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    rows, length = a.shape
    out = torch.empty(rows, device=a.device, dtype=torch.float32)
    br, bl = _row_blocks(length)
    _row_dot_kernel[(triton.cdiv(rows, br),)](a, b, out, rows, length, a.stride(0), a.stride(1),
                                              b.stride(0), b.stride(1), BLOCK_R=br, BLOCK_L=bl)
    return out


def _check_saved(name: str, t: torch.Tensor, shape, like: torch.Tensor, dtype=None) -> None:
    """A tensor the backward reads: its shape, device and (if given) dtype; no values (no host sync)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"mmfast: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"mmfast: {name} is on {t.device} but image is on {like.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"mmfast: {name} must be {dtype}, got {t.dtype}")


def _check_inv_norms(inv_norm_image, inv_norm_text, image, text) -> None:
    _check_saved("inv_norm_image", inv_norm_image, (image.shape[0],), image, torch.float32)
    _check_saved("inv_norm_text", inv_norm_text, (text.shape[0],), image, torch.float32)


# ---- the operators -------------------------------------------------------------------------------
@torch.library.custom_op("mmfast::similarity_softmax_triton", mutates_args=())
def similarity_softmax_triton(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                              logit_bias: Optional[torch.Tensor], normalize: bool, activation: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "similarity_softmax_triton"
    check_feature_pair(op, ("image", "text"), image, text)
    act = _act_code(activation)
    scale, bias = optional_scalar("logit_scale", logit_scale, image), optional_scalar("logit_bias", logit_bias, image)
    with device_guard(image):
        inv_i, inv_t = _inv_norms(image, normalize), _inv_norms(text, normalize)
        return _forward(image, text, scale, bias, act, inv_i, inv_t), inv_i, inv_t


@torch.library.custom_op("mmfast::similarity_softmax_backward_triton", mutates_args=())
def similarity_softmax_backward_triton(grad_out: torch.Tensor, out: torch.Tensor, image: torch.Tensor,
                                       text: torch.Tensor, inv_norm_image: torch.Tensor,
                                       inv_norm_text: torch.Tensor, logit_scale: torch.Tensor, normalize: bool,
                                       activation: str
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "similarity_softmax_backward_triton"
    check_feature_pair(op, ("image", "text"), image, text)
    act = _act_code(activation)
    shape = (image.shape[0], text.shape[0])
    _check_saved("grad_out", grad_out, shape, image)
    _check_saved("out", out, shape, image)
    _check_inv_norms(inv_norm_image, inv_norm_text, image, text)
    scale = optional_scalar("logit_scale", logit_scale, image)
    with device_guard(image):
        delta = _row_dot(grad_out, out) if act == 0 else None
        return _backward(image, text, inv_norm_image.contiguous(), inv_norm_text.contiguous(), scale, None, act,
                         normalize, g=grad_out, p=out, delta=delta)


@torch.library.custom_op("mmfast::similarity_topk_triton", mutates_args=())
def similarity_topk_triton(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                           logit_bias: Optional[torch.Tensor], normalize: bool, activation: str, k: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "similarity_topk_triton"
    check_feature_pair(op, ("image", "text"), image, text)
    act = _act_code(activation)
    if not 1 <= k <= text.shape[0]:
        raise ValueError(f"mmfast: topk must be in [1, C={text.shape[0]}], got {k}")
    if k > MAX_TOPK:
        raise ValueError(f"mmfast: the Triton backend supports topk up to {MAX_TOPK}, got topk={k}; "
                         "use another backend for larger k")
    scale, bias = optional_scalar("logit_scale", logit_scale, image), optional_scalar("logit_bias", logit_bias, image)
    with device_guard(image):
        inv_i, inv_t = _inv_norms(image, normalize), _inv_norms(text, normalize)
        values, indices, row_lse = _topk_forward(image, text, scale, bias, act, k, inv_i, inv_t)
    return values, indices, row_lse, inv_i, inv_t


@torch.library.custom_op("mmfast::similarity_topk_backward_triton", mutates_args=())
def similarity_topk_backward_triton(grad_values: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                                    row_lse: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                                    inv_norm_image: torch.Tensor, inv_norm_text: torch.Tensor,
                                    logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor], normalize: bool,
                                    activation: str
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "similarity_topk_backward_triton"
    check_feature_pair(op, ("image", "text"), image, text)
    act = _act_code(activation)
    shape = (image.shape[0], indices.shape[1] if indices.dim() == 2 else -1)
    _check_saved("indices", indices, shape, image, torch.int64)
    _check_saved("grad_values", grad_values, shape, image)
    _check_saved("values", values, shape, image)
    _check_saved("row_lse", row_lse, (image.shape[0],), image, torch.float32)
    _check_inv_norms(inv_norm_image, inv_norm_text, image, text)
    scale, bias = optional_scalar("logit_scale", logit_scale, image), optional_scalar("logit_bias", logit_bias, image)
    # [N, k] tensors are small: contiguous copies (grad_values may arrive expanded) keep the kernels simple.
    grad_values, values, indices = grad_values.contiguous(), values.contiguous(), indices.contiguous()
    with device_guard(image):
        delta = _row_dot(grad_values, values) if act == 0 else None
        return _backward(image, text, inv_norm_image.contiguous(), inv_norm_text.contiguous(), scale, bias, act,
                         normalize, g=grad_values, p=values, delta=delta, idx=indices, lse=row_lse.contiguous())
