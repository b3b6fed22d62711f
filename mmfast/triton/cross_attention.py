"""Triton kernels of cross_attention: out = softmax(scale * q @ cat(k, k2)^T) @ cat(v, v2) (FlashAttention-2).

Operators defined here (schemas mirror csrc/mmfast.cpp with "_triton" appended; fake impls and autograd are
registered by mmfast/ops/cross_attention.py right after this module is imported; the layout conventions are
in that file's docstring):
  mmfast::cross_attention_triton            -> (out, lse)
  mmfast::cross_attention_backward_triton   -> (grad_q, grad_k, grad_v, grad_k2, grad_v2)

q [B, H, Lq, d], k/v [B, H, Lk, d], optional k2/v2 [B, H, Lk2, d]. Every tensor is read through its four
strides (permuted heads, a transposed head dim and stride-0 batch expansion cost no copy) and never written.
The two key/value segments are never concatenated: each key loop walks segment 1's tiles, then segment 2's.
Head dims 16..128; the head-dim block is the next power of two and masked (96 -> 128, 40 -> 64).

Forward: one program per (head, block of BLOCK_M queries) streams key tiles with online softmax: running
max m and sum l in fp32, O rescaled by exp(m_old - m_new); out = O / l, lse = m + log(l). P is rounded to
v's dtype for the P @ V product (fp16/bf16), as in FlashAttention; every accumulator is fp32.

Split-K (flash-decoding) forward for few queries per head: SAM's token->image attention has 7 queries and
4096 keys of d=16 per head, so the plain grid has B*H programs (8..128), far from filling a GPU. When
B*H*ceil(Lq/BLOCK_M) < SPLIT_K_MIN_PROGRAMS (2 programs per SM of an assumed 132-SM H100), the keys of
each head are cut into `splits` chunks of whole BLOCK_N tiles,
    splits = min(ceil(SPLIT_K_MIN_PROGRAMS / programs), total_keys // SPLIT_K_MIN_KEYS)   (no split if <= 1),
each (head, query block, chunk) program writes its normalized partial out (fp32) and lse, and a merge
kernel combines the chunks by log-sum-exp: out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s.
SPLIT_K_MIN_KEYS keeps >= 4 tiles of 64 keys per chunk so a chunk's work outweighs writing its partial row
block and merging it. Both thresholds are module attributes (tests lower/raise them to force either path);
forward_splits() says which path given inputs take.

Backward (FA2): delta = rowsum(dO * O) per query (fp32, one small row kernel), then
  * a key-side kernel, one program per (head, BLOCK_N keys of one segment): loops over every query block,
    recomputes P^T = exp(scale K Q^T - lse), dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T Q,
    with dK, dV in fp32 registers, written once (times scale for dK);
  * a query-side kernel, one program per (head, BLOCK_M queries): loops over both segments' key tiles,
    dQ += dS K, written once. No atomics: every gradient element has one writer (deterministic).
P and dS are rounded to the operand dtype before their products (fp16/bf16), as in FlashAttention.

Program order: programs walk heads in head-major order (h outer, b inner), so consecutive programs read
the same K/V when K/V are expanded over the batch with stride 0 (SAM: one image's keys for many prompts),
the same order as the CPU kernel (csrc/cpu/cross_attention.cpp). All of (head, block) is flattened into
grid axis 0 (axis 1 and 2 are limited to 65535 on CUDA).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mmfast.backend import KERNEL_DTYPES
from mmfast.ops._checks import check_tensor
from mmfast.triton._utils import (INTERPRET, MIN_DOT_BLOCK, apply_block_overrides, check_launchable, device_guard,
                                  dot_precision, pow2_block)

# Split-K rule (see the module docstring). 132 = SMs of an H100 SXM; 2 resident programs per SM.
NUM_SMS_ASSUMED = 132
SPLIT_K_MIN_PROGRAMS = 2 * NUM_SMS_ASSUMED
SPLIT_K_MIN_KEYS = 256


# ---- forward -------------------------------------------------------------------------------------------
@triton.jit
def _fwd_keys(acc, m_i, l_i, q, k_base, v_base, s_kl, s_kd, s_vl, s_vd, start, end, scale, offs_d, d_ok,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q [BLOCK_M, BLOCK_D] against keys start..end-1 of one segment, BLOCK_N at a time.
    Per tile: 4 * BLOCK_M * BLOCK_N * d FLOPs for 2 * BLOCK_N * d loads."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        rows = offs_n.to(tl.int64)
        kt = tl.load(k_base + rows[None, :] * s_kl + offs_d[:, None] * s_kd, mask=d_ok[:, None] & n_ok[None, :],
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # Every tile holds >= 1 real key, so m_new is finite for finite logits and exp(-inf - m_new) = 0 on
        # the first tile; a NaN logit makes p (hence l and the row) NaN whatever max does with it.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rows[:, None] * s_vl + offs_d[None, :] * s_vd, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _query_block(pid, B, LQ, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program pid's head (b, h; head-major order, module docstring) and its block of query rows, with the
    row and head-dim masks (shared by the forward and the dQ kernel)."""
    m_blocks = tl.cdiv(LQ, BLOCK_M)
    t = pid // m_blocks
    b, h = (t % B).to(tl.int64), (t // B).to(tl.int64)
    offs_m = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return b, h, offs_m.to(tl.int64), offs_m < LQ, offs_d, offs_d < D


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, out_ptr, lse_ptr,
                     B, H, LQ, LK, LK2, D, scale, chunk,
                     s_qb, s_qh, s_ql, s_qd, s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd,
                     s_k2b, s_k2h, s_k2l, s_k2d, s_v2b, s_v2h, s_v2l, s_v2d, s_ob, s_oh, s_ol, s_od,
                     HAS_K2: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """BLOCK_M queries of one head against keys [split * chunk, (split + 1) * chunk) of the concatenated
    stream (all of it when not SPLIT). Writes out (q's dtype, through its strides) and lse [B*H, LQ]; SPLIT:
    the normalized partial out in fp32 to out_ptr [splits, B*H, LQ, D] and its lse to lse_ptr [splits, B*H, LQ]."""
    split = tl.program_id(1)
    b, h, rows, m_ok, offs_d, d_ok = _query_block(tl.program_id(0), B, LQ, D, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, LK + LK2)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_ptr + b * s_kb + h * s_kh, v_ptr + b * s_vb + h * s_vh,
                              s_kl, s_kd, s_vl, s_vd, lo, tl.minimum(hi, LK), scale, offs_d, d_ok, BLOCK_N, PRECISION)
    if HAS_K2:
        acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k2_ptr + b * s_k2b + h * s_k2h, v2_ptr + b * s_v2b + h * s_v2h,
                                  s_k2l, s_k2d, s_v2l, s_v2d, tl.maximum(lo, LK) - LK, hi - LK, scale, offs_d, d_ok,
                                  BLOCK_N2, PRECISION)
    out = acc / l_i[:, None]
    lse = m_i + tl.log(l_i)
    bh_rows = (b * H + h) * LQ + rows
    mask = m_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part_rows = split.to(tl.int64) * B * H * LQ + bh_rows
        tl.store(out_ptr + part_rows[:, None] * D + offs_d[None, :], out, mask=mask)
        tl.store(lse_ptr + part_rows, lse, mask=m_ok)
    else:
        tl.store(out_ptr + b * s_ob + h * s_oh + rows[:, None] * s_ol + offs_d[None, :] * s_od,
                 out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_ptr + bh_rows, lse, mask=m_ok)


