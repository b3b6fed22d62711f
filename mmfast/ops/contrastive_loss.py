"""mmfast.contrastive_loss: fused, memory-flat CLIP (InfoNCE) and SigLIP contrastive losses.

Operators (schemas and block semantics in csrc/mmfast.cpp):
  mmfast::clip_loss_block              row/column log-sum-exps and positive logits of a rows x cols block
  mmfast::clip_loss_block_backward     its gradient given (global) lses and upstream coefficients
  mmfast::siglip_loss_block            the SigLIP loss sum of a block and its gradients, in one pass
                                       (CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda: backends
                                       "cpu" and "cuda" call the same operators)
  mmfast::*_triton                     Triton kernels (mmfast/triton/contrastive_loss.py), when that exists
None of them builds the B x B logits. A single process is one block; the distributed variants (local
loss with a label offset, ring exchange of feature blocks, SigLIP neighbour exchange with negatives-only
blocks) are built from the same block operators. This file checks arguments, picks the backend, and
registers the operators' fake impls and the Triton operators' autograd (the native operators' autograd is
C++, csrc/autograd.cpp). Besides the two open_clip losses it exposes the
single-block pieces the distributed modules (mmfast/nn/contrastive_loss.py) build on: check_pair,
clip_row_loss (one direction over a rectangular block with a label offset: the local loss) and
siglip_block_loss (with or without positives).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

from mmfast import backend as _backend
from mmfast.ops import _eager
from mmfast.ops._checks import check_dim_match, check_same_device_dtype, scalar_tensor, tensor_shape
from mmfast.reference import contrastive_loss as _ref

CLIP_OP, SIGLIP_OP = "clip_loss", "siglip_loss"

# Operator names per backend: (clip forward, clip backward, siglip).
_NATIVE = ("clip_loss_block", "clip_loss_block_backward", "siglip_loss_block")
_TRITON = tuple(n + "_triton" for n in _NATIVE)

_HAS_TRITON = (_backend._triton_error is None
               and importlib.util.find_spec("mmfast.triton.contrastive_loss") is not None)
# "cuda" runs the same operators as "cpu" (the dispatcher picks the kernel by device); it exists when the
# extension was built with the CUDA kernels (csrc/cuda/contrastive_loss_api.cpp).
_HAS_CUDA = _backend.has_native_kernel(_NATIVE[0], "CUDA")
IMPLEMENTATIONS = (("cuda",) if _HAS_CUDA else ()) + (("triton",) if _HAS_TRITON else ()) + ("cpu", "reference")


def _stats_dtype(rows: torch.Tensor) -> torch.dtype:
    """Statistics and scalar gradients are fp32 (fp64 for fp64 features)."""
    return torch.float64 if rows.dtype == torch.float64 else torch.float32


# ---- fake (meta) impls: shapes only, so torch.compile and opcheck can trace ----------------------
def _fake_clip(rows, cols, logit_scale, logit_bias, label_offset):
    st = _stats_dtype(rows)
    return (rows.new_empty(rows.shape[0], dtype=st), rows.new_empty(cols.shape[0], dtype=st),
            rows.new_empty(rows.shape[0], dtype=st))


def _fake_clip_backward(rows, cols, logit_scale, logit_bias, label_offset, row_lse, col_lse, grad_row_lse,
                        grad_col_lse, grad_pos_logits):
    st = _stats_dtype(rows)
    return (rows.new_empty(rows.shape), cols.new_empty(cols.shape), rows.new_empty((), dtype=st),
            rows.new_empty((), dtype=st))


def _fake_siglip(rows, cols, logit_scale, logit_bias, has_positives, compute_grad):
    st = _stats_dtype(rows)
    loss = rows.new_empty((), dtype=st)
    if not compute_grad:
        return loss, rows.new_empty(0), rows.new_empty(0), rows.new_empty(0, dtype=st), rows.new_empty(0, dtype=st)
    return (loss, rows.new_empty(rows.shape), cols.new_empty(cols.shape), rows.new_empty((), dtype=st),
            rows.new_empty((), dtype=st))


# ---- autograd of the Triton operators (the native ones': csrc/autograd.cpp, the same logic in C++) -
def _register_autograd(names):
    clip_fwd, clip_bwd, siglip = names
    clip_bwd_op = getattr(torch.ops.mmfast, clip_bwd)

    def setup_clip(ctx, inputs, output):
        rows, cols, logit_scale, logit_bias, label_offset = inputs
        row_lse, col_lse, _pos = output
        ctx.save_for_backward(rows, cols, logit_scale, logit_bias, row_lse, col_lse)
        ctx.label_offset = label_offset
        ctx.set_materialize_grads(False)  # an unused output (e.g. col_lse of the local loss) costs no exp pass

    def backward_clip(ctx, grad_row_lse, grad_col_lse, grad_pos):
        rows, cols, scale, bias, row_lse, col_lse = ctx.saved_tensors
        if grad_row_lse is None and grad_col_lse is None and grad_pos is None:
            return None, None, None, None, None
        st = row_lse.dtype
        grads = [None if g is None else g.to(st) for g in (grad_row_lse, grad_col_lse, grad_pos)]
        gr, gc, gs, gb = clip_bwd_op(rows, cols, scale, bias, ctx.label_offset, row_lse, col_lse, *grads)
        return gr, gc, gs.to(scale.dtype), (None if bias is None else gb.to(bias.dtype)), None

    def setup_siglip(ctx, inputs, output):
        rows, cols, logit_scale, logit_bias, has_positives, compute_grad = inputs
        _loss, gr, gc, gs, gb = output
        ctx.mark_non_differentiable(gr, gc, gs, gb)
        ctx.save_for_backward(gr, gc, gs, gb)
        ctx.compute_grad, ctx.has_bias = compute_grad, logit_bias is not None
        ctx.scale_dtype = logit_scale.dtype
        ctx.bias_dtype = None if logit_bias is None else logit_bias.dtype

    def backward_siglip(ctx, grad_loss, *_):
        if not ctx.compute_grad:
            raise RuntimeError(f"mmfast: {siglip} ran with compute_grad=False, so it has no gradient to give")
        gr, gc, gs, gb = ctx.saved_tensors
        # The gradients of the loss sum were computed in the forward pass: only scale them.
        return (gr * grad_loss.to(gr.dtype), gc * grad_loss.to(gc.dtype), (gs * grad_loss).to(ctx.scale_dtype),
                (gb * grad_loss).to(ctx.bias_dtype) if ctx.has_bias else None, None, None)

    torch.library.register_autograd(f"mmfast::{clip_fwd}", backward_clip, setup_context=setup_clip)
    torch.library.register_autograd(f"mmfast::{siglip}", backward_siglip, setup_context=setup_siglip)


def _register_fakes(names):
    for name, fake in zip(names, (_fake_clip, _fake_clip_backward, _fake_siglip)):
        torch.library.register_fake(f"mmfast::{name}")(fake)


if _backend._C is not None:
    _register_fakes(_NATIVE)
if _HAS_TRITON:
    import mmfast.triton.contrastive_loss  # noqa: F401  (defines the mmfast::*_triton custom ops)
    _register_fakes(_TRITON)
    _register_autograd(_TRITON)


# ---- the public functions ------------------------------------------------------------------------
def check_pair(image_features, text_features, *, same_batch=True):
    """Two feature blocks [B, D]: floating, one dtype and device, equal D (and equal B when same_batch).
    Errors name the argument."""
    image, text = image_features, text_features
    image_shape = tensor_shape("image_features", image, 2)
    text_shape = tensor_shape("text_features", text, 2)
    check_same_device_dtype(("image_features", "text_features"), image, text)
    if image_shape[1] != text_shape[1] or (same_batch and image_shape[0] != text_shape[0]):  # say which
        if same_batch:
            check_dim_match("image_features", image, 0, "text_features", text, 0, "batch size")
        check_dim_match("image_features", image, 1, "text_features", text, 1, "feature dim D")
    return image, text


def _scalars(logit_scale, logit_bias, like):
    scale = scalar_tensor("logit_scale", logit_scale, like)
    return scale, (None if logit_bias is None else scalar_tensor("logit_bias", logit_bias, like))


# Each kernel backend's operators, looked up once (a walk through torch.ops per call cost ~0.5 us), and the
# eager entry points of the native forward operators (csrc/mmfast.cpp).
_KERNEL_OPS = {}
_EAGER_CLIP, _EAGER_SIGLIP = _eager.entry(_NATIVE[0]), _eager.entry(_NATIVE[2])
if _backend._C is not None:
    _KERNEL_OPS["cpu"] = _KERNEL_OPS["cuda"] = tuple(getattr(torch.ops.mmfast, n).default for n in _NATIVE)
if _HAS_TRITON:
    _KERNEL_OPS["triton"] = tuple(getattr(torch.ops.mmfast, n).default for n in _TRITON)

# What runs the reference: asked for, or "upstream" (the dispatch table found no kernel faster than upstream
# on this device; the reference is upstream's computation line by line).
_REFERENCE = ("reference", _backend.UPSTREAM)


def _op(impl: str, index: int):
    return _KERNEL_OPS[impl][index]


def _clip_block(impl: str, rows, cols, scale, label_offset: int):
    """clip_loss_block of backend impl (through its eager entry point where that may be taken)."""
    if impl != "triton" and _EAGER_CLIP is not None and _eager.usable((rows, cols, scale)):
        return _EAGER_CLIP(rows, cols, scale, None, label_offset)
    return _op(impl, 0)(rows, cols, scale, None, label_offset)


def _siglip_block_sum(impl: str, rows, cols, scale, bias, has_positives: bool, compute_grad: bool):
    """siglip_loss_block's loss sum, of backend impl (through its eager entry point where that may be taken)."""
    if impl != "triton" and _EAGER_SIGLIP is not None and _eager.usable((rows, cols, scale, bias)):
        return _EAGER_SIGLIP(rows, cols, scale, bias, has_positives, compute_grad)
    return _op(impl, 2)(rows, cols, scale, bias, has_positives, compute_grad)[0]


