"""Drop-in modules for CLIP/SigLIP zero-shot classification on top of mmfast.similarity_softmax."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.ops._checks import check_tensor
from mmfast.ops.similarity_softmax import similarity_softmax


class SimilaritySoftmax(nn.Module):
    """probs = act(logit_scale * normalize(image) @ normalize(text).T + logit_bias), fused.

    logit_scale is the already-exponentiated scale (CLIP: 100). activation: "softmax", "sigmoid"
    (SigLIP) or None (logits)."""

    def __init__(self, logit_scale: float = 100.0, logit_bias: float | None = None, *, normalize: bool = True,
                 activation: str | None = "softmax", backend: str | None = None):
        super().__init__()
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        self.normalize, self.activation, self.backend = normalize, activation, backend

    def forward(self, image_features, text_features, topk: int | None = None):
        return similarity_softmax(image_features, text_features, self.logit_scale, self.logit_bias,
                                  normalize=self.normalize, activation=self.activation, topk=topk,
                                  backend=self.backend)

    def extra_repr(self):
        return f"logit_scale={self.logit_scale}, logit_bias={self.logit_bias}, activation={self.activation!r}"


def build_class_weights(class_embeddings: torch.Tensor) -> torch.Tensor:
    """[C, D] unit class weights from [C, D] text embeddings, or from prompt-ensembled [C, T, D]
    ones the way open_clip's zero_shot_classifier does: normalize each template's embedding, mean
    over templates, renormalize."""
    check_tensor("class_embeddings", class_embeddings, (2, 3))
    if class_embeddings.dim() == 3:
        class_embeddings = F.normalize(class_embeddings, dim=-1).mean(dim=1)
    return F.normalize(class_embeddings, dim=-1)


class ZeroShotClassifier(nn.Module):
    """Zero-shot classifier from class text embeddings, computed once and cached as a buffer.

    class_embeddings: [C, D], or [C, T, D] for T prompt templates per class (ensembled as open_clip
    does). `from_open_clip_classifier` takes open_clip's [D, C] classifier matrix instead.
    forward(image_features [N, D], topk=None) returns probabilities [N, C] or (values, indices)."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float = 100.0, logit_bias: float | None = None,
                 *, activation: str | None = "softmax", backend: str | None = None):
        super().__init__()
        with torch.no_grad():
            self.register_buffer("class_weights", build_class_weights(class_embeddings).detach().clone())
        self.similarity = SimilaritySoftmax(logit_scale, logit_bias, normalize=True, activation=activation,
                                            backend=backend)

    @classmethod
    def from_open_clip_classifier(cls, classifier: torch.Tensor, **kwargs) -> "ZeroShotClassifier":
        """open_clip's zero_shot_classifier returns [D, C] (already unit columns)."""
        check_tensor("classifier", classifier, 2)
        return cls(classifier.T, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.class_weights.shape[0]

    def forward(self, image_features: torch.Tensor, topk: int | None = None):
        weights = self.class_weights
        if weights.dtype != image_features.dtype and image_features.is_floating_point():
            weights = weights.to(image_features.dtype)
        return self.similarity(image_features, weights, topk=topk)
