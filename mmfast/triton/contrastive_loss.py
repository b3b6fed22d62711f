"""Triton kernels of the contrastive-loss block operators (CLIP and SigLIP).

Operators defined here (schemas of csrc/mmfast.cpp with "_triton" appended, block semantics there; fake
impls and autograd are registered by mmfast/ops/contrastive_loss.py right after this module is imported):
  mmfast::clip_loss_block_triton            -> (row_lse, col_lse, pos_logits)
  mmfast::clip_loss_block_backward_triton   -> (grad_rows, grad_cols, grad_logit_scale, grad_logit_bias)
  mmfast::siglip_loss_block_triton          -> (loss_sum, grad_rows, grad_cols, grad_logit_scale, grad_logit_bias)

Notation: rows [Bi, D], cols [Bt, D], dot_ij = rows_i . cols_j (fp32 accumulation whatever the input
dtype), x_ij = scale * dot_ij + bias; the positive of row i is column i + label_offset (CLIP; SigLIP: i).
The Bi x Bt logits are never stored, nor anything of size B^2 / tile: the extra memory is O((Bi + Bt) * D)
(gradients) plus O((Bi + Bt) * MAX_BANDS) fp32 scratch (forward), MAX_BANDS = 16.

CLIP forward: one GEMM over [BLOCK_M, BLOCK_N] tiles, grouped into NB_R row bands x NB_C column bands of
whole tiles (NB = min(tiles on that side, MAX_BANDS): at most 16 x 16 = 256 programs, one per band pair;
one program per tile while a side has <= 16 tiles; rule and reasons at MAX_BANDS). A program sweeps its
region row tile by row tile: the running (max, sum-exp) of the current row tile over the band's columns stay
in registers and are written once per row tile to [NB_C, Bi] row partials; the running column statistics
over the band's rows live in a [NB_R, Bt] scratch slice that only this program reads and writes (no atomics,
no races; a block-wide barrier orders its store and the next row tile's load). _lse_combine_kernel then merges
the NB_C (NB_R) band partials of each row (column) in band order: deterministic, and the band split depends
on the shape and dtype only. Scratch: 2 x 4 bytes x (NB_C * Bi + NB_R * Bt) <= 128 bytes per row and per
column (8.4 MB per side at B = 65536), where one partial per tile (the earlier 2-D grid of single tiles) cost
O(B^2 / BLOCK), 200 MB at B = 32768. forward_scratch_shapes() reports the shapes. Cost: the same single
GEMM; the column statistics add a load and a store of 2 x BLOCK_N floats per tile, and a band of few tiles
per program fills the SMs less evenly than single tiles at mid-size B (NOT tuned on a GPU). Two exps per
logit: a shared tile max would underflow rows far below the tile's top row (scale 100 spreads logits over
~200).

Backward (CLIP, and SigLIP with compute_grad): G = dL/dx is rebuilt from recomputed dots once, chunk by chunk
of columns [c0, c0 + W): _grad_tile_kernel (one program per [BLOCK_M, BLOCK_N] tile of the chunk, one GEMM of
dots) writes G into a [Bi, W] buffer in the features' dtype and per-(row, tile) sum(G * dot), sum(G) (and
SigLIP's loss); then cuBLAS runs grad_rows += G @ cols[chunk] (fp32 accumulator) and grad_cols[chunk] =
G^T @ rows. 3 GEMMs of Bi*Bt*D in all, as the CUDA backend and the CPU kernel. The former Triton-only scheme
(row-side and column-side kernels that each rebuilt G once per block of output features) ran 2 * (D / 256 + 1)
= 8 at D=768: 0.09x eager for CLIP bf16 B=65536 on the H200 (issue 15). Extra memory: the buffer (at most
GRAD_CHUNK_BYTES), the [Bi, D] fp32 accumulator and [3, W / BLOCK_N, Bi] fp32 partials, never Bi x Bt for large
B. Deterministic: no atomics; the partials add up in fp64 in a fixed order.

SigLIP's gradient needs no row statistics, so with compute_grad the gradient pass is the whole operator (the
tile kernel also sums the loss); without it the forward's band grid sums each row's loss over a column band
in registers ([NB_C, Bi] partials, then one torch sum).

dtypes: statistics and every accumulator are fp32. The gradient GEMMs take G in the features' dtype (tensor
cores) as autograd would hold it. fp16 cannot hold G as it is (1/(2B)-sized coefficients times small
probabilities underflow it), so fp16 G is multiplied by a power of two from a bound on |G| (the CUDA backend's
gradient factor, _fp16_gradient_factor), undone exactly after the GEMMs; bf16 has fp32's exponent range and
rounds G directly. Under the interpreter fp16/bf16 operands are widened to fp32 before tl.dot (exact, as the
GPU's MMA products are): its bf16 dot runs numpy on the raw uint16 bits (garbage), and its fp16 dot is
numpy's non-BLAS loop (measured 20x slower than fp32 on a 512 x 1024 x 64 tile); G is rounded to fp16/bf16
there by fp32 arithmetic (_utils.round_fp16, round_bf16), bit-identical to a rounding cast and ~10x cheaper than
the interpreter's casts (whose fp32 -> bf16 also truncates instead of rounding), and held in an fp32 buffer.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from mmfast.triton._utils import (INTERPRET, MIN_DOT_BLOCK, apply_block_overrides, check_feature_pair, device_guard,
                                  dot_precision, mm_fp32, optional_scalar, pow2_block, store_rounded)


# ---- shared device functions ---------------------------------------------------------------------
@triton.jit
def _safe_max(m):
    """A running max used as an exp() offset: -inf (nothing seen yet) becomes 0 so exp(-inf - 0) = 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _dot_step(r_ptr, c_ptr, rows, cols, m_ok, n_ok, d, D, s_rm, s_rd, s_cn, s_cd, acc,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + rows[rows, d] . cols[cols, d] for one BLOCK_D range d of features (masked at D)."""
    d_ok = d < D
    a = tl.load(r_ptr + rows[:, None] * s_rm + d[None, :] * s_rd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    b = tl.load(c_ptr + cols[:, None] * s_cn + d[None, :] * s_cd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # interpreter, fp16/bf16: see the top
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)


@triton.jit
def _dots_tile(r_ptr, c_ptr, offs_m, offs_n, m_ok, n_ok, D, s_rm, s_rd, s_cn, s_cd,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_D: tl.constexpr):
    """dot[BLOCK_M, BLOCK_N] = rows[offs_m] . cols[offs_n] in fp32 (0 outside the block).

    SPLIT_D with full-precision fp32 (PRECISION "ieee": FMA dots, no tensor cores) sums each 2 * BLOCK_D stretch
    of D on its own and adds the stretches up. A tl.dot chained through one accumulator is one fma chain over
    all of D: unit-norm dots at D=768 come out ~1.8e-8 off (std; 5.8e-9 in stretches of 64, numpy model of the
    fma order), and SigLIP's fp32 bias gradient, which cancels 640-fold at B=128 and scale 100, moves ~9e-6 of
    its value per 1e-8: the H200 run's 4.0e-5 miss (issue 12; the model gives 3.8e-5 for the chain, 4.7e-6 for
    stretches of 64). Two tl.dot per stretch because Triton's combine pass folds addf(dot(a, b, 0), acc) into
    dot(a, b, acc), which would restore the single chain; a chain of two is left alone. Cost: the stretch's
    own accumulator tile (ptxas sm_90a, fp32 64 x 64 tiles, 4 warps: _clip_fwd_kernel would go from 0 to 600
    bytes of spills, so only the kernel that takes SigLIP's scalar sums asks for it), one add per dot per
    2 * BLOCK_D fmas, and a masked half stretch where D is not a multiple of 2 * BLOCK_D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    if SPLIT_D and PRECISION == "ieee":
        for d0 in range(0, D, 2 * BLOCK_D):
            part = _dot_step(r_ptr, c_ptr, rows, cols, m_ok, n_ok, d0 + offs_d, D, s_rm, s_rd, s_cn, s_cd,
                             tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
            part = _dot_step(r_ptr, c_ptr, rows, cols, m_ok, n_ok, d0 + BLOCK_D + offs_d, D, s_rm, s_rd, s_cn, s_cd,
                             part, PRECISION, UPCAST)
            acc += part
    else:
        for d0 in range(0, D, BLOCK_D):
            acc = _dot_step(r_ptr, c_ptr, rows, cols, m_ok, n_ok, d0 + offs_d, D, s_rm, s_rd, s_cn, s_cd, acc,
                            PRECISION, UPCAST)
    return acc


@triton.jit
def _expm1(u):
    """exp(u) - 1 without the cancellation near 0: Taylor to u^9 where |u| < 0.5 (truncation < 6e-10
    relative), exp(u) - 1 elsewhere (a few ulp there). libdevice's expm1 does not run in the interpreter."""
    p = u * (1.0 / 362880.0) + 1.0 / 40320.0
    p = p * u + 1.0 / 5040.0
    p = p * u + 1.0 / 720.0
    p = p * u + 1.0 / 120.0
    p = p * u + 1.0 / 24.0
    p = p * u + 1.0 / 6.0
    p = p * u + 0.5
    p = (p * u + 1.0) * u
    return tl.where(tl.abs(u) < 0.5, p, tl.exp(u) - 1.0)


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1] as 2 atanh(z), z = e / (2 + e) <= 1/3: odd series to z^15 (truncation
    < 2e-9 relative), exact for tiny e where log(1.0 + e) rounds to 0. Branch-free; no libdevice."""
    z = e / (2.0 + e)
    z2 = z * z
    p = z2 * (1.0 / 15.0) + 1.0 / 13.0
    p = p * z2 + 1.0 / 11.0
    p = p * z2 + 1.0 / 9.0
    p = p * z2 + 1.0 / 7.0
    p = p * z2 + 1.0 / 5.0
    p = p * z2 + 1.0 / 3.0
    p = p * z2 + 1.0
    return 2.0 * z * p


@triton.jit
def _clip_grad_tile(dot, scale, bias, offs_m, offs_n, m_ok, n_ok, label_offset, gr, rs, gc, cs, gp,
                    gc_ptr, clse_ptr, Bt, HAS_GR: tl.constexpr, HAS_GC: tl.constexpr, HAS_GP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """G = dL/dx of a CLIP tile in fp32, 0 outside the block: gr_i exp(x - rs_i) + gc_j exp(x - cs_j), with
    x = scale * dot and shift = lse - bias (x excludes the bias). The positive lane (when gp is given)
    takes contrastive.h's clip_positive_grad: gr + gc + gp + gr expm1(x - rs) + gc expm1(x - cs), which
    keeps the small value p - 1 of a confident positive (p - 1 itself would be rounding noise); its
    column's gc and cs are loaded per row (BM loads, not two more masked tile reductions)."""
    x = dot * scale
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_GR:
        g += gr[:, None] * tl.exp(x - rs[:, None])
    if HAS_GC:
        g += gc[None, :] * tl.exp(x - cs[None, :])
    if HAS_GP:
        target = offs_m + label_offset
        n0 = tl.min(offs_n, axis=0)
        # Only tiles crossed by the positives' diagonal have work here.
        if (tl.max(target, axis=0) >= n0) & (tl.min(target, axis=0) < n0 + BLOCK_N):
            hit = target[:, None] == offs_n[None, :]
            xp = tl.sum(tl.where(hit, x, 0.0), axis=1)
            g_pos = gp
            if HAS_GR:
                g_pos += gr + tl.where(gr != 0.0, gr * _expm1(xp - rs), 0.0)
            if HAS_GC:  # the positive's column statistics, loaded per row (rows without one: 0)
                has = m_ok & (target >= n0) & (target < n0 + BLOCK_N) & (target < Bt)
                gc_p = tl.load(gc_ptr + target, mask=has, other=0.0)
                cs_p = tl.load(clse_ptr + target, mask=has, other=0.0) - bias
                g_pos += gc_p + tl.where(gc_p != 0.0, gc_p * _expm1(xp - cs_p), 0.0)
            g = tl.where(hit, g_pos[:, None], g)
    # Padding lanes: exp of a padding logit against a zero shift may be inf (and 0 * inf NaN).
    return tl.where(m_ok[:, None] & n_ok[None, :], g, 0.0)


@triton.jit
def _exp_nonpositive(y):
    """exp(y) for y <= 0 within ~1 ulp from fp32 adds and multiplies only (csrc/cuda/contrastive_loss.cu's
    exp_nonpositive, without fma: the interpreter rounds tl.fma twice). tl.exp is ex2.approx(y * log2(e)) on a
    GPU, whose rounded argument alone put SigLIP's fp32 bias gradient 4.1e-6 of its value off where it cancels
    640-fold (B=128, scale 100; the CUDA kernel's fast_exp, emulated). Cody-Waite: y = k ln2 + r, |r| <= ln2 / 2;
    k * ln2_hi is exact (15 significant bits) and y - k * ln2_hi too (Sterbenz); exp(r) by Taylor to r^8
    (truncation < 2e-10 relative); 2^k from the exponent bits. Below ln(2^-126) it gives 0; NaN stays NaN
    (k's maximum drops a NaN, r keeps it)."""
    k = tl.maximum(tl.floor(y * 1.4426950408889634 + 0.5), -126.0)
    r = (y - k * 0.693145751953125) - k * 1.42860677e-6
    p = r * (1.0 / 40320.0) + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    two_k = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(y < -87.33654, 0.0, p * two_k)


@triton.jit
def _siglip_tile(dot, scale, bias, offs_m, offs_n, m_ok, n_ok, HAS_POS: tl.constexpr, WITH_LOSS: tl.constexpr,
                 WITH_GRAD: tl.constexpr, ACCURATE: tl.constexpr):
    """(loss [BLOCK_M, BLOCK_N], G = dL/dx) of a SigLIP tile in fp32, 0 outside the block (each only when
    asked). Negative pair: softplus(x), sigmoid(x); positive (i == j when HAS_POS): softplus(-x), -sigmoid(-x);
    both from e = exp(-|x|) as contrastive.h's siglip_positive, so neither cancels for large |x|. ACCURATE (the
    terms of the fp32 scalar gradients, which cancel; full-precision dots only: TF32/fp16/bf16 ones are coarser
    than either approximation) takes e from _exp_nonpositive and refines 1 / (1 + e) by a Newton step: `/` is
    div.full.f32 on a GPU, up to 2 ulp, and div_rn's slow path cost 144 more bytes of spills than this in the
    former row-side gradient kernel (ptxas sm_90a)."""
    x = dot * scale + bias
    valid = m_ok[:, None] & n_ok[None, :]
    if HAS_POS:
        pos = offs_m[:, None] == offs_n[None, :]
    else:
        pos = tl.zeros(x.shape, dtype=tl.int1)
    if ACCURATE:
        e = _exp_nonpositive(-tl.abs(x))
    else:
        e = tl.exp(-tl.abs(x))
    nonneg = x >= 0.0
    loss = x
    g = x
    if WITH_LOSS:
        loss = tl.where(valid, tl.maximum(tl.where(pos, -x, x), 0.0) + _log1p_unit(e), 0.0)
    if WITH_GRAD:
        # sigmoid(x) = 1/(1+e) (x >= 0) or e/(1+e); -sigmoid(-x) = -e/(1+e) (x >= 0) or -1/(1+e).
        num = tl.where(pos, tl.where(nonneg, -e, -1.0), tl.where(nonneg, 1.0, e))
        if ACCURATE:  # 1 / (1 + e) refined by one Newton step (fma: exact residual on a GPU)
            d = 1.0 + e
            q = 1.0 / d
            g = tl.where(valid, num * tl.fma(q, tl.fma(-d, q, 1.0), q), 0.0)
        else:
            g = tl.where(valid, num / (1.0 + e), 0.0)
    return loss, g


# ---- CLIP forward --------------------------------------------------------------------------------
@triton.jit
def _band(band, bands, tiles):
    """Tiles [lo, hi) of band `band` of `bands`: an even split, band sizes differ by at most one tile."""
    return band * tiles // bands, (band + 1) * tiles // bands


@triton.jit
def _clip_fwd_kernel(r_ptr, c_ptr, scale_ptr, bias_ptr, rmax_ptr, rsum_ptr, cmax_ptr, csum_ptr, pos_ptr,
                     Bi, Bt, D, label_offset, NB_R, NB_C, s_rm, s_rd, s_cn, s_cd,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (band_r, band_c) sweeps the [BLOCK_M, BLOCK_N] tiles of row band band_r x column band band_c,
    row tile by row tile. The running (max, sum-exp) of the current row tile over the band's columns stays
    in registers and goes to rmax/rsum[band_c, rows] when the row tile is done; the running column
    statistics over the band's rows live in cmax/csum[band_r, band's columns], a slice only this program
    touches (no atomics). Each tile also stores the positive logits of the rows whose positive it holds."""
    pid = tl.program_id(0)
    band_r = pid // NB_C
    band_c = pid % NB_C
    m_lo, m_hi = _band(band_r, NB_R, tl.cdiv(Bi, BLOCK_M))
    n_lo, n_hi = _band(band_c, NB_C, tl.cdiv(Bt, BLOCK_N))
    scale = tl.load(scale_ptr)
    cmax_ptr += band_r.to(tl.int64) * Bt
    csum_ptr += band_r.to(tl.int64) * Bt
    for tile_m in range(m_lo, m_hi):
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Bi
        m_row = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        s_row = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for tile_n in range(n_lo, n_hi):
            n0 = tile_n * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Bt
            x = _dots_tile(r_ptr, c_ptr, offs_m, offs_n, m_ok, n_ok, D, s_rm, s_rd, s_cn, s_cd,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, False) * scale
            # Rows: online log-sum-exp over the band's columns (two exps per logit in all: a shared tile max
            # would underflow rows far below the tile's top row, scale 100 spreads logits over ~200).
            xr = tl.where(n_ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m_row, tl.max(xr, axis=1))
            off = _safe_max(m_new)
            s_row = s_row * tl.exp(m_row - off) + tl.sum(tl.exp(xr - off[:, None]), axis=1)
            m_row = m_new
            # Columns: merge this tile's rows into the band's running statistics ((-inf, 0) before its first
            # row tile, so the scratch needs no initialisation).
            seen = n_ok & (tile_m > m_lo)
            m_col = tl.load(cmax_ptr + offs_n, mask=seen, other=float("-inf"))
            s_col = tl.load(csum_ptr + offs_n, mask=seen, other=0.0)
            xc = tl.where(m_ok[:, None], x, float("-inf"))
            m_new_c = tl.maximum(m_col, tl.max(xc, axis=0))
            off_c = _safe_max(m_new_c)
            s_col = s_col * tl.exp(m_col - off_c) + tl.sum(tl.exp(xc - off_c[None, :]), axis=0)
            tl.store(cmax_ptr + offs_n, m_new_c, mask=n_ok)
            tl.store(csum_ptr + offs_n, s_col, mask=n_ok)
            # The next row tile reloads these columns in this program; threads of the block may hold other
            # lanes of the load than of the store, so the stores must be visible block-wide first.
            tl.debug_barrier()
            # Positive logits of the rows whose column i + label_offset lies in this tile (pos_ptr is zeroed).
            target = offs_m + label_offset
            if (tl.max(target, axis=0) >= n0) & (tl.min(target, axis=0) < n0 + BLOCK_N):
                hit = target[:, None] == offs_n[None, :]
                pos = tl.sum(tl.where(hit, x, 0.0), axis=1)
                if HAS_BIAS:
                    pos += tl.load(bias_ptr)
                has = m_ok & (target >= n0) & (target < n0 + BLOCK_N) & (target < Bt)
                tl.store(pos_ptr + offs_m, pos, mask=has)
        tl.store(rmax_ptr + band_c.to(tl.int64) * Bi + offs_m, m_row, mask=m_ok)
        tl.store(rsum_ptr + band_c.to(tl.int64) * Bi + offs_m, s_row, mask=m_ok)


@triton.jit
def _lse_combine_kernel(max_ptr, sum_ptr, bias_ptr, lse_ptr, N, T, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """lse[n] = log sum_t sum_t[n] exp(max_t[n]) (+ bias) over the T per-band partials [T, N], in band order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    m_run = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, T):
        m = tl.load(max_ptr + t * N + offs, mask=ok, other=float("-inf"))
        l = tl.load(sum_ptr + t * N + offs, mask=ok, other=0.0)
        m_new = tl.maximum(m_run, m)
        off = _safe_max(m_new)
        l_run = l_run * tl.exp(m_run - off) + l * tl.exp(m - off)
        m_run = m_new
    lse = m_run + tl.log(tl.where(ok, l_run, 1.0))  # padding lanes: no log(0) (numpy warns under the interpreter)
    if HAS_BIAS:
        lse += tl.load(bias_ptr)
    tl.store(lse_ptr + offs, lse, mask=ok)