def _with_zero_bias_grad(loss, bias):
    """A bias shifts every logit of a row (and of a column) alike, so it cancels in a cross entropy: the
    kernels run without it (two fewer roundings) and the bias gets its exactly-zero gradient here."""
    return loss if bias is None else loss + 0 * bias


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, backend=None):
    """open_clip's single-process ClipLoss: (CE(s*I@T.T + b, arange) + CE(s*T@I.T + b, arange)) / 2.

    image_features, text_features [B, D] (fp32, fp16 or bf16; float64 runs the reference);
    logit_scale the already-exponentiated scale (float, 0-dim or [1] tensor), logit_bias optional.
    Returns a 0-dim loss in the features' dtype. One tiled pass computes both the row and the column
    log-sum-exps (1 B x B x D GEMM), the backward recomputes the tiles (3 GEMMs): 4 GEMMs where
    open_clip's autograd runs 6, and no B x B buffer.
    """
    image, text = check_pair(image_features, text_features)
    scale, bias = _scalars(logit_scale, logit_bias, image)
    impl = _backend.resolve(CLIP_OP, IMPLEMENTATIONS, image.device, image.dtype, backend)
    if impl in _REFERENCE:
        return _ref.clip_loss(image, text, scale, bias)
    row_lse, col_lse, pos = _clip_block(impl, image, text, scale, 0)
    # sum_i (row_lse_i - pos_i) + (col_lse_i - pos_i) in 4 ops rather than 6: at small B the ops' per-call cost
    # is the whole cost (B=4 with grad, one thread, 2-core dev CPU: 10.8 vs 15.2 us)
    loss = torch.sub(row_lse + col_lse, pos, alpha=2).sum() / (2 * image.shape[0])
    return _with_zero_bias_grad(loss, bias).to(image.dtype)


