"""The class-prediction head of OWL-ViT / OWLv2 as transformers 5.25.0 writes it: the oracle for
mmfast.nn.OwlClassHead.

transformers/models/owlv2/modeling_owlv2.py `Owlv2ClassPredictionHead(config)` and
models/owlvit/modeling_owlvit.py `OwlViTClassPredictionHead(config)` (the same code): dense0 =
Linear(vision hidden, text hidden), logit_shift and logit_scale = Linear(vision hidden, 1), elu = ELU();
forward(image_embeds [B, P, Dv], query_embeds [B, Q, D] or None, query_mask [B, Q] or None) ->
(pred_logits [B, P, Q], image_class_embeds [B, P, D], L2-normalized): pred_logits =
(normalize(dense0(image)) @ normalize(query).T + shift(image)) * (elu(scale(image)) + 1), masked queries set to
the dtype's lowest value. Without queries it returns zeros of [B, P, vision hidden] (upstream's, kept).
`config` needs only config.vision_config.hidden_size and config.text_config.hidden_size.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


def owl_config(vision_hidden: int, text_hidden: int):
    """A stand-in for transformers' OwlViTConfig / Owlv2Config: the two sizes the head reads."""
    return SimpleNamespace(vision_config=SimpleNamespace(hidden_size=vision_hidden),
                           text_config=SimpleNamespace(hidden_size=text_hidden))


class OwlClassPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()

        out_dim = config.text_config.hidden_size
        self.query_dim = config.vision_config.hidden_size

        self.dense0 = nn.Linear(self.query_dim, out_dim)
        self.logit_shift = nn.Linear(self.query_dim, 1)
        self.logit_scale = nn.Linear(self.query_dim, 1)
        self.elu = nn.ELU()

    def forward(self, image_embeds, query_embeds, query_mask):
        image_class_embeds = self.dense0(image_embeds)
        if query_embeds is None:
            device = image_class_embeds.device
            batch_size, num_patches = image_class_embeds.shape[:2]
            pred_logits = torch.zeros((batch_size, num_patches, self.query_dim)).to(device)
            return (pred_logits, image_class_embeds)

        # Normalize image and text features
        image_class_embeds = image_class_embeds / (torch.linalg.norm(image_class_embeds, dim=-1, keepdim=True) + 1e-6)
        query_embeds = query_embeds / (torch.linalg.norm(query_embeds, dim=-1, keepdim=True) + 1e-6)

        # Get class predictions
        pred_logits = torch.einsum("...pd,...qd->...pq", image_class_embeds, query_embeds)

        # Apply a learnable shift and scale to logits
        logit_shift = self.logit_shift(image_embeds)
        logit_scale = self.logit_scale(image_embeds)
        logit_scale = self.elu(logit_scale) + 1
        pred_logits = (pred_logits + logit_shift) * logit_scale

        if query_mask is not None:
            if query_mask.ndim > 1:
                query_mask = torch.unsqueeze(query_mask, dim=-2)

            pred_logits = torch.where(query_mask == 0, torch.finfo(pred_logits.dtype).min, pred_logits)
            pred_logits = pred_logits.to(torch.float32)

        return (pred_logits, image_class_embeds)