# ---- gradient kernel ------------------------------------------------------------------------------
@triton.jit
def _optional_stats(ptr, offs, ok, shift, PRESENT: tl.constexpr, BLOCK: tl.constexpr):
    """ptr[offs] - shift (lanes outside the block read 0 - shift; their G is masked) when the gradient
    input is present, else zeros: the per-row and per-column CLIP inputs of the gradient kernel."""
    if PRESENT:
        return tl.load(ptr + offs, mask=ok, other=0.0) - shift
    return tl.zeros((BLOCK,), dtype=tl.float32)


@triton.jit
def _grad_tile_kernel(r_ptr, c_ptr, scale_ptr, bias_ptr, rlse_ptr, clse_ptr, gr_ptr, gc_ptr, gp_ptr, factor_ptr,
                      g_ptr, stats_ptr, Bi, Bt, D, label_offset, c0, W, TILES, s_rm, s_rd, s_cn, s_cd,
                      SIGLIP: tl.constexpr, HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GR: tl.constexpr,
                      HAS_GC: tl.constexpr, HAS_GP: tl.constexpr, HAS_FACTOR: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Program (row tile, column tile of the chunk [c0, c0 + W)): G = dL/dx of its tile from the recomputed
    dots, times the fp16 gradient factor, into g[rows, columns - c0] (the chunk buffer, row stride W), and the
    tile's per-row sum(G * dot), sum(G) (and SigLIP's loss) into stats[k, tile, rows] (k = 0, 1, 2; TILES
    column tiles per chunk). One GEMM of the chunk's dots; the gradient GEMMs run in cuBLAS (_gradients)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Bi
    offs_n = c0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # absolute columns: positives and stats index them
    n_ok = offs_n < c0 + W
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr) if HAS_BIAS else 0.0
    # SigLIP's scalar sums cancel (see _dots_tile and _siglip_tile): split dots and accurate fp32 terms.
    dot = _dots_tile(r_ptr, c_ptr, offs_m, offs_n, m_ok, n_ok, D, s_rm, s_rd, s_cn, s_cd,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, SIGLIP)
    if SIGLIP:
        loss, g = _siglip_tile(dot, scale, bias, offs_m, offs_n, m_ok, n_ok, HAS_POS, True, True,
                               PRECISION == "ieee")
        tl.store(stats_ptr + (2 * TILES + pid_n) * Bi + offs_m, tl.sum(loss, axis=1), mask=m_ok)
    else:
        gr = _optional_stats(gr_ptr, offs_m, m_ok, 0.0, HAS_GR, BLOCK_M)
        rs = _optional_stats(rlse_ptr, offs_m, m_ok, bias, HAS_GR, BLOCK_M)
        gp = _optional_stats(gp_ptr, offs_m, m_ok, 0.0, HAS_GP, BLOCK_M)
        gc = _optional_stats(gc_ptr, offs_n, n_ok, 0.0, HAS_GC, BLOCK_N)
        cs = _optional_stats(clse_ptr, offs_n, n_ok, bias, HAS_GC, BLOCK_N)
        g = _clip_grad_tile(dot, scale, bias, offs_m, offs_n, m_ok, n_ok, label_offset, gr, rs, gc, cs, gp,
                            gc_ptr, clse_ptr, Bt, HAS_GR, HAS_GC, HAS_GP, BLOCK_M, BLOCK_N)
    tl.store(stats_ptr + pid_n * Bi + offs_m, tl.sum(g * dot, axis=1), mask=m_ok)
    tl.store(stats_ptr + (TILES + pid_n) * Bi + offs_m, tl.sum(g, axis=1), mask=m_ok)
    if HAS_FACTOR:
        g = g * tl.load(factor_ptr)
    rows = offs_m.to(tl.int64)
    store_rounded(g_ptr + rows[:, None] * W + (offs_n - c0)[None, :], g, m_ok[:, None] & n_ok[None, :],
                  r_ptr.dtype.element_ty == tl.bfloat16, UPCAST)


