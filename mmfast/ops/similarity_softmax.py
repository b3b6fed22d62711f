"""mmfast.similarity_softmax: the fused CLIP zero-shot similarity + softmax (or sigmoid).

Operators (schemas in csrc/mmfast.cpp):
  mmfast::similarity_softmax / _backward       C++ CPU (csrc/cpu) and CUDA (csrc/cuda) kernels
  mmfast::similarity_topk / _backward          the top-k mode, never building the N x C matrix
  mmfast::similarity_softmax_triton, ...       the Triton kernels (mmfast/triton/similarity_softmax.py)
This file checks arguments, picks the backend, and registers the fake impls of all of them and the autograd
of the Triton ones (the native operators' autograd is C++, csrc/autograd.cpp).
"""
from __future__ import annotations

import torch

from mmfast import backend as _backend
from mmfast.ops import _eager
from mmfast.ops._checks import check_dim_match, check_same_device_dtype, check_scalar, check_tensor, scalar_tensor
from mmfast.reference import similarity_softmax as _ref

OP = "similarity_softmax"
IMPLEMENTATIONS = ("cuda", "triton", "cpu", "reference")
ACTIVATIONS = ("softmax", "sigmoid", "none")

# Operator names per backend: (forward, backward, topk forward, topk backward).
_NATIVE = ("similarity_softmax", "similarity_softmax_backward", "similarity_topk", "similarity_topk_backward")
_TRITON = tuple(n + "_triton" for n in _NATIVE)


# ---- fake (meta) impls: shapes only, so torch.compile and opcheck can trace ----------------------
def _fake_forward(image, text, logit_scale, logit_bias, normalize, activation):
    out = image.new_empty(image.shape[0], text.shape[0])
    return (out, image.new_empty(image.shape[0], dtype=torch.float32),
            image.new_empty(text.shape[0], dtype=torch.float32))


def _fake_backward(grad_out, out, image, text, inv_norm_image, inv_norm_text, logit_scale, normalize, activation):
    # The kernels return contiguous gradients whatever the inputs' strides.
    contiguous = torch.contiguous_format
    return (torch.empty_like(image, memory_format=contiguous), torch.empty_like(text, memory_format=contiguous),
            image.new_empty((), dtype=torch.float32), image.new_empty((), dtype=torch.float32))


def _fake_topk(image, text, logit_scale, logit_bias, normalize, activation, k):
    n = image.shape[0]
    return (image.new_empty(n, k), image.new_empty(n, k, dtype=torch.int64),
            image.new_empty(n, dtype=torch.float32), image.new_empty(n, dtype=torch.float32),
            image.new_empty(text.shape[0], dtype=torch.float32))


def _fake_topk_backward(grad_values, values, indices, row_lse, image, text, inv_norm_image, inv_norm_text,
                        logit_scale, logit_bias, normalize, activation):
    return _fake_backward(None, None, image, text, None, None, None, None, None)


# ---- autograd of the Triton operators (the native ones': csrc/autograd.cpp, the same logic in C++) -
def _register_autograd(names):
    fwd, bwd, topk, topk_bwd = names
    bwd_op = getattr(torch.ops.mmfast, bwd)
    topk_bwd_op = getattr(torch.ops.mmfast, topk_bwd)

    def setup_forward(ctx, inputs, output):
        image, text, logit_scale, logit_bias, normalize, activation = inputs
        out, inv_i, inv_t = output
        ctx.save_for_backward(out, image, text, inv_i, inv_t, logit_scale)
        ctx.normalize, ctx.activation, ctx.has_bias = normalize, activation, logit_bias is not None
        ctx.mark_non_differentiable(inv_i, inv_t)

    def backward(ctx, grad_out, _gi, _gt):
        out, image, text, inv_i, inv_t, scale = ctx.saved_tensors
        gi, gt, gs, gb = bwd_op(grad_out, out, image, text, inv_i, inv_t, scale, ctx.normalize, ctx.activation)
        return gi, gt, gs.to(scale.dtype), (gb if ctx.has_bias else None), None, None

    def setup_topk(ctx, inputs, output):
        image, text, logit_scale, logit_bias, normalize, activation, k = inputs
        values, indices, row_lse, inv_i, inv_t = output
        ctx.save_for_backward(values, indices, row_lse, image, text, inv_i, inv_t, logit_scale, logit_bias)
        ctx.normalize, ctx.activation, ctx.has_bias = normalize, activation, logit_bias is not None
        ctx.mark_non_differentiable(indices, row_lse, inv_i, inv_t)

    def backward_topk(ctx, grad_values, *_):
        values, indices, row_lse, image, text, inv_i, inv_t, scale, bias = ctx.saved_tensors
        gi, gt, gs, gb = topk_bwd_op(grad_values, values, indices, row_lse, image, text, inv_i, inv_t,
                                     scale, bias, ctx.normalize, ctx.activation)
        return gi, gt, gs.to(scale.dtype), (gb if ctx.has_bias else None), None, None, None

    torch.library.register_autograd(f"mmfast::{fwd}", backward, setup_context=setup_forward)
    torch.library.register_autograd(f"mmfast::{topk}", backward_topk, setup_context=setup_topk)


