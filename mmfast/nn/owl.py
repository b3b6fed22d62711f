"""Drop-in for the class-prediction head of OWL-ViT / OWLv2 (transformers' OwlViTClassPredictionHead and
Owlv2ClassPredictionHead: same parameters, state_dict keys, forward and outputs; upstream's code is in
mmfast/reference/owl.py).

Upstream runs three Linears over the patch embeddings (dense0 and the 1-wide logit_shift and logit_scale: three
passes over image_embeds), normalizes the projected patches into a new tensor before the patch x query GEMM,
then makes three more full [B, P, Q] tensors: + shift, * scale, where(mask). Here the two 1-wide Linears are
one GEMM, the patch norms are folded into a per-patch factor, and the logits get `logits * (scale / norm) +
shift * scale` in place (out of place when autograd needs them) and, with a mask that masks something, one
in-place fill. The GEMMs are the same; the math differs from upstream's only in rounding (the patch
normalization is applied after the GEMM instead of before). OWLv2 at 960 px against LVIS on the dev CPU: see
benchmarks/RESULTS.md, "owl_class_head".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops._checks import tensor_shape
from mmfast.ops.similarity_softmax import scaled_logits
from mmfast.reference import owl as _ref

EPS = 1e-6  # upstream's norm offset


def _plain_linear(layer) -> bool:
    return type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)


class OwlClassHead(_ref.OwlClassPredictionHead):
    """transformers' Owlv2ClassPredictionHead(config) / OwlViTClassPredictionHead(config): forward(image_embeds
    [B, P, vision hidden], query_embeds [B, Q, text hidden] (or [1, Q, ...]: shared queries) or None, query_mask
    [B, Q] / [Q] or None) -> (pred_logits [B, P, Q], image_class_embeds [B, P, text hidden], normalized).
    `config` needs config.vision_config.hidden_size and config.text_config.hidden_size
    (mmfast.reference.owl.owl_config builds one without transformers)."""

    def forward(self, image_embeds, query_embeds, query_mask=None):
        if query_embeds is None or not all(map(_plain_linear, (self.dense0, self.logit_shift, self.logit_scale))):
            return super().forward(image_embeds, query_embeds, query_mask)
        image_shape = tensor_shape("image_embeds", image_embeds, 3)
        query_shape = tensor_shape("query_embeds", query_embeds, 3)
        if image_shape[2] != self.query_dim:
            raise ValueError(f"mmfast: image_embeds has {image_shape[2]} features per patch, the head expects "
                             f"{self.query_dim} (config.vision_config.hidden_size)")
        out_dim = self.dense0.out_features
        if query_shape[2] != out_dim:
            raise ValueError(f"mmfast: query_embeds has {query_shape[2]} features per query, the head expects "
                             f"{out_dim} (config.text_config.hidden_size)")
        if query_shape[0] not in (1, image_shape[0]):
            raise ValueError(f"mmfast: query_embeds has batch {query_shape[0]}; expected 1 (shared queries) or "
                             f"image_embeds' batch {image_shape[0]}")
        if query_mask is not None:
            mask_shape = tuple(query_mask.shape)
            if mask_shape not in ((query_shape[1],), (query_shape[0], query_shape[1]), (image_shape[0], query_shape[1])):
                raise ValueError(f"mmfast: query_mask has shape {mask_shape}; expected [{query_shape[1]}] or "
                                 f"[B, {query_shape[1]}] (one entry per query of query_embeds {tuple(query_shape)})")
        # dense0 alone keeps the patch GEMM's output contiguous and 512 wide; the two 1-wide heads run as one
        # [vision, 2] GEMM (one pass over image_embeds instead of two). Stacking all three (514 outputs) measured
        # 199 ms against 149 ms for 512 + 2 on the dev CPU, and the strided patches slowed the next GEMM 353 ms vs 317.
        patches = self.dense0(image_embeds)
        heads = F.linear(image_embeds, torch.cat((self.logit_shift.weight, self.logit_scale.weight)),
                         torch.cat((self.logit_shift.bias, self.logit_scale.bias)))
        shift = heads[..., :1]
        scale = F.elu(heads[..., 1:]) + 1
        patch_scale = 1 / (torch.linalg.vector_norm(patches, dim=-1, keepdim=True) + EPS)
        queries = query_embeds / (torch.linalg.vector_norm(query_embeds, dim=-1, keepdim=True) + EPS)
        grad = torch.is_grad_enabled() and (patches.requires_grad or scale.requires_grad or queries.requires_grad)
        logits = scaled_logits(patches, queries, patch_scale * scale, shift * scale, query_mask, grad)
        if query_mask is not None:
            logits = logits.to(torch.float32)
        return logits, patches * patch_scale
