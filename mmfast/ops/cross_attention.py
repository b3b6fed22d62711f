"""mmfast.ops.cross_attention: the fused attention core of the Flamingo Perceiver Resampler and of SAM's
two-way transformer.

    out = softmax(scale * q @ cat(k, k2)^T) @ cat(v, v2)

Operators (schemas in csrc/mmfast.cpp):
  mmfast::cross_attention / cross_attention_backward                  C++ CPU kernels
      (csrc/cpu/cross_attention.cpp); CUDA kernels register under the same names
  mmfast::cross_attention_triton / cross_attention_backward_triton    Triton kernels, defined by
      mmfast/triton/cross_attention.py when that module exists
This file checks arguments, picks the backend, and registers the fake impls of all of them and the autograd
of the Triton ones (the native operators' autograd is C++, csrc/autograd.cpp).

Conventions every backend's operators follow (the fake impls below encode them, opcheck checks them):
  * forward returns (out, lse): out [B, H, Lq, d] in q's dtype, allocated as [B, Lq, H, d] and
    transposed, so merging the heads afterwards (out.transpose(1, 2).reshape(B, Lq, H * d)) is a view;
    lse [B, H, Lq] contiguous, the rows' log-sum-exp in fp32 (fp64 for fp64 inputs).
  * backward returns (grad_q, grad_k, grad_v, grad_k2, grad_v2); each gradient has its input's layout
    when that layout is dense with a contiguous head dim, else is contiguous; grad_k2/grad_v2 are empty
    [0] tensors when k2/v2 are None (autograd maps them to None).
  * inputs are read through their strides and never written.

Extending the core (SAM): q/k/v may be any strided views (heads split by a permute need no copy), K/V
may be expanded over the batch with stride 0 (one image's keys shared by many prompts), and a second
key/value segment is attended after the first without concatenating. What the core does not do
(projections, positional-encoding adds, residual + LayerNorm) belongs in the module around it.
"""
from __future__ import annotations

import importlib.util
import numbers

import torch
import torch.nn.functional as F

from mmfast import backend as _backend
from mmfast.ops import _eager
from mmfast.ops._checks import check_dim_match, check_same_device_dtype, tensor_shape
from mmfast.reference.perceiver import perceiver_cross_attention as _reference

OP = "cross_attention"
# Head dims the kernels take (every kernel backend: the GPU kernels are instantiated for this range).
# Under backend="auto" other head dims run the reference; a named kernel backend raises.
HEAD_DIMS = (16, 128)

_NATIVE = ("cross_attention", "cross_attention_backward")
_TRITON = tuple(n + "_triton" for n in _NATIVE)


def _stats_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _grad_like(x: torch.Tensor) -> torch.Tensor:
    """x's layout when dense with a contiguous head dim, else contiguous (as the kernels allocate)."""
    g = torch.empty_like(x)
    return g if g.stride(-1) == 1 else x.new_empty(x.shape)


# ---- fake (meta) impls: shapes and layouts only, so torch.compile and opcheck can trace -----------------
def _fake_forward(q, k, v, k2, v2, scale):
    b, h, lq, d = q.shape
    return q.new_empty(b, lq, h, d).transpose(1, 2), q.new_empty(b, h, lq, dtype=_stats_dtype(q))


def _fake_backward(grad_out, q, k, v, k2, v2, out, lse, scale):
    grad_k2 = _grad_like(k2) if k2 is not None else q.new_empty(0)
    grad_v2 = _grad_like(v2) if v2 is not None else q.new_empty(0)
    return _grad_like(q), _grad_like(k), _grad_like(v), grad_k2, grad_v2


# ---- autograd of the Triton operators (the native ones': csrc/autograd.cpp, the same logic in C++) -------
def _register_autograd(names):
    fwd, bwd = names
    bwd_op = getattr(torch.ops.mmfast, bwd)

    def setup_context(ctx, inputs, output):
        q, k, v, k2, v2, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, k2, v2, out, lse)
        ctx.scale, ctx.has_second_segment = scale, k2 is not None
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, k2, v2, out, lse = ctx.saved_tensors
        gq, gk, gv, gk2, gv2 = bwd_op(grad_out, q, k, v, k2, v2, out, lse, ctx.scale)
        if not ctx.has_second_segment:
            gk2 = gv2 = None
        return gq, gk, gv, gk2, gv2, None

    torch.library.register_autograd(f"mmfast::{fwd}", backward, setup_context=setup_context)


def _register_fakes(names):
    for name, fake in zip(names, (_fake_forward, _fake_backward)):
        torch.library.register_fake(f"mmfast::{name}")(fake)


# An extension built before these schemas existed has no mmfast::cross_attention: reference only then.
_native_defined = _backend._C is not None and all(hasattr(torch.ops.mmfast, n) for n in _NATIVE)
if _native_defined:
    _register_fakes(_NATIVE)
_triton_defined = (_backend._triton_error is None
                   and importlib.util.find_spec("mmfast.triton.cross_attention") is not None)
if _triton_defined:
    import mmfast.triton.cross_attention  # noqa: F401  (defines the mmfast::*_triton custom ops)
    _register_fakes(_TRITON)
    _register_autograd(_TRITON)

# The implementations that exist in this process (backend.resolve explains any other request).
IMPLEMENTATIONS = tuple(name for name, present in (
    ("cuda", _native_defined and _backend.has_native_kernel(_NATIVE[0], "CUDA")),
    ("triton", _triton_defined),
    ("cpu", _native_defined and _backend.has_native_kernel(_NATIVE[0], "CPU")),
    ("reference", True),
) if present)


