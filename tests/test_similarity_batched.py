"""similarity_softmax's batched, per-row and masked form (issue 16: GLIP-style region-word alignment, OWL-ViT/OWLv2
class heads) against mmfast.reference.similarity_batched in float64: shapes, shared text, per-row scale and
shift, query masks, activations, top-k over either axis, gradients, torch.compile, bad input."""
import pytest
import torch

import mmfast
from mmfast.reference import similarity_softmax as ref

B, N, C, D = 2, 7, 5, 12
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
             torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _inputs(dtype=torch.float32, shared=False, per_row=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(B, N, D, generator=gen)
    text = torch.randn(C, D, generator=gen) if shared else torch.randn(B, C, D, generator=gen)
    scale = (torch.rand(B, N, 1, generator=gen) * 20 + 1) if per_row else 14.0
    shift = torch.randn(B, N, 1, generator=gen) if per_row else -2.0
    return image.to(dtype), text.to(dtype), scale, shift


def _mask():
    mask = torch.ones(B, C, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 0] = False
    return mask


def _as(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else x


def _compare(got, want, dtype):
    if isinstance(want, tuple):  # top-k: values close, indices equal where the values are not tied
        torch.testing.assert_close(got[0], want[0].to(got[0].dtype), **TOLERANCE[dtype])
        assert torch.equal(got[1], want[1]) or dtype != torch.float32
        return
    torch.testing.assert_close(got, want.to(got.dtype), **TOLERANCE[dtype])


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", None])
@pytest.mark.parametrize("shared", [False, True], ids=["batched-text", "shared-text"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "scalars"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_the_float64_reference(dtype, masked, per_row, shared, activation):
    image, text, scale, shift = _inputs(dtype, shared, per_row)
    mask = _mask() if masked else None
    kept = [t.clone() for t in (image, text) + ((scale, shift) if per_row else ())]
    got = mmfast.similarity_softmax(image, text, _as(scale, dtype) if per_row else scale, _as(shift, dtype)
                                    if per_row else shift, activation=activation, query_mask=mask)
    assert got.shape == (B, N, C) and got.dtype == dtype
    want = ref.similarity_batched(image.double(), text.double(), _as(scale, torch.float64),
                                  _as(shift, torch.float64), True, activation, mask)
    if masked and activation is None:  # the lowest value of each dtype: compare apart
        lowest = ~mask.unsqueeze(1).expand(B, N, C)
        assert (got[lowest] == torch.finfo(dtype).min).all()
        got, want = got.masked_fill(lowest, 0), want.masked_fill(lowest, 0)
    _compare(got, want, dtype)
    assert all(torch.equal(a, b) for a, b in zip((image, text) + ((scale, shift) if per_row else ()), kept))


@pytest.mark.parametrize("topk_dim, k", [(-1, 3), (-2, 4)], ids=["per-row", "per-class"])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_topk_over_either_axis(topk_dim, k, activation):
    image, text, scale, shift = _inputs()
    values, indices = mmfast.similarity_softmax(image, text, scale, shift, activation=activation, topk=k,
                                                topk_dim=topk_dim, query_mask=_mask())
    assert values.shape == ((B, N, k) if topk_dim == -1 else (B, k, C))
    want = ref.similarity_batched(image.double(), text.double(), scale.double(), shift.double(), True, activation,
                                  _mask(), k, topk_dim)
    _compare((values, indices), want, torch.float32)


def test_gradients_match_the_reference():
    image, text, scale, shift = (t.double() for t in _inputs())
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, shift)]
    refs = [t.clone().requires_grad_() for t in (image, text, scale, shift)]
    cot = torch.randn(B, N, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for fn, xs in ((lambda *a: mmfast.similarity_softmax(*a, activation="sigmoid", query_mask=_mask()), leaves),
                   (lambda *a: ref.similarity_batched(*a, True, "sigmoid", _mask()), refs)):
        (fn(*xs) * cot).sum().backward()
    for a, b in zip(leaves, refs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    # and fp32 through the fused path (float64 runs the reference): gradcheck-style comparison in float64
    image32, text32, scale32, shift32 = (t.float().clone().requires_grad_() for t in (image, text, scale, shift))
    out = mmfast.similarity_softmax(image32, text32, scale32, shift32, query_mask=_mask())
    (out * cot.float()).sum().backward()
    leaves64 = [t.clone().requires_grad_() for t in (image, text, scale, shift)]
    (ref.similarity_batched(*leaves64, True, "softmax", _mask()) * cot).sum().backward()
    for a, b in zip((image32, text32, scale32, shift32), leaves64):
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-5)


def test_gradcheck_of_the_fused_form():
    image, text, scale, shift = (t.double().requires_grad_() for t in _inputs(seed=4))
    from mmfast.ops.similarity_softmax import scaled_logits

    def fused(image, text, scale, shift):  # the shared fused step itself, in float64
        return scaled_logits(image, text, scale, shift, _mask(), grad=True).sigmoid()
    assert torch.autograd.gradcheck(fused, (image, text, scale, shift))


def test_compiles_fullgraph():
    image, text, scale, shift = _inputs()
    compiled = torch.compile(lambda *a: mmfast.similarity_softmax(*a, activation="sigmoid", query_mask=_mask()),
                             fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(image, text, scale, shift),
                                   mmfast.similarity_softmax(image, text, scale, shift, activation="sigmoid",
                                                             query_mask=_mask()), rtol=1e-5, atol=1e-6)


def test_two_dimensional_calls_keep_the_kernels():
    """The plain form (2-D features, scalar scales, no mask) still runs the fused kernels, and a kernel backend
    asked for the batched form says what runs it."""
    image, text = torch.randn(N, D), torch.randn(C, D)
    torch.testing.assert_close(mmfast.similarity_softmax(image, text, 10.0, backend="cpu"),
                               ref.similarity_softmax(image, text, 10.0))
    with pytest.raises(ValueError, match="the 'cpu' kernels take 2-D features and scalar scales only"):
        mmfast.similarity_softmax(*_inputs()[:2], backend="cpu")
    with mmfast.use_backend("reference"):
        image3, text3, scale, shift = _inputs()
        torch.testing.assert_close(mmfast.similarity_softmax(image3, text3, scale, shift),
                                   ref.similarity_batched(image3, text3, scale, shift))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(image_features=torch.randn(B, N, D, 1)), ValueError, "image_features must have 2 or 3 dimensions"),
    (dict(text_features=torch.randn(B, C, D + 1)), ValueError, "feature dim D mismatch"),
    (dict(text_features=torch.randn(B + 1, C, D)), ValueError, "text_features .* is batched"),
    (dict(image_features=torch.randn(N, D), text_features=torch.randn(B, C, D)), ValueError, "is batched"),
    (dict(logit_scale=torch.ones(B, N)), ValueError, r"logit_scale must be a scalar or a per-row tensor of shape \[2, 7, 1\]"),
    (dict(logit_bias=torch.ones(B, 1, 1)), ValueError, r"logit_bias must be a scalar or a per-row tensor"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite"),
    (dict(logit_scale=torch.full((B, N, 1), float("nan"))), ValueError, "logit_scale must be finite"),
    (dict(query_mask=torch.ones(B, C + 1)), ValueError, r"query_mask must have shape \[5\] or \[2, 5\]"),
    (dict(query_mask=[1, 0]), TypeError, "query_mask must be a tensor"),
    (dict(topk=C + 1), ValueError, r"topk must be an int in \[1, 5\]"),
    (dict(topk=N, topk_dim=-2), None, None),
    (dict(topk=N + 1, topk_dim=-2), ValueError, r"topk must be an int in \[1, 7\] \(N\)"),
    (dict(topk_dim=0), ValueError, "topk_dim must be -1"),
    (dict(activation="relu"), ValueError, "activation must be"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    image, text, scale, shift = _inputs()
    args = dict(image_features=image, text_features=text, logit_scale=scale, logit_bias=shift) | kwargs
    if error is None:
        mmfast.similarity_softmax(args.pop("image_features"), args.pop("text_features"), **args)
        return
    with pytest.raises(error, match=match):
        mmfast.similarity_softmax(args.pop("image_features"), args.pop("text_features"), **args)
