"""Helpers shared by the Triton ops: block sizes, matmul precision, device guard, fp32-output GEMMs, rounding.

Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1, read when triton is imported).
The interpreter executes each program as numpy operations on whole blocks, so there the cost is the
number of programs and loop iterations, not registers: ops pick larger blocks under it.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from mmfast.backend import KERNEL_DTYPES
from mmfast.ops._checks import check_dim_match, check_same_device_dtype, check_tensor, scalar_tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# tl.dot needs every block dimension >= 16 (MMA shape on sm_80/sm_90).
MIN_DOT_BLOCK = 16


def apply_block_overrides(family: str, blocks: dict) -> dict:
    """blocks (a module's _BLOCKS: {table: {kind: tuple}}) with the entries that the JSON file named by
    MMFAST_TRITON_BLOCKS gives for `family` ("contrastive_loss", "similarity_softmax", "cross_attention")
    put in its place, in place. That file is what benchmarks/_triton_sweep.py writes on a GPU: the GPU
    check runs its tests and benchmarks on the sweep's winners before they are copied into the tables."""
    path = os.environ.get("MMFAST_TRITON_BLOCKS")
    if not path:
        return blocks
    with open(path) as f:
        overrides = json.load(f).get(family, {})
    for table, kinds in overrides.items():
        for kind, config in kinds.items():
            old = blocks.get(table, {}).get(kind)
            if old is None or len(old) != len(config) or not all(isinstance(v, int) for v in config):
                raise ValueError(f"mmfast: {path}: {family}.{table}.{kind} must replace an entry of "
                                 f"{len(old) if old else '?'} ints, got {config!r}")
            blocks[table][kind] = tuple(config)
    return blocks


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: follow torch's TF32 switch for matmuls.

    Triton's default for fp32 is tf32 (10-bit mantissa), about 1e-3 relative error; torch's default
    is full fp32, and the fp32 tests compare at 1e-5. fp16/bf16 operands ignore this setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error for tensors Triton cannot run on in this process."""
    device = tensors[0].device
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"mmfast: {op} runs CPU tensors only under TRITON_INTERPRET=1 "
                           "(set before triton is imported); use a CUDA tensor or another backend")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"mmfast: {op} does not run on {device}")


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's device (multi-GPU processes)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_feature_pair(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Two [N, D] feature matrices of one device and kernel dtype, sharing D, launchable here (the
    similarity and contrastive-loss ops take image/text or rows/cols)."""
    check_tensor(names[0], a, 2)
    check_tensor(names[1], b, 2)
    check_same_device_dtype(names, a, b)
    check_dim_match(names[0], a, 1, names[1], b, 1, "feature dim D")
    if a.dtype not in KERNEL_DTYPES:
        raise TypeError(f"mmfast: {op} runs float32, float16 and bfloat16; got {a.dtype}")
    check_launchable(op, a)


def optional_scalar(name: str, t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """None, or t as a 0-dim fp32 tensor on like's device, read by the kernels through its pointer (no
    host sync); the checks are mmfast.ops._checks.scalar_tensor's."""
    return None if t is None else scalar_tensor(name, t, like).to(torch.float32)


# torch.mm / addmm with out_dtype (fp16/bf16 operands, fp32 result from cuBLAS's fp32 accumulator) are CUDA-only.
MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


def mm_fp32(a: torch.Tensor, b: torch.Tensor, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(acc +) a @ b in fp32 from operands of any one float dtype, without rounding the product to it."""
    if a.dtype != torch.float32 and a.is_cuda and MM_OUT_DTYPE:
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    a, b = a.float(), b.float()  # fp32 inputs, or the CPU (the interpreter's tests): exact widening
    return torch.mm(a, b) if acc is None else torch.addmm(acc, a, b)


# Rounding to fp16/bf16 kept in fp32 by arithmetic: under the interpreter the casts are slow (and its fp32 -> bf16
# truncates); kernels that store half-precision values there use these, then an exact cast or an fp32 buffer.
@triton.jit
def round_bf16(x):
    """x rounded to bf16 (to nearest even) but kept in fp32, by bit operations: the interpreter's own
    fp32 -> bf16 cast truncates and runs a per-bit Python loop over tiles holding zeros (40 ms a tile)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN would carry into the sign


@triton.jit
def round_fp16(x):
    """x (|x| < 65504) rounded to fp16 but kept in fp32, by fp32 arithmetic: Veltkamp's split keeps 11
    significant bits; below fp16's smallest normal 2^-14, adding 0.75 (ulp 2^-24) rounds to its subnormal
    grid. The interpreter's fp32 -> fp16 astype costs ~50 ms a 512 x 1024 tile (measured), this ~5 ms."""
    c = x * 8193.0  # 2^13 + 1
    hi = c - (c - x)
    return tl.where(tl.abs(x) < 6.103515625e-05, (x + 0.75) - 0.75, hi)


@triton.jit
def store_rounded(ptrs, x, mask, ROUND_BF16: tl.constexpr, UPCAST: tl.constexpr):
    """Store an fp32 tile rounded to the features' dtype (bf16 when ROUND_BF16, else fp16, or fp32 itself). Under
    the interpreter (UPCAST: half-precision features) ptrs is an fp32 buffer that holds the rounded values: no
    interpreter cast."""
    if UPCAST:
        if ROUND_BF16:
            x = round_bf16(x)
        else:
            x = round_fp16(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
