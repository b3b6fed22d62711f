"""mmfast.nn.SimilaritySoftmax and ZeroShotClassifier against open_clip's zero-shot recipe."""
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.nn import SimilaritySoftmax, ZeroShotClassifier
from mmfast.nn.similarity_softmax import build_class_weights


def open_clip_classifier(class_template_embeddings):
    """open_clip's zero_shot_classifier: per class, normalize each template embedding, mean, renormalize;
    stacked as [D, C]."""
    weights = []
    for per_class in class_template_embeddings:
        emb = F.normalize(per_class, dim=-1).mean(dim=0)
        weights.append(emb / emb.norm())
    return torch.stack(weights, dim=1)


def test_prompt_ensemble_matches_open_clip_recipe():
    emb = torch.randn(11, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(build_class_weights(emb), open_clip_classifier(emb).T)


@pytest.mark.parametrize("ensembled", [False, True])
def test_zero_shot_classifier_probabilities(ensembled):
    torch.manual_seed(0)
    emb = torch.randn(13, 4, 48) if ensembled else torch.randn(13, 48)
    image = torch.randn(9, 48)
    clf = ZeroShotClassifier(emb, logit_scale=100.0)
    classifier = open_clip_classifier(emb.double() if ensembled else emb.double()[:, None, :])
    want = (100.0 * F.normalize(image.double(), dim=-1) @ classifier).softmax(dim=-1)
    torch.testing.assert_close(clf(image).double(), want, rtol=1e-4, atol=1e-6)
    values, indices = clf(image, topk=3)
    torch.testing.assert_close(values.double(), want.topk(3).values, rtol=1e-4, atol=1e-6)
    assert torch.equal(indices, want.topk(3).indices)


def test_class_weights_are_cached_and_follow_the_module():
    clf = ZeroShotClassifier(torch.randn(7, 3, 16))
    assert "class_weights" in clf.state_dict() and clf.num_classes == 7
    weights = clf.class_weights
    clf(torch.randn(2, 16))
    assert clf.class_weights is weights  # not recomputed per call
    assert clf.to(torch.bfloat16).class_weights.dtype == torch.bfloat16


def test_from_open_clip_classifier_layout():
    emb = torch.randn(6, 2, 24)
    classifier = open_clip_classifier(emb)  # [D, C]
    image = torch.randn(3, 24)
    a = ZeroShotClassifier.from_open_clip_classifier(classifier)(image)
    b = ZeroShotClassifier(emb)(image)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_similarity_softmax_module_sigmoid_with_bias_is_siglip():
    image, text = torch.randn(5, 16), torch.randn(8, 16)
    mod = SimilaritySoftmax(logit_scale=10.0, logit_bias=-10.0, activation="sigmoid")
    want = torch.sigmoid(10.0 * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T - 10.0)
    torch.testing.assert_close(mod(image, text), want, rtol=1e-5, atol=1e-6)
    with mmfast.use_backend("reference"):
        torch.testing.assert_close(mod(image, text), want, rtol=1e-5, atol=1e-6)


def test_bad_class_embeddings():
    with pytest.raises(ValueError, match="class_embeddings must have 2 or 3 dimensions"):
        ZeroShotClassifier(torch.randn(3))
    with pytest.raises(TypeError, match="class_embeddings must be a floating tensor"):
        ZeroShotClassifier(torch.ones(3, 4, dtype=torch.int64))
