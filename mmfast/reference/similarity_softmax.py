"""Plain-PyTorch oracle for the zero-shot similarity-softmax (CLIP README / open_clip).

probs = softmax(scale * normalize(image) @ normalize(text).T + bias); SigLIP uses sigmoid.
Normalization is torch.nn.functional.normalize (divides by max(||row||, 1e-12)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_logits(image, text, logit_scale, logit_bias=None, normalize=True):
    if normalize:
        image = F.normalize(image, dim=-1)
        text = F.normalize(text, dim=-1)
    logits = logit_scale * (image @ text.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def similarity_softmax(image, text, logit_scale=100.0, logit_bias=None, normalize=True, activation="softmax"):
    logits = similarity_logits(image, text, logit_scale, logit_bias, normalize)
    if activation == "softmax":
        return logits.softmax(dim=-1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation in (None, "none"):
        return logits
    raise ValueError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}")


def similarity_topk(image, text, logit_scale=100.0, logit_bias=None, normalize=True, activation="softmax", k=5):
    """(values, indices) of the k largest logits per row, values with the activation applied."""
    probs = similarity_softmax(image, text, logit_scale, logit_bias, normalize, activation)
    return probs.topk(k, dim=-1)


def similarity_batched(image, text, logit_scale=100.0, logit_bias=None, normalize=True, activation="softmax",
                       query_mask=None, topk=None, topk_dim=-1):
    """The batched, per-row and masked form (grounding and open-vocabulary detection heads: GLIP's region-word
    alignment, OWL-ViT/OWLv2's class head): image [B, N, D] (or [N, D]) against text [B, C, D] or a shared
    [C, D]; logit_scale and logit_bias scalars or per-row tensors [B, N, 1]; query_mask [B, C] or [C] whose zeros
    set those classes' logits to the dtype's lowest value before the activation (upstream OWL's torch.where);
    topk over the classes of each row (topk_dim=-1) or over the rows of each class (topk_dim=-2)."""
    if normalize:
        image = F.normalize(image, dim=-1)
        text = F.normalize(text, dim=-1)
    logits = logit_scale * (image @ text.transpose(-1, -2))
    if logit_bias is not None:
        logits = logits + logit_bias
    if query_mask is not None:
        logits = torch.where(query_mask.unsqueeze(-2) == 0, torch.finfo(logits.dtype).min, logits)
    if activation == "softmax":
        logits = logits.softmax(dim=-1)
    elif activation == "sigmoid":
        logits = torch.sigmoid(logits)
    elif activation not in (None, "none"):
        raise ValueError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}")
    return logits if topk is None else logits.topk(topk, dim=topk_dim)