def clip_row_loss(rows, cols, logit_scale, label_offset=0, logit_bias=None, *, backend=None):
    """One direction of the CLIP loss over a rectangular block: mean_i CE(s * rows @ cols.T + b, labels)
    with labels = arange(Bi) + label_offset, i.e. open_clip's local loss (rank r's rows against all
    gathered columns, offset Bi * r). Every row's positive must be a column of the block. The column
    log-sum-exps the forward pass also yields are left unused, so the backward skips their term.
    """
    rows, cols = check_pair(rows, cols, same_batch=False)
    if isinstance(label_offset, bool) or not isinstance(label_offset, int) or not (
            0 <= label_offset and label_offset + rows.shape[0] <= cols.shape[0]):
        raise ValueError(f"mmfast: label_offset must be an int with 0 <= label_offset and label_offset + "
                         f"{rows.shape[0]} (rows) <= {cols.shape[0]} (columns), got {label_offset!r}")
    scale, bias = _scalars(logit_scale, logit_bias, rows)
    impl = _backend.resolve(CLIP_OP, IMPLEMENTATIONS, rows.device, rows.dtype, backend)
    if impl in _REFERENCE:
        labels = torch.arange(rows.shape[0], device=rows.device) + label_offset
        return torch.nn.functional.cross_entropy(_ref._scaled_logits(rows, cols, scale, bias), labels)
    row_lse, _col_lse, pos = _clip_block(impl, rows, cols, scale, label_offset)
    return _with_zero_bias_grad((row_lse - pos).mean(), bias).to(rows.dtype)


