"""mmfast.similarity_softmax: the fused CLIP zero-shot similarity + softmax (or sigmoid).

Operators (schemas in csrc/mmfast.cpp):
  mmfast::similarity_softmax / _backward       C++ CPU (csrc/cpu) and CUDA (csrc/cuda) kernels
  mmfast::similarity_topk / _backward          the top-k mode, never building the N x C matrix
  mmfast::similarity_softmax_triton, ...       the Triton kernels (mmfast/triton/similarity_softmax.py)
This file checks arguments, picks the backend, and registers the fake impls of all of them and the autograd
of the Triton ones (the native operators' autograd is C++, csrc/autograd.cpp).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from mmfast import backend as _backend
from mmfast.ops import _eager
from mmfast.ops._checks import (check_dim_match, check_same_device_dtype, check_scalar, check_tensor, scalar_tensor,
                                tensor_shape)
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


# ---- the batched, per-row and masked form (grounding and open-vocabulary heads) ----------------------
def _per_row(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 1


def _check_row_factor(name: str, value, image: torch.Tensor):
    """A scalar (number, 0-dim or [1] tensor) or a per-row tensor [..., N, 1] of image's leading shape, finite.
    CUDA tensors are checked by an asynchronous device assert (no host sync)."""
    if _per_row(value):
        want = (*image.shape[:-1], 1)
        if tuple(value.shape) != want:
            raise ValueError(f"mmfast: {name} must be a scalar or a per-row tensor of shape {list(want)}, "
                             f"got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"mmfast: {name} must be a floating tensor, got {value.dtype}")
        if value.device != image.device:
            raise ValueError(f"mmfast: {name} is on {value.device} but the features are on {image.device}")
    else:
        check_scalar(name, value, image)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"mmfast: {name} must be finite, got {value}")
    elif value.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"mmfast: {name} must be finite, got non-finite values")
    else:  # traced, or on a GPU: checked where the values are, without a host sync (a failure stops the process)
        torch._assert_async(torch.isfinite(value).all(), f"mmfast: {name} must be finite")
    return value


def _batched(image, text, logit_scale, logit_bias, normalize, activation, query_mask, topk, topk_dim, backend):
    """similarity_softmax's form for batched features, per-row scales and shifts, query masks and top-k over
    either axis: torch's GEMM with one fused pass over the logits (norms folded into a per-row factor, in place
    where autograd keeps nothing); backend "reference" (and float64) runs mmfast.reference line by line."""
    image_shape = tensor_shape("image_features", image, (2, 3))
    text_shape = tensor_shape("text_features", text, (2, 3))
    check_same_device_dtype(("image_features", "text_features"), image, text)
    check_dim_match("image_features", image, -1, "text_features", text, -1, "feature dim D")
    if len(text_shape) == 3 and (len(image_shape) == 2 or text_shape[0] not in (1, image_shape[0])):
        raise ValueError(f"mmfast: text_features {tuple(text_shape)} is batched: image_features must be [B, N, D] "
                         f"with B = {text_shape[0]} (or text batch 1, shared), got {tuple(image_shape)}")
    classes, rows = text_shape[-2], image_shape[-2]
    _check_row_factor("logit_scale", logit_scale, image)
    if logit_bias is not None:
        _check_row_factor("logit_bias", logit_bias, image)
    if query_mask is not None:
        if not isinstance(query_mask, torch.Tensor):
            raise TypeError(f"mmfast: query_mask must be a tensor, got {type(query_mask).__name__}")
        batch = image_shape[0] if len(image_shape) == 3 else None
        allowed = {(classes,)} | ({(batch, classes), (1, classes)} if batch is not None else set())
        if tuple(query_mask.shape) not in allowed:
            raise ValueError(f"mmfast: query_mask must have shape [{classes}]" + (f" or [{batch}, {classes}]" if batch
                             else "") + f" (one entry per class of text_features), got {tuple(query_mask.shape)}")
        if query_mask.device != image.device:
            raise ValueError(f"mmfast: query_mask is on {query_mask.device} but the features are on {image.device}")
    if topk_dim not in (-1, -2):
        raise ValueError(f"mmfast: topk_dim must be -1 (top classes per row) or -2 (top rows per class), got {topk_dim!r}")
    if topk is not None:
        size = classes if topk_dim == -1 else rows
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= size:
            raise ValueError(f"mmfast: topk must be an int in [1, {size}] ({'C' if topk_dim == -1 else 'N'}), "
                             f"got {topk!r}")
    name = backend if backend is not None else _backend.get_backend()
    if name == "reference" or image.dtype == torch.float64:
        return _ref.similarity_batched(image, text, logit_scale, logit_bias, normalize, activation, query_mask, topk,
                                       topk_dim)
    if name != "auto":
        raise ValueError(f"mmfast: similarity_softmax's batched / per-row / masked form runs torch's GEMM with a fused "
                         f"epilogue (backend 'auto') or the reference; the {name!r} kernels take 2-D features and "
                         f"scalar scales only")
    factor = logit_scale
    if normalize:  # F.normalize's x / max(||x||, 1e-12), the image side folded into the per-row factor
        factor = logit_scale / torch.linalg.vector_norm(image, dim=-1, keepdim=True).clamp_min(1e-12)
        text = F.normalize(text, dim=-1)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (image, text, logit_scale, logit_bias)
                                           if isinstance(t, torch.Tensor))
    logits = scaled_logits(image, text, factor, logit_bias, query_mask, grad)
    if activation == "softmax":
        logits = logits.softmax(dim=-1)
    elif activation == "sigmoid":
        logits = torch.sigmoid(logits) if grad else logits.sigmoid_()
    return logits if topk is None else logits.topk(topk, dim=topk_dim)


def scaled_logits(image, text, factor, offset, query_mask, grad: bool):
    """image @ text^T * factor + offset ([..., N, C]; factor and offset scalars or per row [..., N, 1]), the classes
    whose query_mask entry is 0 at the dtype's lowest value: one GEMM, then one pass over its output in place
    (out of place where grad: autograd keeps the product) and, where something is masked, one fill. No checks
    (the callers': similarity_softmax's batched form, mmfast.nn.OwlClassHead). Upstream heads make a tensor per
    step instead (OWLv2's class head: benchmarks/owl.py, figures in benchmarks/RESULTS.md)."""
    logits = torch.matmul(image, text.transpose(-1, -2))
    if grad:
        logits = logits * factor if offset is None else torch.addcmul(torch.as_tensor(offset).to(logits), logits,
                                                                       factor)
    else:
        logits.mul_(factor)
        if offset is not None:
            logits.add_(offset)
    if query_mask is not None:
        masked = (query_mask == 0).unsqueeze(-2)
        lowest = torch.finfo(logits.dtype).min
        if grad:
            logits = logits.masked_fill(masked, lowest)
        elif (masked.device.type != "cpu" or torch.compiler.is_compiling()  # a CPU check is free; a GPU one a
              or bool(masked.any())):  # host sync, and a traced one a graph break
            logits.masked_fill_(masked, lowest)
    return logits


# ---- the public function -------------------------------------------------------------------------
def similarity_softmax(image_features, text_features, logit_scale=100.0, logit_bias=None, *,
                       normalize=True, activation="softmax", topk=None, query_mask=None, topk_dim=-1, backend=None):
    """Fused `act(logit_scale * normalize(image) @ normalize(text).T + logit_bias)`.

    image_features [N, D], text_features [C, D] (fp32, fp16 or bf16; float64 runs the reference).
    logit_scale is the already-exponentiated scale (float, 0-dim or [1] tensor; 100 for CLIP);
    logit_bias an optional scalar (SigLIP). activation: "softmax" (over classes), "sigmoid" or None
    (logits). topk=k returns (values [N, k], indices [N, k]) sorted descending, computed in one pass
    over class tiles (online log-sum-exp + running top-k) without the N x C matrix.
    NaN/Inf in the inputs propagate as in the reference (a NaN feature row gives a NaN output row).
    Every output and gradient (features, logit_scale, logit_bias) comes from fused kernels.

    Grounding and open-vocabulary heads (GLIP's region-word alignment, OWL-ViT/OWLv2's
    `(normalize(patch) @ normalize(query).T + shift) * scale`: logit_scale=scale, logit_bias=shift * scale):
    image_features [B, N, D] against text_features [B, C, D] or a shared [C, D]; logit_scale and logit_bias
    also per row, [B, N, 1] (finite: checked); query_mask [B, C] or [C], its zeros setting those classes'
    logits to the dtype's lowest value before the activation; topk_dim=-2 takes the top rows of each class
    ([B, k, C]). This form runs torch's GEMM and one fused pass over the logits (backend "auto"), or the
    reference; the kernels take the 2-D, scalar form.
    """
    if (query_mask is not None or topk_dim != -1 or getattr(image_features, "ndim", 2) != 2
            or getattr(text_features, "ndim", 2) != 2 or _per_row(logit_scale) or _per_row(logit_bias)):
        if activation is None:
            activation = "none"
        if activation not in ACTIVATIONS:
            raise ValueError(f"mmfast: activation must be 'softmax', 'sigmoid' or None, got {activation!r}")
        return _batched(image_features, text_features, logit_scale, logit_bias, normalize, activation, query_mask,
                        topk, topk_dim, backend)
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
