"""Measuring a contrastive model's embedding space: the modality gap of Liang et al. 2022, "Mind the Gap:
Understanding the Modality Gap in Multi-modal Contrastive Representation Learning" (NeurIPS 2022).

CLIP-like models put image and text embeddings in two separate cones of the unit sphere. `modality_gap`
measures that: the gap vector (centroid of the normalized image embeddings minus that of the text embeddings,
the paper's Delta_gap), its norm, the mean cosine within each modality and across them, and how well a linear
classifier tells the two modalities apart on held-out rows. `shift_embeddings` moves both modalities along
the gap vector and renormalizes, the paper's experiment on the gap's effect on zero-shot accuracy and
retrieval (section 4.1). examples/modality_gap.py draws both before and after the shift.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_ROWS = 4  # per modality: two to train on and two held out, each of them at least one


@dataclass(frozen=True)
class ModalityGap:
    """modality_gap's result. Cosines are means over pairs of distinct rows (within) or all pairs (cross)."""

    gap: torch.Tensor      # [D] mean(normalize(image)) - mean(normalize(text)), float64 on the input's device
    gap_norm: float        # ||gap||: 0 with no gap, up to 2 (antipodal modalities)
    image_cosine: float    # mean cosine between two different image embeddings
    text_cosine: float     # mean cosine between two different text embeddings
    cross_cosine: float    # mean cosine between an image and a text embedding
    separability: float   # held-out balanced accuracy of a linear classifier, image vs text: 0.5 = chance
    n_train: int           # rows (both modalities) the classifier was trained on; the rest were held out


def _check_pair(image_emb, text_emb, min_rows: int) -> None:
    for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"mmfast: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"mmfast: {name} must be 2-D [rows, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"mmfast: {name} must be a floating tensor, got {x.dtype}")
        if x.shape[0] < min_rows:
            raise ValueError(f"mmfast: {name} needs at least {min_rows} rows, got {x.shape[0]}")
        if x.shape[1] == 0:
            raise ValueError(f"mmfast: {name} must have D >= 1, got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"mmfast: {name} has non-finite values (NaN or Inf)")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"mmfast: embedding size mismatch: image_emb has D={image_emb.shape[1]} "
                         f"(shape {tuple(image_emb.shape)}) but text_emb has D={text_emb.shape[1]} "
                         f"(shape {tuple(text_emb.shape)})")
    if image_emb.device != text_emb.device:
        raise ValueError(f"mmfast: text_emb is on {text_emb.device} but image_emb is on {image_emb.device}")


def _mean_pair_cosine(x: torch.Tensor) -> float:
    """Mean of x_i . x_j over i != j for unit (or zero) rows, in O(N D): (|sum x|^2 - sum |x_i|^2) / (N (N-1))."""
    n = x.shape[0]
    total = x.sum(0)
    return ((total @ total - (x * x).sum()) / (n * (n - 1))).item()


def _split(n: int, train_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    k = min(max(round(n * train_fraction), 1), n - 1)  # at least one row on each side
    return perm[:k], perm[k:]


def linear_separability(image_emb: torch.Tensor, text_emb: torch.Tensor, *, train_fraction: float = 0.5,
                        seed: int = 0, weight_decay: float = 1e-4, max_iter: int = 200) -> tuple[float, int]:
    """(held-out balanced accuracy, rows trained on) of an L2-regularized logistic regression telling image rows
    (label 1) from text rows (label 0). Each modality is split by the same seeded permutation rule, so both
    classes are on both sides; balanced accuracy (the mean of the two per-class accuracies) keeps chance at 0.5
    when the counts differ. Full-batch L-BFGS in float64 on the CPU: deterministic for a seed.
    Below 0.5 means no linear signal, not a flipped one: rows whose centroids were made equal (shift_embeddings
    with the gap of these very rows) mirror each train-side deviation on the held-out side (toy classes
    after the shift in examples/modality_gap.py --synthetic: 0.46)."""
    _check_pair(image_emb, text_emb, MIN_ROWS)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"mmfast: train_fraction must be in (0, 1), got {train_fraction!r}")
    generator = torch.Generator().manual_seed(seed)
    x_img = F.normalize(image_emb.detach().to("cpu", torch.float64), dim=-1)
    x_txt = F.normalize(text_emb.detach().to("cpu", torch.float64), dim=-1)
    img_train, img_test = _split(x_img.shape[0], train_fraction, generator)
    txt_train, txt_test = _split(x_txt.shape[0], train_fraction, generator)
    x = torch.cat([x_img[img_train], x_txt[txt_train]])
    y = torch.cat([torch.ones(len(img_train)), torch.zeros(len(txt_train))]).double()
    # Each class weighs half of the loss, as balanced accuracy counts it.
    weights = torch.cat([torch.full((len(img_train),), 0.5 / len(img_train)),
                         torch.full((len(txt_train),), 0.5 / len(txt_train))]).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * weights).sum()
        loss = loss + 0.5 * weight_decay * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        acc_img = ((x_img[img_test] @ w + b) > 0).double().mean().item()
        acc_txt = ((x_txt[txt_test] @ w + b) <= 0).double().mean().item()
    return 0.5 * (acc_img + acc_txt), len(img_train) + len(txt_train)


