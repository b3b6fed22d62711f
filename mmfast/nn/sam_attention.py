"""Drop-in SAM mask-decoder modules (segment-anything 1.0 and SAM2) on mmfast.ops.sam_attention.

Constructors, forward signatures and state_dict keys are the reference modules' (which mirror upstream),
so a SAM checkpoint's `mask_decoder.transformer` loads with strict=True. What differs is how forward runs:
- every attention goes through sam_attention, which picks an exact rearrangement for SAM's shapes
  (projections folded into the few-token side, no head split/merge copies; see its docstring);
- residual adds ride in the output GEMM where the arrangement allows, then LayerNorm;
- the image + positional-encoding sum is formed once per block: upstream adds it twice (token -> image
  keys and image -> token queries), each a pass over [B, 4096, 256];
- many prompts on one image (SAM's repeat_interleave): when every prompt's image embedding and
  positional encoding are the same, the first block's image-side projections run once (`shared_image`).
- with backend "cuda" and no gradient (inference), each of the transformer's 5 cross-attention blocks runs its
  attention, out_proj, residual and LayerNorm in one CUDA kernel (plus small GEMMs on the few tokens' side)
  where upstream launches ~15 kernels per block (mmfast.ops.sam_attention's fused blocks);
SAM2's Attention with dropout > 0 in training runs the reference forward (the rearrangements have no
dropout); SAM2's two-way transformer itself builds its attentions without dropout.
Under backend "auto" on a GPU whose dispatch table (mmfast/tuning) measured no mmfast implementation of
these modules faster than upstream, every module here runs upstream's own forward (the reference module's,
which mirrors it op for op): on the H200 of 2026-12-04 the fused fp32 path took 0.53-0.76x upstream's speed
at 7 tokens, where launches and host overhead, not arithmetic, set the time.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfast import backend as _backend
from mmfast.ops._checks import check_tensor
from mmfast.ops.cross_attention import HEAD_DIMS, IMPLEMENTATIONS
from mmfast.ops.sam_attention import Projections, sam_attention
from mmfast.reference import sam_attention as _ref


def _module_backend(x: Tensor, *attentions) -> str:
    """UPSTREAM (run the upstream forward) or the backend for sam_attention on `attentions`' weights
    (see backend.module_backend)."""
    fits = all(HEAD_DIMS[0] <= a.internal_dim // a.num_heads <= HEAD_DIMS[1] for a in attentions)
    return _backend.module_backend("sam_attention", IMPLEMENTATIONS, x.device, x.dtype, kernel_shapes=fits)


def _norm(layer_norm) -> tuple:
    return layer_norm.weight, layer_norm.bias, layer_norm.eps


def _runs_dropout(attention) -> bool:
    return attention.training and getattr(attention, "dropout_p", 0.0) > 0.0


class SamAttention(_ref.Attention):
    """segment-anything's Attention(embedding_dim, num_heads, downsample_rate=1)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if _backend.in_upstream_forward():
            return super().forward(q, k, v)
        impl = _module_backend(q, self)
        if impl == _backend.UPSTREAM:
            return super().forward(q, k, v)
        return sam_attention(q, k, v, Projections.of(self), self.num_heads, backend=impl)


class Sam2Attention(_ref.Sam2Attention):
    """SAM2's Attention(embedding_dim, num_heads, downsample_rate=1, dropout=0.0, kv_in_dim=None)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if _backend.in_upstream_forward():
            return super().forward(q, k, v)
        impl = _module_backend(q, self)
        if _runs_dropout(self) or impl == _backend.UPSTREAM:
            return super().forward(q, k, v)
        return sam_attention(q, k, v, Projections.of(self), self.num_heads, backend=impl)


class _FusedTwoWayBlock:
    """The two-way block's forward on sam_attention (mixed into the SAM and SAM2 blocks)."""

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        if _backend.in_upstream_forward():
            return super().forward(queries, keys, query_pe, key_pe)
        attentions = (self.self_attn, self.cross_attn_token_to_image, self.cross_attn_image_to_token)
        impl = _module_backend(queries, *attentions)
        if impl == _backend.UPSTREAM or any(_runs_dropout(a) for a in attentions):
            return super().forward(queries, keys, query_pe, key_pe)
        heads = self.self_attn.num_heads
        if self.skip_first_layer_pe:  # the first layer: no positional encoding and no residual
            queries = sam_attention(queries, queries, queries, Projections.of(self.self_attn), heads,
                                    norm=_norm(self.norm1), backend=impl)
        else:
            q = queries + query_pe
            queries = sam_attention(q, q, queries, Projections.of(self.self_attn), heads, residual=queries,
                                    norm=_norm(self.norm1), backend=impl)
        image_with_pe = keys + key_pe  # shared by both cross-attentions (keys do not change in between)
        queries = sam_attention(queries + query_pe, image_with_pe, keys, Projections.of(self.cross_attn_token_to_image),
                                heads, residual=queries, norm=_norm(self.norm2), backend=impl)
        queries = F.layer_norm(queries + self.mlp(queries), self.norm3.normalized_shape, self.norm3.weight,
                               self.norm3.bias, self.norm3.eps)
        q = queries + query_pe
        keys = sam_attention(image_with_pe, q, queries, Projections.of(self.cross_attn_image_to_token), heads,
                             residual=keys, norm=_norm(self.norm4), backend=impl)
        return queries, keys