# ---- SigLIP loss without gradients ---------------------------------------------------------------
@triton.jit
def _siglip_loss_kernel(r_ptr, c_ptr, scale_ptr, bias_ptr, part_ptr, Bi, Bt, D, NB_R, NB_C, s_rm, s_rd, s_cn, s_cd,
                        HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """compute_grad=False: program (band_r, band_c) sums the loss of each row of its row band over the
    columns of its column band (in registers, one row tile at a time) into part[band_c, rows]; one GEMM."""
    pid = tl.program_id(0)
    band_r = pid // NB_C
    band_c = pid % NB_C
    m_lo, m_hi = _band(band_r, NB_R, tl.cdiv(Bi, BLOCK_M))
    n_lo, n_hi = _band(band_c, NB_C, tl.cdiv(Bt, BLOCK_N))
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr) if HAS_BIAS else 0.0
    for tile_m in range(m_lo, m_hi):
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Bi
        row_loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for tile_n in range(n_lo, n_hi):
            offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Bt
            dot = _dots_tile(r_ptr, c_ptr, offs_m, offs_n, m_ok, n_ok, D, s_rm, s_rd, s_cn, s_cd,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST, False)
            loss, _ = _siglip_tile(dot, scale, bias, offs_m, offs_n, m_ok, n_ok, HAS_POS, True, False, False)
            row_loss += tl.sum(loss, axis=1)
        tl.store(part_ptr + band_c.to(tl.int64) * Bi + offs_m, row_loss, mask=m_ok)