# Each kernel backend's forward operator, looked up once (an attribute walk through torch.ops per call cost
# ~0.5 us), and its eager entry point (None for Triton's custom op).
_KERNELS = {impl: (getattr(torch.ops.mmfast, (_TRITON if impl == "triton" else _NATIVE)[0]).default,
                   None if impl == "triton" else _eager.entry(_NATIVE[0]))
            for impl in IMPLEMENTATIONS if impl != "reference"}
_SHARED_DIMS = ((0, "batch size B"), (1, "number of heads H"), (3, "head dim d"))


def _segment_fits(qs, device, dtype, k, v, ks, vs) -> bool:
    """k and v on q's device, in q's dtype, of one shape [B, H, L, d] with q's B, H and d."""
    return (k.device == device and v.device == device and k.dtype == dtype and v.dtype == dtype
            and ks == vs and ks[0] == qs[0] and ks[1] == qs[1] and ks[3] == qs[3])


def _check_inputs(q, k, v, k2, v2) -> tuple[torch.device, int]:
    """Errors name the argument; returns (device, head dim). Devices, dtypes and sizes are compared at once
    (each tensor attribute read costs ~0.1 us, and a tiny call takes ~10 us); only where they differ do the
    walks with check_same_device_dtype and check_dim_match run, which name the first mismatch."""
    qs, ks, vs = tensor_shape("q", q, 4), tensor_shape("k", k, 4), tensor_shape("v", v, 4)
    device, dtype = q.device, q.dtype
    if k2 is None and v2 is None:
        if _segment_fits(qs, device, dtype, k, v, ks, vs):
            return device, qs[3]
        named = (("k", k), ("v", v))
    else:
        if k2 is None or v2 is None:
            given, missing = ("k2", "v2") if v2 is None else ("v2", "k2")
            raise ValueError(f"mmfast: {given} was given without {missing}; pass the second key/value segment's "
                             "k2 and v2 together, or neither")
        k2s, v2s = tensor_shape("k2", k2, 4), tensor_shape("v2", v2, 4)
        if _segment_fits(qs, device, dtype, k, v, ks, vs) and _segment_fits(qs, device, dtype, k2, v2, k2s, v2s):
            return device, qs[3]
        named = (("k", k), ("v", v), ("k2", k2), ("v2", v2))
    check_same_device_dtype(("q",) + tuple(name for name, _ in named), q, *(x for _, x in named))
    for name, x in named:
        for dim, what in _SHARED_DIMS:
            check_dim_match("q", q, dim, name, x, dim, what)
    check_dim_match("k", k, 2, "v", v, 2, "number of keys Lk")
    if k2 is not None:
        check_dim_match("k2", k2, 2, "v2", v2, 2, "number of keys Lk2")
    return device, qs[3]


# ---- the public function ------------------------------------------------------------------------------
def cross_attention(q, k, v, *, k2=None, v2=None, scale=None, backend=None):
    """Fused `softmax(scale * q @ cat(k, k2)^T) @ cat(v, v2)` with online softmax (fp32 statistics).

    q [B, H, Lq, d]; k, v [B, H, Lk, d]; optional k2, v2 [B, H, Lk2, d]: a second key/value segment
    attended after k/v as if concatenated along the tokens (the Perceiver's latents), without building
    the concatenation. Every length >= 1. scale defaults to d ** -0.5. fp32, fp16 or bf16 (float64 runs
    the reference); kernels take head dims 16..128. Inputs may be any strided views (permuted, or
    expanded over B/H with stride 0) and are never modified. Returns [B, H, Lq, d] in q's dtype; from the
    kernels its memory is [B, Lq, H, d], so `out.transpose(1, 2).reshape(B, Lq, H * d)` is a view.
    Gradients for q, k, v, k2, v2 come from one fused backward kernel.
    """
    device, head_dim = _check_inputs(q, k, v, k2, v2)
    if scale is None:
        scale = head_dim ** -0.5
    elif type(scale) is not float:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"mmfast: scale must be a float (or None for d ** -0.5), got {type(scale).__name__}")
        scale = float(scale)

    impl = _backend.resolve(OP, IMPLEMENTATIONS, device, q.dtype, backend)
    if impl in _KERNELS and not HEAD_DIMS[0] <= head_dim <= HEAD_DIMS[1]:
        if (backend if backend is not None else _backend.get_backend()) != "auto":
            raise _backend.BackendUnavailableError(
                f"mmfast: backend {impl!r} runs head dims {HEAD_DIMS[0]}..{HEAD_DIMS[1]}; q has head dim "
                f"d={head_dim} (shape {tuple(q.shape)}); use backend='reference'")
        impl = "reference"
    kernel = _KERNELS.get(impl)
    if kernel is not None:
        op, eager = kernel
        if eager is not None and _eager.usable((q, k, v, k2, v2)):
            return eager(q, k, v, k2, v2, scale)
        return op(q, k, v, k2, v2, scale)[0]
    if impl == _backend.UPSTREAM:  # upstream's own computation (benchmarks/cross_attention.py's eager baseline)
        if k2 is not None:
            k, v = torch.cat((k, k2), dim=-2), torch.cat((v, v2), dim=-2)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _reference(q, k, v, k2, v2, scale=scale)