def modality_gap(image_emb: torch.Tensor, text_emb: torch.Tensor, *, train_fraction: float = 0.5,
                 seed: int = 0) -> ModalityGap:
    """The modality gap between image embeddings [N, D] and text embeddings [M, D] (N, M >= 4; rows need not
    be paired). Both are L2-normalized first (F.normalize: a zero row stays zero). The separability is
    linear_separability's, with `train_fraction` of each modality's rows (seeded split) to train on."""
    _check_pair(image_emb, text_emb, MIN_ROWS)
    x = F.normalize(image_emb.detach().double(), dim=-1)
    y = F.normalize(text_emb.detach().double(), dim=-1)
    gap = x.mean(0) - y.mean(0)
    cross = (x.sum(0) @ y.sum(0) / (x.shape[0] * y.shape[0])).item()
    separability, n_train = linear_separability(image_emb, text_emb, train_fraction=train_fraction, seed=seed)
    return ModalityGap(gap=gap, gap_norm=gap.norm().item(), image_cosine=_mean_pair_cosine(x),
                       text_cosine=_mean_pair_cosine(y), cross_cosine=cross, separability=separability,
                       n_train=n_train)


def shift_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, gap: torch.Tensor,
                     alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's shift along the gap: image - alpha/2 * gap, text + alpha/2 * gap, each row renormalized.

    Rows are normalized before the shift. With gap = modality_gap(...).gap, alpha = 1 moves both centroids
    onto their midpoint before renormalizing (the gap shrinks to near 0), alpha = 0 changes nothing but the
    normalization, and a negative alpha widens the gap. The authors' notebook
    (Table_1_Implications_CLIP_Zero_Shot/shifting) passes the unit direction gap / ||gap|| and sweeps its delta
    = alpha over [-5, 5). Returns tensors in the inputs' dtypes."""
    _check_pair(image_emb, text_emb, 1)
    if not isinstance(gap, torch.Tensor) or gap.dim() != 1 or gap.shape[0] != image_emb.shape[1]:
        raise ValueError(f"mmfast: gap must be a 1-D tensor of size D={image_emb.shape[1]} (the embeddings' "
                         f"last dimension), got {tuple(gap.shape) if isinstance(gap, torch.Tensor) else type(gap).__name__}")
    if not bool(torch.isfinite(gap).all()):
        raise ValueError("mmfast: gap has non-finite values (NaN or Inf)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"mmfast: alpha must be a finite float, got {alpha!r}")
    half = 0.5 * alpha * gap.to(image_emb.device, torch.float64)
    image = F.normalize(F.normalize(image_emb.double(), dim=-1) - half, dim=-1)
    text = F.normalize(F.normalize(text_emb.double(), dim=-1) + half, dim=-1)
    return image.to(image_emb.dtype), text.to(text_emb.dtype)


__all__ = ["ModalityGap", "modality_gap", "shift_embeddings", "linear_separability"]
