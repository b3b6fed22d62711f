"""Drop-in open_clip 3.3.0 `ClipLoss` and `SigLipLoss` on mmfast's fused, memory-flat block operators.

Constructors, forward signatures, return conventions (`output_dict=True` gives
{"contrastive_loss": loss}) and per-rank gradient conventions are open_clip's: the modules subclass the
reference modules (mmfast.reference.contrastive_loss, which mirror open_clip) and replace only the
logit computations, so no B x B (or B_local x B_global) matrix is ever built.

Keyword-only extras:
- `dist_impl="ring"` (ClipLoss): instead of all-gathering the features (O(B_global * D) per rank),
  text blocks travel round a ring of point-to-point exchanges (Inf-CL style) and one pass gives both
  directions' log-sum-exps; the backward pass sends the blocks round again with their gradients. Memory
  per rank stays O(B_local * D) while the global batch grows. Gradients follow the gather_with_grad=True
  convention (each rank's features receive the gradients of every rank's loss), so the ring requires it;
  logit_scale's gradient is split across ranks differently from open_clip's, with the same sum over ranks
  (what DDP's averaging sees).
- `process_group`: the torch.distributed group (default: the world).
- `backend`: the mmfast backend for the block operators.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mmfast.ops import contrastive_loss as _ops
from mmfast.reference import contrastive_loss as _ref


def _check_even_batches(features: torch.Tensor, group) -> None:
    """Every rank must hold the same batch (open_clip's assumption): a clear error instead of a hang or a
    wrong gather. The sizes travel on the features' device, which the group's backend serves (NCCL takes
    CUDA tensors only). CPU features: a ValueError naming every size. CUDA features: an asynchronous device
    assert, so that the check adds no host sync to the step (CUDA graphs, overlap); a mismatch stops the
    process at the next synchronizing call with this message."""
    batch = features.shape[0]
    local = torch.full((1,), batch, dtype=torch.int64, device=features.device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    if features.device.type == "cpu":
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"mmfast: every rank must have the same batch size; got per-rank batch sizes {sizes}")
    else:
        torch._assert_async(torch.cat(sizes).eq(batch).all(),
                            "mmfast: every rank must have the same batch size (open_clip's losses assume it)")


class ClipLoss(_ref.ClipLoss):
    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, dist_impl=None, process_group=None, backend=None):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod)
        if dist_impl not in (None, "gather", "ring"):
            raise ValueError(f"mmfast: dist_impl must be None, 'gather' or 'ring', got {dist_impl!r}")
        if dist_impl == "ring" and not gather_with_grad:
            raise ValueError("mmfast: dist_impl='ring' computes the gradients of every rank's loss "
                             "(gather_with_grad=True semantics); pass gather_with_grad=True")
        if dist_impl == "ring" and use_horovod:
            raise ValueError("mmfast: dist_impl='ring' uses torch.distributed, not horovod")
        self.dist_impl = dist_impl or "gather"
        self.process_group = process_group
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size == 1:
            loss = _ops.clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            _ops.check_pair(image_features, text_features)
            if not self.use_horovod:
                _check_even_batches(image_features, self.process_group)
            if self.dist_impl == "ring":
                loss = self._ring_loss(image_features, text_features, logit_scale)
            else:
                loss = self._gathered_loss(image_features, text_features, logit_scale)
            if logit_bias is not None:
                loss = loss + 0 * logit_bias  # a bias cancels in both cross entropies: exactly-zero gradient
        return {"contrastive_loss": loss} if output_dict else loss

    def _gathered_loss(self, image, text, scale):
        all_image, all_text = _ref.gather_features(image, text, self.local_loss, self.gather_with_grad, self.rank,
                                                   self.world_size, self.use_horovod)
        if not self.local_loss:  # every rank computes the global loss, as open_clip does
            return _ops.clip_loss(all_image, all_text, scale, backend=self.backend)
        offset = image.shape[0] * self.rank  # local rows' positives sit at B*rank among the gathered columns
        per_image = _ops.clip_row_loss(image, all_text, scale, offset, backend=self.backend)
        per_text = _ops.clip_row_loss(text, all_image, scale, offset, backend=self.backend)
        return (per_image + per_text) / 2

    def _ring_loss(self, image, text, scale):
        row_lse, col_lse, pos = _ops.clip_ring_lse(image, text, scale, group=self.process_group,
                                                   backend=self.backend)
        batch = image.shape[0]
        local = (row_lse - pos).sum() + (col_lse - pos).sum()
        if self.local_loss:  # this rank's rows against every column, both directions
            loss = local / (2 * batch)
        else:  # the global loss on every rank, as open_clip computes it
            loss = torch.distributed.nn.all_reduce(local, group=self.process_group) / (2 * batch * self.world_size)
        return loss.to(image.dtype)


class SigLipLoss(_ref.SigLipLoss):
    """open_clip's SigLipLoss; other ranks' text blocks (exchanged as `dist_impl` says) are scored by the
    fused negatives-only block operator."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, *, backend=None):
        super().__init__(cache_labels, rank, world_size, dist_impl)
        self.backend = backend

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        return _ops.siglip_block_loss(image_features, text_features, logit_scale, logit_bias,
                                      has_positives=not negative_only, backend=self.backend)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if self.world_size > 1:
            _ops.check_pair(image_features, text_features)
            _check_even_batches(image_features, None)
        return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict)