# ---- host side: checks, block sizes, launches ----------------------------------------------------
def _vector(name: str, t: Optional[torch.Tensor], size: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """A [size] fp32 statistic or upstream gradient on like's device (contiguous: it may come expanded)."""
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"mmfast: {name} must have shape [{size}], got {list(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"mmfast: {name} must be torch.float32, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"mmfast: {name} is on {t.device} but rows is on {like.device}")
    return t.contiguous()


# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per kernel family ("backward": _grad_tile_kernel). Under
# the interpreter every program and loop iteration costs tens of ms of Python whatever its size, so it gets
# Triton's largest tile (2^20 elements; measured at B=8192 fp16: 1024 x 1024 tiles 1.4x faster than 512 x 1024).
# GPU forward: benchmarks/_triton_sweep.py on an H200 (Triton 3.6, 2026-12-04; results/nvidia-h200/
# 2026-12-04-1840/triton-sweep.txt), the fastest of 5-7 candidates. GPU backward: NOT measured; the forward's
# tiles (the same single-GEMM tile loop, no accumulator across the features), 8 warps for fp32 where SigLIP's
# split dots spilled with 4 (ptxas sm_90a, the former row kernel).
_BLOCKS = {
    "interpret": {"forward": (1024, 1024, 256, 4, 1), "backward": (1024, 1024, 256, 4, 1)},
    "fp32": {"forward": (64, 64, 32, 4, 2), "backward": (64, 64, 32, 8, 2)},
    "half": {"forward": (128, 64, 64, 4, 3), "backward": (128, 64, 64, 4, 3)},
}
apply_block_overrides("contrastive_loss", _BLOCKS)


