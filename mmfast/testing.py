"""The accuracy rule shared by the tests and the benchmark's correctness gate (DESIGN.md section 5).

fp32: relative error to the float64 reference at most a tolerance. fp16/bf16: at most 2x the error of
the reference computed in the same low precision (FlashAttention's rule), with a floor of 4 units of
that dtype's rounding so exact-match cases don't demand zero error.

Every comparison runs in float64 on the float64 reference's device: an output or a low-precision reference
made on a GPU is brought to a reference kept on the CPU (the tests' case), and nothing moves when all live
on one device (the benchmark's).
"""
from __future__ import annotations

import math

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / max(||ref||, tiny), in float64 on ref's device."""
    x, ref = x.to(ref.device, torch.float64), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def accuracy_problem(out, ref64, ref_lowp, *, fp32_rtol: float) -> tuple[str | None, float]:
    """(None, err) when `out` is close enough to the float64 reference, else (why, err).

    Floating outputs: fp32 relative error <= fp32_rtol; fp16/bf16 <= 2x the error of the reference
    computed in the same dtype (floor: 4 units of rounding). Integer outputs (top-k indices): the
    fraction that differs from the float64 reference's may be at most 2x the low-precision
    reference's fraction, with a floor of 0.1% (near-ties legitimately swap)."""
    if tuple(out.shape) != tuple(ref64.shape):
        return f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}", math.nan
    if not out.is_floating_point():
        mismatch = (out.to(ref64.device) != ref64).double().mean().item()
        allowed = max(2 * (ref_lowp.to(ref64.device) != ref64).double().mean().item(), 1e-3)
        return (None if mismatch <= allowed else f"{mismatch:.2%} differ (allowed {allowed:.2%})"), mismatch
    err = rel_err(out, ref64)
    if out.dtype in LOW_PRECISION:
        bound = max(2 * rel_err(ref_lowp, ref64), 4 * torch.finfo(out.dtype).eps)
    else:
        bound = fp32_rtol
    if not err <= bound:  # NaN fails too
        return f"rel err {err:.2e} > {bound:.2e}", err
    return None, err