@triton.jit
def _row_offsets(R, H, LQ, s_b, s_h, s_l, BLOCK_R: tl.constexpr):
    """BLOCK_R rows r = (b*H + h)*LQ + i of the flattened [B, H, LQ] query rows: (r, valid, offset of row r
    in a tensor of strides (s_b, s_h, s_l)). Row kernels take rows across heads: SAM's 7 queries per head
    would leave 9 of 16 lanes of a per-head block idle."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = r // LQ
    return r, r < R, (t // H) * s_b + (t % H) * s_h + (r % LQ) * s_l


@triton.jit
def _split_merge_kernel(part_ptr, part_lse_ptr, out_ptr, lse_ptr, R, H, LQ, D, SPLITS, s_ob, s_oh, s_ol, s_od,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine the splits' (out_s, lse_s) of BLOCK_R query rows: a running log-sum-exp over the splits.
    Reads SPLITS * (D + 1) fp32 per row, writes D + 1."""
    r, r_ok, out_off = _row_offsets(R, H, LQ, s_ob, s_oh, s_ol, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in range(SPLITS):
        part_rows = s * R + r
        lse_s = tl.load(part_lse_ptr + part_rows, mask=r_ok, other=0.0)
        out_s = tl.load(part_ptr + part_rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        alpha = tl.exp(m_i - m_new)
        w = tl.exp(lse_s - m_new)  # a NaN lse_s (NaN logits in that chunk) makes the row NaN
        acc = acc * alpha[:, None] + w[:, None] * out_s
        l_i = l_i * alpha + w
        m_i = m_new
    tl.store(out_ptr + out_off[:, None] + offs_d[None, :] * s_od, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(lse_ptr + r, m_i + tl.log(l_i), mask=r_ok)


# ---- backward ------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(do_ptr, o_ptr, delta_ptr, R, H, LQ, D, s_gb, s_gh, s_gl, s_gd, s_ob, s_oh, s_ol, s_od,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[(b*H + h)*LQ + i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32, BLOCK_R rows per program."""
    r, r_ok, do_off = _row_offsets(R, H, LQ, s_gb, s_gh, s_gl, BLOCK_R)
    _, _, o_off = _row_offsets(R, H, LQ, s_ob, s_oh, s_ol, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    do = tl.load(do_ptr + do_off[:, None] + offs_d[None, :] * s_gd, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + o_off[:, None] + offs_d[None, :] * s_od, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + r, tl.sum(do * o, axis=1), mask=r_ok)


@triton.jit
def _bwd_kv_tile(q_base, do_base, stats_row0, lse_ptr, delta_ptr, k_base, v_base, dk_base, dv_base,
                 s_ql, s_qd, s_gl, s_gd, s_kl, s_kd, s_vl, s_vd, s_dkl, s_dkd, s_dvl, s_dvd,
                 n0, L, LQ, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """dK, dV of keys n0..n0+BLOCK_N-1 of one segment (length L) over all LQ queries of the head.
    Per query block: 8 * BLOCK_M * BLOCK_N * d FLOPs for 2 * BLOCK_M * d loads (Q, dO)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    keys = offs_n.to(tl.int64)
    k = tl.load(k_base + keys[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + keys[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, LQ, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < LQ
        rows = offs_m.to(tl.int64)
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * s_ql + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * s_gl + offs_d[None, :] * s_gd, mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + stats_row0 + rows, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + stats_row0 + rows, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # S^T [BLOCK_N, BLOCK_M]
        # Padding queries and keys get P = 0 (their q/k rows are 0, so exp(0 - lse) would not be).
        pt = tl.where(n_ok[:, None] & m_ok[None, :], tl.exp(st - lse[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    tl.store(dk_base + keys[:, None] * s_dkl + offs_d[None, :] * s_dkd, (dk * scale).to(dk_base.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_base + keys[:, None] * s_dvl + offs_d[None, :] * s_dvd, dv.to(dv_base.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _bwd_kv_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, dk_ptr, dv_ptr, dk2_ptr, dv2_ptr,
                   B, H, LQ, LK, LK2, D, scale, TILES_1, TILES_2,
                   s_qb, s_qh, s_ql, s_qd, s_gb, s_gh, s_gl, s_gd,
                   s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd, s_k2b, s_k2h, s_k2l, s_k2d,
                   s_v2b, s_v2h, s_v2l, s_v2d, s_dkb, s_dkh, s_dkl, s_dkd, s_dvb, s_dvh, s_dvl, s_dvd,
                   s_dk2b, s_dk2h, s_dk2l, s_dk2d, s_dv2b, s_dv2h, s_dv2l, s_dv2d,
                   HAS_K2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile: tiles 0..TILES_1-1 of a head are segment 1's (k, v), the next TILES_2 segment 2's."""
    pid = tl.program_id(0)
    tiles = TILES_1 + TILES_2
    t = pid // tiles
    b, h = (t % B).to(tl.int64), (t // B).to(tl.int64)  # head-major order (module docstring)
    tile = pid % tiles
    q_base = q_ptr + b * s_qb + h * s_qh
    do_base = do_ptr + b * s_gb + h * s_gh
    stats_row0 = (b * H + h) * LQ
    if tile < TILES_1:
        _bwd_kv_tile(q_base, do_base, stats_row0, lse_ptr, delta_ptr, k_ptr + b * s_kb + h * s_kh,
                     v_ptr + b * s_vb + h * s_vh, dk_ptr + b * s_dkb + h * s_dkh, dv_ptr + b * s_dvb + h * s_dvh,
                     s_ql, s_qd, s_gl, s_gd, s_kl, s_kd, s_vl, s_vd, s_dkl, s_dkd, s_dvl, s_dvd,
                     tile * BLOCK_N, LK, LQ, D, scale, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    elif HAS_K2:
        _bwd_kv_tile(q_base, do_base, stats_row0, lse_ptr, delta_ptr, k2_ptr + b * s_k2b + h * s_k2h,
                     v2_ptr + b * s_v2b + h * s_v2h, dk2_ptr + b * s_dk2b + h * s_dk2h,
                     dv2_ptr + b * s_dv2b + h * s_dv2h,
                     s_ql, s_qd, s_gl, s_gd, s_k2l, s_k2d, s_v2l, s_v2d, s_dk2l, s_dk2d, s_dv2l, s_dv2d,
                     (tile - TILES_1) * BLOCK_N2, LK2, LQ, D, scale, BLOCK_M, BLOCK_N2, BLOCK_D, PRECISION)


@triton.jit
def _dq_keys(dq, q, do, lse, delta, k_base, v_base, s_kl, s_kd, s_vl, s_vd, L, scale, offs_d, d_ok,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ += dS K over the L keys of one segment (unscaled; the caller multiplies by scale once)."""
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        keys = offs_n.to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        p = tl.where(n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_q_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, dq_ptr,
                  B, H, LQ, LK, LK2, D, scale,
                  s_qb, s_qh, s_ql, s_qd, s_gb, s_gh, s_gl, s_gd,
                  s_kb, s_kh, s_kl, s_kd, s_vb, s_vh, s_vl, s_vd, s_k2b, s_k2h, s_k2l, s_k2d,
                  s_v2b, s_v2h, s_v2l, s_v2d, s_dqb, s_dqh, s_dql, s_dqd,
                  HAS_K2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of BLOCK_M queries of one head, over both segments' keys: 6 * BLOCK_M * BLOCK_N * d FLOPs per tile."""
    b, h, rows, m_ok, offs_d, d_ok = _query_block(tl.program_id(0), B, LQ, D, BLOCK_M, BLOCK_D)
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_ql + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * s_gb + h * s_gh + rows[:, None] * s_gl + offs_d[None, :] * s_gd, mask=q_mask,
                 other=0.0)
    stats_rows = (b * H + h) * LQ + rows
    lse = tl.load(lse_ptr + stats_rows, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + stats_rows, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_keys(dq, q, do, lse, delta, k_ptr + b * s_kb + h * s_kh, v_ptr + b * s_vb + h * s_vh,
                  s_kl, s_kd, s_vl, s_vd, LK, scale, offs_d, d_ok, BLOCK_N, PRECISION)
    if HAS_K2:
        dq = _dq_keys(dq, q, do, lse, delta, k2_ptr + b * s_k2b + h * s_k2h, v2_ptr + b * s_v2b + h * s_v2h,
                      s_k2l, s_k2d, s_v2l, s_v2d, LK2, scale, offs_d, d_ok, BLOCK_N2, PRECISION)
    tl.store(dq_ptr + b * s_dqb + h * s_dqh + rows[:, None] * s_dql + offs_d[None, :] * s_dqd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---- host side: checks, block sizes, launches ----------------------------------------------------------
def _check_keys(q: torch.Tensor, k, v, kname: str, vname: str) -> None:
    """k and v [B, H, L >= 1, d] matching q, on q's device in q's dtype (the CPU op's checks)."""
    for name, x in ((kname, k), (vname, v)):
        check_tensor(name, x, 4)
        if x.device != q.device:
            raise ValueError(f"mmfast: {name} is on {x.device} but q is on {q.device}")
        if x.dtype != q.dtype:
            raise TypeError(f"mmfast: {name} is {x.dtype} but q is {q.dtype}; pass one dtype")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"mmfast: {kname} must have shape [B, H, Lk >= 1, d] = [{b}, {h}, Lk, {d}] (from q), "
                         f"got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"mmfast: {vname} must have {kname}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")


def _check_inputs(op: str, q, k, v, k2, v2) -> None:
    from mmfast.ops.cross_attention import HEAD_DIMS  # imported here: that module imports this one

    check_tensor("q", q, 4)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"mmfast: {op} runs float32, float16 and bfloat16; q is {q.dtype}")
    if not HEAD_DIMS[0] <= q.shape[3] <= HEAD_DIMS[1]:
        raise ValueError(f"mmfast: head dim d (q.size(3)) must be in [{HEAD_DIMS[0]}, {HEAD_DIMS[1]}], "
                         f"got {q.shape[3]}")
    _check_keys(q, k, v, "k", "v")
    if (k2 is None) != (v2 is None):
        given = "k2 without v2" if v2 is None else "v2 without k2"
        raise ValueError(f"mmfast: k2 and v2 must be given together (got {given})")
    if k2 is not None:
        _check_keys(q, k2, v2, "k2", "v2")
    check_launchable(op, q)


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass. Under the interpreter each program and each loop step
# costs Python time whatever the tile, so it gets wide tiles. GPU entries are starting points, not tuned on a
# GPU yet: fp32 runs IEEE dots on CUDA cores with fp32 tiles (twice the registers of fp16), hence smaller.
_BLOCKS = {
    "interpret": {"forward": (64, 256, 4, 1), "backward": (64, 256, 4, 1)},
    "fp32": {"forward": (64, 32, 4, 2), "backward": (32, 32, 4, 1)},
    "half": {"forward": (128, 64, 4, 3), "backward": (64, 64, 4, 2)},
}
apply_block_overrides("cross_attention", _BLOCKS)


def _blocks(kind: str, dtype: torch.dtype, lq: int, lk: int, lk2: int, d: int):
    """(BLOCK_M, BLOCK_N, BLOCK_N2, BLOCK_D, num_warps, num_stages), clamped to the problem (tl.dot needs
    >= 16). Each segment gets its own key-tile width: the Perceiver's second segment (its 64 latents) is
    not padded to the first segment's tile."""
    table = "interpret" if INTERPRET else ("fp32" if dtype == torch.float32 else "half")
    bm, bn, warps, stages = _BLOCKS[table][kind]
    bd = pow2_block(d, MIN_DOT_BLOCK, 128)
    if bd == 128 and table == "half":
        warps = 8  # a 128-wide head dim doubles the accumulator tiles
    return (pow2_block(lq, MIN_DOT_BLOCK, bm), pow2_block(lk, MIN_DOT_BLOCK, bn),
            pow2_block(max(lk2, 1), MIN_DOT_BLOCK, bn), bd, warps, stages)


def _row_block(block_d: int) -> int:
    """Rows per program of the row kernels (delta, split merge): 4096 elements (GPU); 64K under the
    interpreter, where each program costs Python time whatever its size."""
    return max(1, (65536 if INTERPRET else 4096) // block_d)


def num_splits(batch_heads: int, lq: int, total_keys: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(splits, keys per split) of the forward: (1, total_keys) unless the split-K rule applies (module
    docstring); the chunk is a whole number of BLOCK_N tiles and no split is empty."""
    programs = batch_heads * triton.cdiv(lq, block_m)
    if programs >= SPLIT_K_MIN_PROGRAMS:
        return 1, total_keys
    splits = min(triton.cdiv(SPLIT_K_MIN_PROGRAMS, programs), total_keys // max(SPLIT_K_MIN_KEYS, 1))
    if splits <= 1:
        return 1, total_keys
    chunk = triton.cdiv(triton.cdiv(total_keys, splits), block_n) * block_n
    return triton.cdiv(total_keys, chunk), chunk


def forward_splits(q: torch.Tensor, k: torch.Tensor, k2: Optional[torch.Tensor]) -> int:
    """How many key chunks the forward would use for these inputs (1: no split-K)."""
    b, h, lq, d = q.shape
    lk, lk2 = k.shape[2], (k2.shape[2] if k2 is not None else 0)
    bm, bn, _, _, _, _ = _blocks("forward", q.dtype, lq, lk, lk2, d)
    return num_splits(b * h, lq, lk + lk2, bm, bn)[0]


def _forward(q, k, v, k2, v2, scale: float):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    has_k2 = k2 is not None
    lk2 = k2.shape[2] if has_k2 else 0
    k2_, v2_ = (k2, v2) if has_k2 else (k, v)  # stand-ins for pointers the kernel does not read
    bm, bn, bn2, bd, warps, stages = _blocks("forward", q.dtype, lq, lk, lk2, d)
    splits, chunk = num_splits(b * h, lq, lk + lk2, bm, bn)
    out = torch.empty(b, lq, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
    if splits > 1:
        dst, dst_lse = (torch.empty(splits, b * h, lq, d, device=q.device, dtype=torch.float32),
                        torch.empty(splits, b * h, lq, device=q.device, dtype=torch.float32))
    else:
        dst, dst_lse = out, lse
    programs = b * h * triton.cdiv(lq, bm)
    _attn_fwd_kernel[(programs, splits)](
        q, k, v, k2_, v2_, dst, dst_lse, b, h, lq, lk, lk2, d, scale, chunk,
        *_strides(q), *_strides(k), *_strides(v), *_strides(k2_), *_strides(v2_), *_strides(out),
        HAS_K2=has_k2, SPLIT=splits > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_N2=bn2, BLOCK_D=bd,
        PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    if splits > 1:
        br = _row_block(bd)
        _split_merge_kernel[(triton.cdiv(b * h * lq, br),)](dst, dst_lse, out, lse, b * h * lq, h, lq, d, splits,
                                                             *_strides(out), BLOCK_R=br, BLOCK_D=bd)
    return out, lse


def _backward(grad_out, q, k, v, k2, v2, out, lse, scale: float):
    from mmfast.ops.cross_attention import _grad_like  # the layout rule its fake impl encodes

    b, h, lq, d = q.shape
    lk = k.shape[2]
    has_k2 = k2 is not None
    lk2 = k2.shape[2] if has_k2 else 0
    bm, bn, bn2, bd, warps, stages = _blocks("backward", q.dtype, lq, lk, lk2, d)
    precision = dot_precision(q.dtype)
    grad_q, grad_k, grad_v = _grad_like(q), _grad_like(k), _grad_like(v)
    if has_k2:
        grad_k2, grad_v2 = _grad_like(k2), _grad_like(v2)
        k2_, v2_, gk2_, gv2_ = k2, v2, grad_k2, grad_v2
    else:
        grad_k2, grad_v2 = q.new_empty(0), q.new_empty(0)
        k2_, v2_, gk2_, gv2_ = k, v, grad_k, grad_v  # stand-ins, not read

    q_blocks = b * h * triton.cdiv(lq, bm)
    delta = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
    br = _row_block(bd)
    _bwd_delta_kernel[(triton.cdiv(b * h * lq, br),)](grad_out, out, delta, b * h * lq, h, lq, d, *_strides(grad_out),
                                                      *_strides(out), BLOCK_R=br, BLOCK_D=bd)
    tiles_1, tiles_2 = triton.cdiv(lk, bn), triton.cdiv(lk2, bn2)
    kv_strides = (*_strides(k), *_strides(v), *_strides(k2_), *_strides(v2_))
    _bwd_kv_kernel[(b * h * (tiles_1 + tiles_2),)](
        q, grad_out, lse, delta, k, v, k2_, v2_, grad_k, grad_v, gk2_, gv2_,
        b, h, lq, lk, lk2, d, scale, tiles_1, tiles_2, *_strides(q), *_strides(grad_out), *kv_strides,
        *_strides(grad_k), *_strides(grad_v), *_strides(gk2_), *_strides(gv2_),
        HAS_K2=has_k2, BLOCK_M=bm, BLOCK_N=bn, BLOCK_N2=bn2, BLOCK_D=bd, PRECISION=precision, num_warps=warps,
        num_stages=stages)
    _bwd_q_kernel[(q_blocks,)](
        q, grad_out, lse, delta, k, v, k2_, v2_, grad_q, b, h, lq, lk, lk2, d, scale,
        *_strides(q), *_strides(grad_out), *kv_strides, *_strides(grad_q),
        HAS_K2=has_k2, BLOCK_M=bm, BLOCK_N=bn, BLOCK_N2=bn2, BLOCK_D=bd, PRECISION=precision, num_warps=warps,
        num_stages=stages)
    return grad_q, grad_k, grad_v, grad_k2, grad_v2


# ---- the operators -------------------------------------------------------------------------------------
@torch.library.custom_op("mmfast::cross_attention_triton", mutates_args=())
def cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k2: Optional[torch.Tensor],
                           v2: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs("cross_attention_triton", q, k, v, k2, v2)
    with device_guard(q):
        return _forward(q, k, v, k2, v2, float(scale))


@torch.library.custom_op("mmfast::cross_attention_backward_triton", mutates_args=())
def cross_attention_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    k2: Optional[torch.Tensor], v2: Optional[torch.Tensor], out: torch.Tensor,
                                    lse: torch.Tensor, scale: float
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "cross_attention_backward_triton"
    _check_inputs(op, q, k, v, k2, v2)
    for name, x in (("grad_out", grad_out), ("out", out)):
        if x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"mmfast: {name} must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}), got "
                             f"shape {tuple(x.shape)}, {x.dtype}, {x.device}")
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"mmfast: lse must be [B, H, Lq] = {list(q.shape[:3])} in torch.float32 on {q.device}, "
                         f"got shape {tuple(lse.shape)}, {lse.dtype}, {lse.device}")
    with device_guard(q):
        return _backward(grad_out, q, k, v, k2, v2, out, lse.contiguous(), float(scale))
