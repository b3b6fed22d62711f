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