def _register_fakes(names):
    for name, fake in zip(names, (_fake_forward, _fake_backward, _fake_topk, _fake_topk_backward)):
        torch.library.register_fake(f"mmfast::{name}")(fake)


# Each kernel backend's operators, looked up once (a walk through torch.ops per call cost ~0.5 us), and the
# eager entry points of its forward and top-k operators (None for Triton's custom ops).
_KERNELS = {}
if _backend._C is not None:
    _register_fakes(_NATIVE)
    _KERNELS["cpu"] = _KERNELS["cuda"] = (tuple(getattr(torch.ops.mmfast, n).default for n in _NATIVE),
                                          _eager.entry(_NATIVE[0]), _eager.entry(_NATIVE[2]))
if _backend._triton_error is None:
    import mmfast.triton.similarity_softmax  # noqa: F401  (defines the mmfast::*_triton custom ops)
    _register_fakes(_TRITON)
    _register_autograd(_TRITON)
    _KERNELS["triton"] = (tuple(getattr(torch.ops.mmfast, n).default for n in _TRITON), None, None)


# ---- the public function -------------------------------------------------------------------------
def similarity_softmax(image_features, text_features, logit_scale=100.0, logit_bias=None, *,
                       normalize=True, activation="softmax", topk=None, backend=None):
    """Fused `act(logit_scale * normalize(image) @ normalize(text).T + logit_bias)`.

    image_features [N, D], text_features [C, D] (fp32, fp16 or bf16; float64 runs the reference).
    logit_scale is the already-exponentiated scale (float, 0-dim or [1] tensor; 100 for CLIP);
    logit_bias an optional scalar (SigLIP). activation: "softmax" (over classes), "sigmoid" or None
    (logits). topk=k returns (values [N, k], indices [N, k]) sorted descending, computed in one pass
    over class tiles (online log-sum-exp + running top-k) without the N x C matrix.
    NaN/Inf in the inputs propagate as in the reference (a NaN feature row gives a NaN output row).
    Every output and gradient (features, logit_scale, logit_bias) comes from fused kernels.
    """
    image = check_tensor("image_features", image_features, 2)
    text = check_tensor("text_features", text_features, 2)
    check_same_device_dtype(("image_features", "text_features"), image, text)
    check_dim_match("image_features", image, 1, "text_features", text, 1, "feature dim D")
    if activation is None:
        activation = "none"
    if activation not in ACTIVATIONS:
        raise ValueError(f"mmfast: activation must be 'softmax', 'sigmoid' or None, got {activation!r}")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= text.shape[0]:
            raise ValueError(f"mmfast: topk must be an int in [1, C={text.shape[0]}], got {topk!r}")
    # The top-k mode is ranked apart in the dispatch table (other kernels win there).
    impl = _backend.resolve(OP, IMPLEMENTATIONS, image.device, image.dtype, backend,
                            shape_class=None if topk is None else "topk")
    if impl == _backend.UPSTREAM:
        # No kernel beat upstream on this device: upstream's computation (the reference, line by line) on the
        # scalars as given; no 0-dim tensor made of a Python scale, a launch upstream does not have.
        check_scalar("logit_scale", logit_scale, image)
        if logit_bias is not None:
            check_scalar("logit_bias", logit_bias, image)
        if topk is not None:
            return _ref.similarity_topk(image, text, logit_scale, logit_bias, normalize, activation, topk)
        return _ref.similarity_softmax(image, text, logit_scale, logit_bias, normalize, activation)
    scale = scalar_tensor("logit_scale", logit_scale, image)
    bias = None if logit_bias is None else scalar_tensor("logit_bias", logit_bias, image)
    if impl == "reference":
        if topk is not None:
            return _ref.similarity_topk(image, text, scale, bias, normalize, activation, topk)
        return _ref.similarity_softmax(image, text, scale, bias, normalize, activation)
    ops, eager_forward, eager_topk = _KERNELS[impl]
    eager = (eager_forward if topk is None else eager_topk) if _eager.usable((image, text, scale, bias)) else None
    if topk is not None:
        if eager is not None:
            return eager(image, text, scale, bias, normalize, activation, topk)
        values, indices, *_ = ops[2](image, text, scale, bias, normalize, activation, topk)
        return values, indices
    if eager is not None:
        return eager(image, text, scale, bias, normalize, activation)
    return ops[0](image, text, scale, bias, normalize, activation)[0]
