"""Plain-PyTorch oracles for the CLIP (InfoNCE) and SigLIP (sigmoid) contrastive losses.

Mirrors open_clip 3.3.0 (`open_clip/loss.py`) line by line, distributed paths included:
  clip_loss   = (CE(scale*I@T.T + bias, labels) + CE(scale*T@I.T + bias, labels)) / 2, labels = arange(B)
  siglip_loss = -logsigmoid(labels * (scale*I@T.T + bias)).sum() / B,                labels = 2*eye(B) - 1
`logit_scale` is the already-exponentiated scale (open_clip passes `logit_scale.exp()`).
Upstream writes `logit_scale * image_features @ text_features.T`, which Python evaluates as
`(logit_scale * image_features) @ text_features.T`; the scale is applied in that order here too so that
low-precision rounding matches.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn as nn
import torch.nn.functional as F

from mmfast.ops._checks import check_dim_match


# ---- single-process math -----------------------------------------------------------------------
def _scaled_logits(rows: torch.Tensor, cols: torch.Tensor, logit_scale, logit_bias=None) -> torch.Tensor:
    logits = (logit_scale * rows) @ cols.T
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def _clip_logits(image_features, text_features, logit_scale):
    """Single process: both logit matrices, each computed by its own product as upstream does."""
    return (_scaled_logits(image_features, text_features, logit_scale),
            _scaled_logits(text_features, image_features, logit_scale))


def _add_bias_(logits_per_image, logits_per_text, logit_bias) -> None:
    # In place, as upstream: in the non-local distributed case logits_per_text is a view of
    # logits_per_image, so both end up with the bias added twice. A row constant cannot change a cross
    # entropy; doing the same keeps the rounding (and the ~0 bias gradient) bit-identical.
    if logit_bias is not None:
        logits_per_image += logit_bias
        logits_per_text += logit_bias


def _symmetric_cross_entropy(logits_per_image, logits_per_text, labels) -> torch.Tensor:
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, labels=None) -> torch.Tensor:
    """open_clip's single-process ClipLoss value. A bias shifts every logit of a row equally, so it
    cannot change the value (it is accepted because open_clip accepts it)."""
    check_dim_match("image_features", image_features, 0, "text_features", text_features, 0, "batch size")
    logits_per_image, logits_per_text = _clip_logits(image_features, text_features, logit_scale)
    _add_bias_(logits_per_image, logits_per_text, logit_bias)
    if labels is None:
        labels = torch.arange(image_features.shape[0], device=image_features.device, dtype=torch.long)
    return _symmetric_cross_entropy(logits_per_image, logits_per_text, labels)


def siglip_labels(batch: int, device, dtype, negative_only: bool = False) -> torch.Tensor:
    """+1 on the diagonal (matching pairs), -1 elsewhere; all -1 for blocks from other ranks."""
    labels = -torch.ones((batch, batch), device=device, dtype=dtype)
    if not negative_only:
        labels = 2 * torch.eye(batch, device=device, dtype=dtype) + labels
    return labels


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, negative_only=False) -> torch.Tensor:
    """open_clip's SigLipLoss._loss: -logsigmoid(labels * logits).sum() / B. With negative_only every pair
    is a negative (the text block came from another rank)."""
    check_dim_match("image_features", image_features, 0, "text_features", text_features, 0, "batch size")
    logits = _scaled_logits(image_features, text_features, logit_scale, logit_bias)
    labels = siglip_labels(image_features.shape[0], image_features.device, image_features.dtype, negative_only)
    return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]


# ---- distributed helpers -----------------------------------------------------------------------
def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise RuntimeError(f"mmfast: use_horovod=True needs horovod.torch, which does not import ({e})") from e
    return hvd


def gather_features(image_features, text_features, local_loss=False, gather_with_grad=False, rank=0,
                    world_size=1, use_horovod=False):
    """All-gather both feature blocks along the batch (open_clip's gather_features).

    gather_with_grad: an autograd all-gather, so each rank's features receive the gradients of every
    rank's loss (summed). Otherwise the gathered copies are constants, and (unless local_loss, where
    the local rows are used directly) the local slot is put back so the local features keep a gradient."""
    if use_horovod:
        hvd = _horovod()
        if gather_with_grad:
            return hvd.allgather(image_features), hvd.allgather(text_features)
        with torch.no_grad():
            all_image = hvd.allgather(image_features)
            all_text = hvd.allgather(text_features)
        if not local_loss:
            image_blocks = list(all_image.chunk(world_size, dim=0))
            text_blocks = list(all_text.chunk(world_size, dim=0))
            image_blocks[rank], text_blocks[rank] = image_features, text_features
            all_image, all_text = torch.cat(image_blocks, dim=0), torch.cat(text_blocks, dim=0)
        return all_image, all_text

    if gather_with_grad:
        return (torch.cat(torch.distributed.nn.all_gather(image_features), dim=0),
                torch.cat(torch.distributed.nn.all_gather(text_features), dim=0))
    image_blocks = [torch.zeros_like(image_features) for _ in range(world_size)]
    text_blocks = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(image_blocks, image_features)
    dist.all_gather(text_blocks, text_features)
    if not local_loss:
        image_blocks[rank], text_blocks[rank] = image_features, text_features
    return torch.cat(image_blocks, dim=0), torch.cat(text_blocks, dim=0)


def _p2p(ops) -> None:
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def neighbour_exchange(from_rank, to_rank, tensor, group=None) -> torch.Tensor:
    """Send `tensor` to to_rank and return what from_rank sent."""
    received = torch.zeros_like(tensor)
    _p2p([dist.P2POp(dist.isend, tensor, to_rank, group=group),
          dist.P2POp(dist.irecv, received, from_rank, group=group)])
    return received


def neighbour_exchange_bidir(left_rank, right_rank, tensor_to_left, tensor_to_right, group=None):
    """Send one tensor each way; returns (from_right, from_left)."""
    from_left = torch.zeros_like(tensor_to_right)
    from_right = torch.zeros_like(tensor_to_left)
    _p2p([dist.P2POp(dist.isend, tensor_to_right, right_rank, group=group),
          dist.P2POp(dist.isend, tensor_to_left, left_rank, group=group),
          dist.P2POp(dist.irecv, from_right, right_rank, group=group),
          dist.P2POp(dist.irecv, from_left, left_rank, group=group)])
    return from_right, from_left


class _NeighbourExchange(torch.autograd.Function):
    """The gradient of a received tensor travels back to the rank that sent it."""

    @staticmethod
    def forward(ctx, from_rank, to_rank, group, tensor):
        ctx.from_rank, ctx.to_rank, ctx.group = from_rank, to_rank, group
        return neighbour_exchange(from_rank, to_rank, tensor, group=group)

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, _NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, ctx.group, grad)


class _NeighbourExchangeBidir(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left_rank, right_rank, group, tensor_to_left, tensor_to_right):
        ctx.left_rank, ctx.right_rank, ctx.group = left_rank, right_rank, group
        return neighbour_exchange_bidir(left_rank, right_rank, tensor_to_left, tensor_to_right, group=group)

    @staticmethod
    def backward(ctx, grad_from_right, grad_from_left):
        # Swapping left and right sends each gradient back where its tensor came from; the result
        # comes back in (to_left, to_right) order.
        return (None, None, None) + _NeighbourExchangeBidir.apply(
            ctx.right_rank, ctx.left_rank, ctx.group, grad_from_right, grad_from_left)


def neighbour_exchange_with_grad(from_rank, to_rank, tensor, group=None):
    return _NeighbourExchange.apply(from_rank, to_rank, group, tensor)


def neighbour_exchange_bidir_with_grad(left_rank, right_rank, tensor_to_left, tensor_to_right, group=None):
    return _NeighbourExchangeBidir.apply(left_rank, right_rank, group, tensor_to_left, tensor_to_right)


# ---- drop-in reference modules -------------------------------------------------------------------
class ClipLoss(nn.Module):
    """open_clip 3.3.0 ClipLoss: same constructor, forward signature and return convention."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank  # local rows sit at offset B*rank among the gathered columns
        if self.cache_labels:
            self.labels[device] = labels
            self.prev_num_logits = num_logits
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        if self.world_size > 1:
            all_image, all_text = gather_features(image_features, text_features, self.local_loss,
                                                  self.gather_with_grad, self.rank, self.world_size,
                                                  self.use_horovod)
            if self.local_loss:
                logits_per_image = _scaled_logits(image_features, all_text, logit_scale)
                logits_per_text = _scaled_logits(text_features, all_image, logit_scale)
            else:
                logits_per_image = _scaled_logits(all_image, all_text, logit_scale)
                logits_per_text = logits_per_image.T
        else:
            logits_per_image, logits_per_text = _clip_logits(image_features, text_features, logit_scale)
        _add_bias_(logits_per_image, logits_per_text, logit_bias)
        return logits_per_image, logits_per_text

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        check_dim_match("image_features", image_features, 0, "text_features", text_features, 0, "batch size")
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale,
                                                            logit_bias=logit_bias)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        loss = _symmetric_cross_entropy(logits_per_image, logits_per_text, labels)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip 3.3.0 SigLipLoss. Across ranks, the text blocks of the other ranks are brought to each
    rank (dist_impl: 'bidir' ring both ways, 'shift' one-way ring, 'reduce' masked all-reduce per rank,
    'gather' autograd all-gather) and scored as negatives only; gradients flow back to their owners."""

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"mmfast: dist_impl must be one of {self.DIST_IMPLS} or None, got {dist_impl!r}")
        self.prev_num_logits = 0  # kept for state parity with open_clip, which does not use its cache either
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        return siglip_labels(num_logits, device, dtype, negative_only)

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, negative_only=negative_only)

    def _negatives(self, image_features, text_block, logit_scale, logit_bias):
        return self._loss(image_features, text_block, logit_scale, logit_bias, negative_only=True)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            loss = self._add_other_ranks(loss, image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _add_other_ranks(self, loss, image_features, text_features, logit_scale, logit_bias):
        """Adds the negatives-only loss of every other rank's text block to `loss`, in upstream's order
        (so the fp32 sum rounds the same)."""
        world, rank = self.world_size, self.rank
        right, left = (rank + 1) % world, (rank - 1 + world) % world
        if self.dist_impl == "bidir":
            # Pass blocks both ways round the ring: (world-1)//2 two-way steps, plus one one-way step
            # when world-1 is odd.
            to_left = to_right = text_features
            num_bidir, remainder = divmod(world - 1, 2)
            for _ in range(num_bidir):
                from_right, from_left = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
                for block in (from_right, from_left):
                    loss = loss + self._negatives(image_features, block, logit_scale, logit_bias)
                to_left, to_right = from_right, from_left
            if remainder:
                block = neighbour_exchange_with_grad(left, right, to_right)
                loss = loss + self._negatives(image_features, block, logit_scale, logit_bias)
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(world - 1):
                from_left = neighbour_exchange_with_grad(left, right, to_right)
                loss = loss + self._negatives(image_features, from_left, logit_scale, logit_bias)
                to_right = from_left
        elif self.dist_impl == "reduce":
            for i in range(world):
                block = torch.distributed.nn.all_reduce(text_features * (rank == i), dist.ReduceOp.SUM)
                # Upstream scores its own block too and multiplies by 0 (NaN stays NaN); kept as is.
                loss = loss + float(i != rank) * self._negatives(image_features, block, logit_scale, logit_bias)
        else:  # gather
            blocks = torch.distributed.nn.all_gather(text_features)
            for i in range(world):
                loss = loss + float(i != rank) * self._negatives(image_features, blocks[i], logit_scale, logit_bias)
        return loss