def _table(dtype: torch.dtype) -> str:
    """This process's _BLOCKS table for inputs of `dtype`."""
    return "interpret" if INTERPRET else ("fp32" if dtype == torch.float32 else "half")


def _blocks(kind: str, bi: int, bt: int, d: int, dtype: torch.dtype, table: Optional[str] = None):
    """_BLOCKS[table or this process's][kind] clamped to the problem (every tl.dot dimension stays >= 16)."""
    bm, bn, bd, warps, stages = _BLOCKS[table or _table(dtype)][kind]
    return (pow2_block(bi, MIN_DOT_BLOCK, bm), pow2_block(bt, MIN_DOT_BLOCK, bn), pow2_block(d, MIN_DOT_BLOCK, bd),
            warps, stages)


# The forward kernels split the tile grid into at most MAX_BANDS row bands x MAX_BANDS column bands, one
# program each: min(tiles, MAX_BANDS) bands per side. A side of at most MAX_BANDS tiles gets one band per
# tile (a small block keeps one program per tile, for the SMs to share), a larger block at most 256
# programs (~2 per SM of an H100's 132), whose scratch is 2 x 4 bytes x MAX_BANDS per row and per column:
# O(Bi + Bt), independent of B^2. The band counts depend on the shape and dtype only, never on the device,
# so a result is the same whichever GPU computes it. NOT tuned on a GPU (16 keeps the scratch below the
# fp16 features' own size for D >= 128 while every H100 SM gets a program).
MAX_BANDS = 16