def siglip_block_loss(image_features, text_features, logit_scale, logit_bias, *, has_positives=True,
                      backend=None):
    """open_clip's SigLipLoss._loss over one block: -logsigmoid(labels * (s*I@T.T + b)).sum() / B with
    labels = 2*eye(B) - 1, or all -1 when not has_positives (a text block from another rank)."""
    image, text = check_pair(image_features, text_features)
    scale, bias = _scalars(logit_scale, logit_bias, image)
    impl = _backend.resolve(SIGLIP_OP, IMPLEMENTATIONS, image.device, image.dtype, backend)
    if impl in _REFERENCE:
        return _ref.siglip_loss(image, text, scale, bias, negative_only=not has_positives)
    compute_grad = torch.is_grad_enabled() and (image.requires_grad or text.requires_grad or scale.requires_grad
                                                or (bias is not None and bias.requires_grad))
    loss_sum = _siglip_block_sum(impl, image, text, scale, bias, bool(has_positives), compute_grad)
    return (loss_sum / image.shape[0]).to(image.dtype)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend=None):
    """open_clip's single-process SigLipLoss: -logsigmoid(labels * (s*I@T.T + b)).sum() / B with
    labels = 2*eye(B) - 1 (logit_bias may be None).

    Loss and gradients come from one tiled pass of 3 GEMMs (the gradient sigmoid(x) - [i == j] needs no
    row statistics); the backward only scales the saved gradients. The gradient GEMMs are skipped when
    no input requires grad (or grad mode is off).
    """
    return siglip_block_loss(image_features, text_features, logit_scale, logit_bias, backend=backend)


# ---- the ring (Inf-CL style): both directions' log-sum-exps from one pass of text blocks ----------
def _ring_exchange(group, send_to, recv_from, tensors):
    """Send `tensors` to rank send_to and return same-shaped tensors received from recv_from."""
    tensors = [t.contiguous() for t in tensors]  # autograd's gradients can be expanded views
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, send_to, group=group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, recv_from, group=group) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


