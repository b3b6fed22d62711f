"""mmfast.nn.OwlClassHead against OWL-ViT / OWLv2's class-prediction head: transformers' own classes (small random
configs, nothing downloaded) where transformers is installed, and always mmfast.reference.owl, its line-for-line
mirror: outputs, masks, gradients, state_dict keys, patching, bad input."""
import copy

import pytest
import torch

import mmfast
from mmfast.nn import OwlClassHead
from mmfast.reference import owl as ref

VISION, TEXT = 24, 16  # hidden sizes of the small config
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
             torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _upstream_classes():
    """The head classes to compare with: the reference mirror, and transformers' two where installed."""
    classes = [pytest.param(ref.OwlClassPredictionHead, id="reference")]
    try:
        from transformers.models.owlv2.modeling_owlv2 import Owlv2ClassPredictionHead
        from transformers.models.owlvit.modeling_owlvit import OwlViTClassPredictionHead
    except ImportError:
        return classes + [pytest.param(None, id="transformers", marks=pytest.mark.skip(
            reason="transformers is not installed (a test pin in requirements.txt)"))]
    return classes + [pytest.param(Owlv2ClassPredictionHead, id="Owlv2"),
                      pytest.param(OwlViTClassPredictionHead, id="OwlViT")]


UPSTREAM = _upstream_classes()


def _pair(upstream_cls, dtype=torch.float32):
    torch.manual_seed(0)
    upstream = upstream_cls(ref.owl_config(VISION, TEXT)).to(dtype)
    head = OwlClassHead(ref.owl_config(VISION, TEXT)).to(dtype)
    head.load_state_dict(upstream.state_dict())
    return upstream, head


def _inputs(dtype, batch=2, patches=10, queries=5, query_batch=None):
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(batch, patches, VISION, generator=gen).to(dtype)
    query = torch.randn(batch if query_batch is None else query_batch, queries, TEXT, generator=gen).to(dtype)
    return image, query


def _masks(batch=2, queries=5):
    two_d = torch.ones(batch, queries, dtype=torch.bool)
    two_d[0, 3:] = False
    two_d[1, 0] = False
    return {"none": None, "bool [B, Q]": two_d, "int [B, Q]": two_d.long(), "float [Q]": torch.tensor([1., 0, 1, 1, 0]),
            "nothing masked": torch.ones(batch, queries, dtype=torch.bool)}  # the CPU skips the fill


def test_state_dict_keys_and_parameters_are_upstreams():
    upstream, head = _pair(ref.OwlClassPredictionHead)
    assert list(head.state_dict()) == list(upstream.state_dict()) == [
        "dense0.weight", "dense0.bias", "logit_shift.weight", "logit_shift.bias", "logit_scale.weight",
        "logit_scale.bias"]
    assert head.query_dim == VISION