def _forward_plan(op: str, bi: int, bt: int, d: int, dtype: torch.dtype, table: Optional[str] = None):
    """(blocks, (row bands, column bands), {scratch name: shape}) of a forward launch; op "clip" or "siglip"
    (compute_grad=False). The scratch tensors are fp32 and all the forward allocates besides its outputs."""
    blocks = _blocks("forward", bi, bt, d, dtype, table)
    nb_r = min(triton.cdiv(bi, blocks[0]), MAX_BANDS)
    nb_c = min(triton.cdiv(bt, blocks[1]), MAX_BANDS)
    if op == "clip":
        scratch = {"row_partials": (2, nb_c, bi), "col_partials": (2, nb_r, bt)}  # (max, sum-exp) per band
    elif op == "siglip":
        scratch = {"row_loss_partials": (nb_c, bi)}
    else:
        raise ValueError(f"mmfast: op must be 'clip' or 'siglip', got {op!r}")
    return blocks, (nb_r, nb_c), scratch


def forward_scratch_shapes(op: str, bi: int, bt: int, d: int, dtype: torch.dtype = torch.float16,
                           table: Optional[str] = None) -> dict:
    """{name: shape} of the fp32 scratch the forward of `op` ("clip", or "siglip" without gradients) allocates
    for rows [bi, d] and cols [bt, d]; table: a _BLOCKS key ("interpret", "fp32", "half"), default this
    process's. The launchers allocate exactly these (tests check the sizes grow as bi + bt)."""
    return _forward_plan(op, bi, bt, d, dtype, table)[2]


def _dtype_flags(rows: torch.Tensor) -> dict:
    return dict(PRECISION=dot_precision(rows.dtype), UPCAST=INTERPRET and rows.dtype != torch.float32)