def _ring_neighbours(group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    return world, to_global((rank + 1) % world), to_global((rank - 1) % world)


class _ClipRingLSE(torch.autograd.Function):
    """(row_lse, col_lse, pos) of this rank's images against ALL texts and of this rank's texts against
    ALL images, plus the positive logits, without gathering: each rank's text block travels round the
    ring once with its running column log-sum-exp (W - 1 exchanges, then one of the finished column
    statistics). Backward sends the blocks round again with their statistics and gradient accumulators,
    so each rank's features get the gradient of every rank's loss terms. Per-rank memory O(B_local * D)."""

    @staticmethod
    def forward(ctx, image, text, scale, group, forward_op, backward_op):
        world, right, left = _ring_neighbours(group)
        batch = image.shape[0]
        block, row_lse, col_lse = text.contiguous(), None, None
        for step in range(world):
            # Only the own block (step 0) holds the positives: offset `batch` puts them outside the block.
            r_lse, c_lse, p = forward_op(image, block, scale, None, 0 if step == 0 else batch)
            if step == 0:
                pos = p
            row_lse = r_lse if row_lse is None else torch.logaddexp(row_lse, r_lse)
            col_lse = c_lse if col_lse is None else torch.logaddexp(col_lse, c_lse)
            if step < world - 1:
                block, col_lse = _ring_exchange(group, right, left, [block, col_lse])
        (col_lse,) = _ring_exchange(group, right, left, [col_lse])  # the finished stats come home
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.group, ctx.backward_op = group, backward_op
        return row_lse, col_lse, pos

    @staticmethod
    def backward(ctx, grad_row, grad_col, grad_pos):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        world, right, left = _ring_neighbours(ctx.group)
        batch = image.shape[0]
        zeros = torch.zeros_like(row_lse)
        grad_row = zeros if grad_row is None else grad_row.to(row_lse.dtype)
        grad_col = zeros if grad_col is None else grad_col.to(row_lse.dtype)
        grad_image = torch.zeros(image.shape, dtype=torch.float32, device=image.device)
        grad_text_acc = torch.zeros(text.shape, dtype=torch.float32, device=text.device)
        grad_scale = torch.zeros((), dtype=row_lse.dtype, device=image.device)
        block, block_col_lse, block_grad_col = text.contiguous(), col_lse, grad_col
        for step in range(world):
            own = step == 0
            g_pos = None if (not own or grad_pos is None) else grad_pos.to(row_lse.dtype)
            g_rows, g_cols, g_scale, _ = ctx.backward_op(image, block, scale, None, 0 if own else batch, row_lse,
                                                         block_col_lse, grad_row, block_grad_col, g_pos)
            grad_image += g_rows
            grad_text_acc += g_cols
            grad_scale += g_scale
            if step < world - 1:
                block, block_col_lse, block_grad_col, grad_text_acc = _ring_exchange(
                    ctx.group, right, left, [block, block_col_lse, block_grad_col, grad_text_acc])
        (grad_text,) = _ring_exchange(ctx.group, right, left, [grad_text_acc])  # the finished gradient comes home
        return grad_image.to(image.dtype), grad_text.to(text.dtype), grad_scale.to(scale.dtype), None, None, None


def clip_ring_lse(image_features, text_features, logit_scale, *, group=None, backend=None):
    """Distributed CLIP statistics by a ring exchange (see _ClipRingLSE): returns this rank's
    (row_lse [B], col_lse [B], pos_logits [B]) over the global batch, differentiable."""
    image, text = check_pair(image_features, text_features)
    scale, _ = _scalars(logit_scale, None, image)
    impl = _backend.resolve(CLIP_OP, IMPLEMENTATIONS, image.device, image.dtype, backend)
    if impl in _REFERENCE:
        why = ("backend 'reference' has none (use dist_impl='gather')" if impl == "reference" else
               f"under 'auto' the dispatch table chose upstream's computation for {image.dtype} on {image.device}, "
               "which has no ring (pass backend='cuda', or use dist_impl='gather')")
        raise _backend.BackendUnavailableError(f"mmfast: the ring CLIP loss runs the fused block operators; {why}")
    return _ClipRingLSE.apply(image, text, scale, group, _op(impl, 0), _op(impl, 1))