@pytest.mark.parametrize("mask", list(_masks()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("upstream_cls", UPSTREAM)
def test_forward_matches_upstream(upstream_cls, dtype, mask):
    upstream, head = _pair(upstream_cls, dtype)
    image, query = _inputs(dtype)
    query_mask = _masks()[mask]
    kept = [t.clone() for t in (image, query)]
    with torch.no_grad():
        want = upstream(image, query, query_mask)
        got = head(image, query, query_mask)
    assert torch.equal(image, kept[0]) and torch.equal(query, kept[1]), "inputs must not be modified"
    for g, w, name in zip(got, want, ("pred_logits", "image_class_embeds")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **TOLERANCE[dtype], msg=lambda m: f"{name}: {m}")
    if query_mask is not None:  # masked queries hold exactly the lowest value, as upstream's
        masked = (query_mask == 0).unsqueeze(-2).expand_as(got[0])
        assert torch.equal(got[0][masked], want[0][masked])


@pytest.mark.parametrize("upstream_cls", UPSTREAM)
def test_gradients_match_upstream(upstream_cls):
    upstream, head = _pair(upstream_cls, torch.float64)
    image, query = _inputs(torch.float64)
    mask = _masks()["bool [B, Q]"]
    grads = {}
    for name, module in (("upstream", upstream), ("mmfast", head)):
        x, q = image.clone().requires_grad_(), query.clone().requires_grad_()
        logits, embeds = module(x, q, mask)
        gen = torch.Generator().manual_seed(2)
        weight = torch.where(mask.unsqueeze(1), torch.randn(logits.shape, generator=gen, dtype=logits.dtype), 0.)
        ((logits * weight).sum() + embeds.square().sum()).backward()
        grads[name] = [x.grad, q.grad] + [p.grad for p in module.parameters()]
    for g, w in zip(grads["mmfast"], grads["upstream"]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("upstream_cls", UPSTREAM)
def test_shared_queries_and_no_queries(upstream_cls):
    upstream, head = _pair(upstream_cls)
    image, query = _inputs(torch.float32, query_batch=1)
    with torch.no_grad():
        for g, w in zip(head(image, query, torch.tensor([1, 1, 0, 1, 1])), upstream(image, query, torch.tensor([1, 1, 0, 1, 1]))):
            torch.testing.assert_close(g, w, **TOLERANCE[torch.float32])
        for g, w in zip(head(image, None, None), upstream(image, None, None)):  # upstream's zeros, kept
            torch.testing.assert_close(g, w)


def test_hooked_or_wrapped_projection_runs_upstreams_forward():
    """The fused path reads the three Linears' weights without calling them: a hook or a wrapped layer (LoRA)
    would be skipped silently, so such a head runs upstream's forward."""
    upstream, head = _pair(ref.OwlClassPredictionHead)
    image, query = _inputs(torch.float32)
    calls = []
    head.logit_scale.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(head(image, query, None)[0], upstream(image, query, None)[0], rtol=0, atol=0)
    assert calls == [1]


def test_compiles_fullgraph():
    _, head = _pair(ref.OwlClassPredictionHead)
    image, query = _inputs(torch.float32)
    mask = _masks()["bool [B, Q]"]
    compiled = torch.compile(head, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for g, w in zip(compiled(image, query, mask), head(image, query, mask)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 10), torch.randn(2, 5, TEXT), None), "image_embeds must have 3 dimensions"),
    ((torch.randn(2, 10, VISION), torch.randn(5, TEXT), None), "query_embeds must have 3 dimensions"),
    ((torch.randn(2, 10, VISION + 1), torch.randn(2, 5, TEXT), None), "image_embeds has 25 features"),
    ((torch.randn(2, 10, VISION), torch.randn(2, 5, TEXT + 1), None), "query_embeds has 17 features"),
    ((torch.randn(2, 10, VISION), torch.randn(3, 5, TEXT), None), "query_embeds has batch 3"),
    ((torch.randn(2, 10, VISION), torch.randn(2, 5, TEXT), torch.ones(2, 4)), r"query_mask has shape \(2, 4\)"),
])
def test_bad_input_names_the_argument(args, match):
    _, head = _pair(ref.OwlClassPredictionHead)
    with pytest.raises(ValueError, match=match):
        head(*args)


def test_patch_swaps_transformers_heads_in_a_detector():
    """mmfast.patch on a small random Owlv2ForObjectDetection (no download): its class head becomes
    OwlClassHead, the detector's outputs stay upstream's, unpatch restores the class."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test pin (requirements.txt)")
    config = transformers.Owlv2Config(
        text_config=dict(hidden_size=TEXT, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=64, max_position_embeddings=8),
        vision_config=dict(hidden_size=VISION, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=TEXT)
    torch.manual_seed(0)
    model = transformers.Owlv2ForObjectDetection(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    input_ids = torch.randint(1, 64, (2 * 3, 8))  # 3 text queries per image
    with torch.no_grad():
        want = model(input_ids=input_ids, pixel_values=pixels)
    original = copy.deepcopy(model)
    report = mmfast.patch(model)
    assert [r.drop_in for r in report.replaced] == ["OwlClassHead"]
    assert isinstance(model.class_head, OwlClassHead)
    with torch.no_grad():
        got = model(input_ids=input_ids, pixel_values=pixels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes, want.pred_boxes)
    mmfast.unpatch(model)
    assert type(model.class_head) is type(original.class_head)