def _lse(maxes: torch.Tensor, sums: torch.Tensor, bias: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    parts, n = maxes.shape
    out = torch.empty(n, device=like.device, dtype=torch.float32)
    block = pow2_block(n, 16, 65536 if INTERPRET else 1024)
    _lse_combine_kernel[(triton.cdiv(n, block),)](maxes, sums, like if bias is None else bias, out, n, parts,
                                                  HAS_BIAS=bias is not None, BLOCK=block)
    return out


def _clip_forward(rows, cols, scale, bias, label_offset: int):
    bi, d = rows.shape
    bt = cols.shape[0]
    (bm, bn, bd, warps, stages), (nb_r, nb_c), shapes = _forward_plan("clip", bi, bt, d, rows.dtype)
    dev = rows.device
    row_part = torch.empty(shapes["row_partials"], device=dev, dtype=torch.float32)
    col_part = torch.empty(shapes["col_partials"], device=dev, dtype=torch.float32)
    pos = torch.zeros(bi, device=dev, dtype=torch.float32)  # rows whose positive is outside the block: 0
    _clip_fwd_kernel[(nb_r * nb_c,)](
        rows, cols, scale, scale if bias is None else bias, row_part[0], row_part[1], col_part[0], col_part[1], pos,
        bi, bt, d, label_offset, nb_r, nb_c, rows.stride(0), rows.stride(1), cols.stride(0), cols.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        **_dtype_flags(rows))
    return _lse(row_part[0], row_part[1], bias, rows), _lse(col_part[0], col_part[1], bias, rows), pos


# The chunk buffer G[Bi, W] of _gradients stays within this many bytes (W >= one column tile): 256 MB, the CUDA
# backend's fp32 scratch. At Bi = Bt = 65536 in bf16 that is W = 2048, 32 chunks of 2 x 206 GFLOP of cuBLAS
# GEMMs each (NOT timed on a GPU yet).
GRAD_CHUNK_BYTES = 1 << 28


def _fp16_gradient_factor(bound: torch.Tensor) -> torch.Tensor:
    """2^(12 - e) for the bound < 2^e on |G| (1 for 0, inf or NaN), on the device (no host sync): the CUDA
    backend's gradient_factor_kernel. f * G stays below 2^12 (16x under fp16's largest value) while the
    ~1/B-sized CLIP coefficients and SigLIP's sigmoid(-10) negatives move above fp16's smallest normal 2^-14."""
    usable = (bound > 0) & torch.isfinite(bound)
    exponent = torch.frexp(torch.where(usable, bound, torch.ones_like(bound))).exponent
    k = torch.where(usable, (12 - exponent).clamp(-100, 100), torch.zeros_like(exponent))
    return torch.exp2(k.float())


def _gradients(rows, cols, scale, bias, *, siglip: bool, has_positives: bool = False, label_offset: int = 0,
               row_lse=None, col_lse=None, grad_row=None, grad_col=None, grad_pos=None):
    """(grad_rows, grad_cols, grad_scale, grad_bias, SigLIP's loss sum or None): per column chunk, G from
    _grad_tile_kernel, then grad_rows += G @ cols[chunk] and grad_cols[chunk] = G^T @ rows in cuBLAS."""
    bi, d = rows.shape
    bt = cols.shape[0]
    bm, bn, bd, warps, stages = _blocks("backward", bi, bt, d, rows.dtype)
    dev = rows.device
    flags = _dtype_flags(rows)
    # fp16 G is scaled by a power of two, undone with the scale after the GEMMs. |G| <= |grad_row| + |grad_col|
    # + |grad_pos| for CLIP (probabilities <= 1), <= 1 for SigLIP.
    factor = None
    if rows.dtype == torch.float16:
        if siglip:
            bound = torch.ones((), device=dev)
        else:
            bound = sum(t.abs().max() for t in (grad_row, grad_col, grad_pos) if t is not None and t.numel())
            bound = torch.as_tensor(bound, dtype=torch.float32, device=dev)
        factor = _fp16_gradient_factor(bound)
    coef = scale if factor is None else scale / factor
    # Under the interpreter G is held in fp32 (rounded to the features' dtype in the kernel): no numpy casts.
    g_dtype = torch.float32 if flags["UPCAST"] else rows.dtype
    item = torch.finfo(g_dtype).bits // 8
    width = min(bt, max(bn, GRAD_CHUNK_BYTES // (max(bi, 1) * item) // bn * bn))
    tiles = triton.cdiv(width, bn)
    g_buf = torch.empty(bi * width, device=dev, dtype=g_dtype)
    stats = torch.empty(3, tiles, bi, device=dev, dtype=torch.float32)  # sum(G * dot), sum(G), loss per tile
    sums = torch.zeros(3, device=dev, dtype=torch.float64)
    acc_rows = torch.zeros(bi, d, device=dev, dtype=torch.float32)
    grad_cols = torch.empty(bt, d, device=dev, dtype=rows.dtype)
    dummy = scale  # stands in for pointers a mode does not read
    ptrs = (rows, cols, scale, dummy if bias is None else bias, dummy if row_lse is None else row_lse,
            dummy if col_lse is None else col_lse, dummy if grad_row is None else grad_row,
            dummy if grad_col is None else grad_col, dummy if grad_pos is None else grad_pos,
            dummy if factor is None else factor)
    for c0 in range(0, bt, max(width, 1)):
        w = min(width, bt - c0)
        g = g_buf[:bi * w].view(bi, w)
        grid = (triton.cdiv(bi, bm), triton.cdiv(w, bn))
        _grad_tile_kernel[grid](
            *ptrs, g, stats, bi, bt, d, label_offset, c0, w, tiles, rows.stride(0), rows.stride(1), cols.stride(0),
            cols.stride(1), SIGLIP=siglip, HAS_POS=has_positives, HAS_BIAS=bias is not None,
            HAS_GR=grad_row is not None, HAS_GC=grad_col is not None, HAS_GP=grad_pos is not None,
            HAS_FACTOR=factor is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
            **flags)
        # The per-(row, tile) partials add up in fp64 (fixed-order torch reductions, deterministic): an fp32 sum
        # moved SigLIP's bias gradient by 2e-6 of its value at B=128, scale 100 (interpreter), where it cancels
        # 640-fold.
        sums += stats[:, :grid[1]].double().sum((1, 2))
        acc_rows = mm_fp32(g, cols[c0:c0 + w], acc_rows)
        grad_cols[c0:c0 + w] = (mm_fp32(g.t(), rows) * coef).to(rows.dtype)
    grad_rows = (acc_rows * coef).to(rows.dtype)
    return grad_rows, grad_cols, sums[0].float(), sums[1].float(), sums[2].float() if siglip else None


# ---- the operators -------------------------------------------------------------------------------
@torch.library.custom_op(
    "mmfast::clip_loss_block_triton", mutates_args=(),
    schema="(Tensor rows, Tensor cols, Tensor logit_scale, Tensor? logit_bias, int label_offset) "
           "-> (Tensor row_lse, Tensor col_lse, Tensor pos_logits)")
def clip_loss_block_triton(rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor,
                           logit_bias: Optional[torch.Tensor], label_offset: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "clip_loss_block_triton"
    check_feature_pair(op, ("rows", "cols"), rows, cols)
    scale, bias = optional_scalar("logit_scale", logit_scale, rows), optional_scalar("logit_bias", logit_bias, rows)
    with device_guard(rows):
        return _clip_forward(rows, cols, scale, bias, label_offset)


@torch.library.custom_op(
    "mmfast::clip_loss_block_backward_triton", mutates_args=(),
    schema="(Tensor rows, Tensor cols, Tensor logit_scale, Tensor? logit_bias, int label_offset, Tensor row_lse, "
           "Tensor col_lse, Tensor? grad_row_lse, Tensor? grad_col_lse, Tensor? grad_pos_logits) "
           "-> (Tensor grad_rows, Tensor grad_cols, Tensor grad_logit_scale, Tensor grad_logit_bias)")
def clip_loss_block_backward_triton(rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor,
                                    logit_bias: Optional[torch.Tensor], label_offset: int, row_lse: torch.Tensor,
                                    col_lse: torch.Tensor, grad_row_lse: Optional[torch.Tensor],
                                    grad_col_lse: Optional[torch.Tensor], grad_pos_logits: Optional[torch.Tensor]
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "clip_loss_block_backward_triton"
    check_feature_pair(op, ("rows", "cols"), rows, cols)
    scale, bias = optional_scalar("logit_scale", logit_scale, rows), optional_scalar("logit_bias", logit_bias, rows)
    bi, bt = rows.shape[0], cols.shape[0]
    row_lse, col_lse = _vector("row_lse", row_lse, bi, rows), _vector("col_lse", col_lse, bt, rows)
    grad_row = _vector("grad_row_lse", grad_row_lse, bi, rows)
    grad_col = _vector("grad_col_lse", grad_col_lse, bt, rows)
    grad_pos = _vector("grad_pos_logits", grad_pos_logits, bi, rows)
    with device_guard(rows):
        gr, gc, gs, gb, _ = _gradients(rows, cols, scale, bias, siglip=False, label_offset=label_offset,
                                       row_lse=row_lse, col_lse=col_lse, grad_row=grad_row, grad_col=grad_col,
                                       grad_pos=grad_pos)
    return gr, gc, gs, gb


@torch.library.custom_op(
    "mmfast::siglip_loss_block_triton", mutates_args=(),
    schema="(Tensor rows, Tensor cols, Tensor logit_scale, Tensor? logit_bias, bool has_positives, "
           "bool compute_grad) -> (Tensor loss_sum, Tensor grad_rows, Tensor grad_cols, Tensor grad_logit_scale, "
           "Tensor grad_logit_bias)")
def siglip_loss_block_triton(rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor,
                             logit_bias: Optional[torch.Tensor], has_positives: bool, compute_grad: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "siglip_loss_block_triton"
    check_feature_pair(op, ("rows", "cols"), rows, cols)
    scale, bias = optional_scalar("logit_scale", logit_scale, rows), optional_scalar("logit_bias", logit_bias, rows)
    bi, d = rows.shape
    bt = cols.shape[0]
    with device_guard(rows):
        if compute_grad:
            gr, gc, gs, gb, loss_sum = _gradients(rows, cols, scale, bias, siglip=True, has_positives=has_positives)
            return loss_sum, gr, gc, gs, gb
        (bm, bn, bd, warps, stages), (nb_r, nb_c), shapes = _forward_plan("siglip", bi, bt, d, rows.dtype)
        part = torch.empty(shapes["row_loss_partials"], device=rows.device, dtype=torch.float32)
        _siglip_loss_kernel[(nb_r * nb_c,)](
            rows, cols, scale, scale if bias is None else bias, part, bi, bt, d, nb_r, nb_c, rows.stride(0),
            rows.stride(1), cols.stride(0), cols.stride(1), HAS_POS=has_positives, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages, **_dtype_flags(rows))
    # Four distinct empty tensors: outputs must not alias one another.
    return (part.sum(), rows.new_empty(0), rows.new_empty(0), rows.new_empty(0, dtype=torch.float32),
            rows.new_empty(0, dtype=torch.float32))