class TwoWayAttentionBlock(_FusedTwoWayBlock, _ref.TwoWayAttentionBlock):
    """segment-anything's TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim=2048, activation=nn.ReLU,
    attention_downsample_rate=2, skip_first_layer_pe=False)."""

    attention_cls = SamAttention


class Sam2TwoWayAttentionBlock(_FusedTwoWayBlock, _ref.Sam2TwoWayAttentionBlock):
    """SAM2's TwoWayAttentionBlock (MLP keys mlp.layers.0/1)."""

    attention_cls = Sam2Attention


def _same_for_every_prompt(x: Tensor) -> bool:
    """x [B, ...]: True when all B rows are provably the same tensor content and sharing them cannot
    change a gradient: batch 1, stride 0 over the batch, or (outside torch.compile, x needing no
    gradient) rows equal to the first. SAM's mask decoder repeat_interleaves one image: the last case, a
    host sync on CUDA, skipped while a CUDA graph is captured (the per-prompt path then runs)."""
    if x.shape[0] == 1 or x.stride(0) == 0:
        return True
    if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # the comparison is a host sync: not in a graph
        return False
    return torch.equal(x, x[:1].expand_as(x))


class _FusedTwoWayTransformer:
    """The two-way transformer's forward (mixed into the SAM and SAM2 transformers)."""

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        check_tensor("image_embedding", image_embedding, 4)
        check_tensor("image_pe", image_pe, 4)
        check_tensor("point_embedding", point_embedding, 3)
        prompts = point_embedding.shape[0]
        for name, x in (("image_embedding", image_embedding), ("image_pe", image_pe)):
            if x.shape[1:] != image_embedding.shape[1:] or x.shape[0] not in (1, prompts):
                raise ValueError(f"mmfast: {name} has shape {tuple(x.shape)}; expected [B, C, H, W] with C, H, W "
                                 f"of image_embedding {tuple(image_embedding.shape)} and B = 1 or the "
                                 f"{prompts} prompts of point_embedding")
        if image_embedding.shape[1] != point_embedding.shape[2]:
            raise ValueError(f"mmfast: image_embedding has {image_embedding.shape[1]} channels but point_embedding "
                             f"{tuple(point_embedding.shape)} has {point_embedding.shape[2]}")
        impl = _module_backend(point_embedding, self.final_attn_token_to_image)
        if impl == _backend.UPSTREAM:  # upstream's forward, its blocks and attentions upstream's too
            return _backend.run_upstream(super().forward, image_embedding, image_pe, point_embedding)
        image = image_embedding.flatten(2).permute(0, 2, 1)  # [B, HW, C] views, as upstream
        pe = image_pe.flatten(2).permute(0, 2, 1)
        if _same_for_every_prompt(image) and _same_for_every_prompt(pe):
            image, pe = image[:1], pe[:1]  # shared image: batch 1, broadcast by sam_attention
        # Token-major copies, once: the [B, C, HW] -> [B, HW, C] views would otherwise be copied by every
        # projection that reads them and make each image + pe add a strided pass.
        image, pe = image.contiguous(), pe.contiguous()
        queries, keys = point_embedding, image
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=pe)
        final = self.final_attn_token_to_image
        if _runs_dropout(final):
            attended = final(q=queries + point_embedding, k=keys + pe, v=keys)
            queries = self.norm_final_attn(queries + attended)
        else:
            queries = sam_attention(queries + point_embedding, keys + pe, keys, Projections.of(final), final.num_heads,
                                    residual=queries, norm=_norm(self.norm_final_attn), backend=impl)
        if keys.shape[0] != prompts:  # depth 0 with a shared image: upstream returns one copy per prompt
            keys = keys.expand(prompts, -1, -1)
        return queries, keys


class TwoWayTransformer(_FusedTwoWayTransformer, _ref.TwoWayTransformer):
    """segment-anything's TwoWayTransformer(depth, embedding_dim, num_heads, mlp_dim, activation=nn.ReLU,
    attention_downsample_rate=2): forward(image_embedding [B, C, H, W], image_pe [B, C, H, W],
    point_embedding [B, Nq, C]) -> (queries [B, Nq, C], keys [B, H*W, C])."""

    block_cls = TwoWayAttentionBlock


class Sam2TwoWayTransformer(_FusedTwoWayTransformer, _ref.Sam2TwoWayTransformer):
    """SAM2's TwoWayTransformer (same signature; MLP keys mlp.layers.0/1)."""

    block_cls = Sam2TwoWayAttentionBlock
