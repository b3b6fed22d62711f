"""mmfast.similarity_softmax on every kernel backend (cpu, triton — interpreted on CPU —, cuda) against
the plain-PyTorch reference (mmfast/reference/similarity_softmax.py): forward, every gradient (image, text,
logit_scale, logit_bias), the top-k mode, odd shapes, strided inputs, NaN/Inf, opcheck, torch.compile and
bad input.

Tolerances (conftest.assert_close_to_reference): fp32 within 1e-5 relative of the fp64 reference;
fp16/bf16 at most 2x the error of the reference run in that dtype. Shapes stay small for the Triton
interpreter (about 0.5 s per launch sequence), so the file runs in well under 3 minutes on 2 cores.
"""
import pytest
import torch
import torch.nn.functional as F

import mmfast
from conftest import assert_close_to_reference, backend_device_params, dtypes_for
from mmfast.reference import similarity_softmax as ref
from mmfast.testing import LOW_PRECISION

ACTIVATIONS = ["softmax", "sigmoid", "none"]
BACKENDS = backend_device_params()


def backend_dtype_params(first_dtype_only=False):
    """(backend, device, dtype) for every backend here and the dtypes it is tested in."""
    params = []
    for p in BACKENDS:
        backend, device = p.values
        dtypes = dtypes_for(backend, device)
        for dtype in dtypes[:1] if first_dtype_only else dtypes:
            params.append(pytest.param(backend, device, dtype, id=f"{p.id}-{str(dtype)[6:]}"))
    return params


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def op_names(backend):
    """The operators behind a backend: (forward, backward, topk, topk backward)."""
    names = ("similarity_softmax", "similarity_softmax_backward", "similarity_topk", "similarity_topk_backward")
    return tuple(n + "_triton" for n in names) if backend == "triton" else names


# ---- data and the two sides of every comparison ------------------------------------------------------
def make_features(n, c, d, normalize, *, seed=0):
    """fp64 features. Without normalization they are scaled so that raw dot products are O(1): the logits
    stay in the range where fp32 can meet 1e-5 (a logit of 300 carries an absolute error of ~3e-5)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64)
    text = torch.randn(c, d, generator=g, dtype=torch.float64)
    if not normalize:
        image, text = image * d ** -0.25, text * d ** -0.25
    return image, text


def default_scale(normalize, activation="softmax"):
    """CLIP's 100 for normalized softmax; 10 for sigmoid (SigLIP's init): its gradient p(1-p) comes from the
    saved output, so a saturated p = 1 - 1e-13 would leave fp32 nothing to compare."""
    if activation == "sigmoid":
        return 10.0 if normalize else 1.5
    return 100.0 if normalize else 3.0


def run_reference(image, text, scale, bias, normalize, activation, grad, dtype, indices=None):
    """The reference in `dtype` (fp64, or the low dtype for the 2x rule): output and the four gradients.
    In the top-k mode the output is the reference probabilities gathered at `indices`."""
    im = image.detach().to(dtype).requires_grad_()
    tx = text.detach().to(dtype).requires_grad_()
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as the functional API passes them
    s = torch.tensor(scale, dtype=param_dtype, device=image.device, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=param_dtype, device=image.device, requires_grad=True)
    out = ref.similarity_softmax(im, tx, s, b, normalize, activation)
    if indices is not None:
        out = out.gather(1, indices)
    out.backward(grad.to(out.dtype))
    return out.detach(), {"image": im.grad, "text": tx.grad, "logit_scale": s.grad,
                          "logit_bias": None if b is None else b.grad}


def run_mmfast(image, text, scale, bias, normalize, activation, grad, backend, topk=None):
    """mmfast in image's dtype with logit_scale/logit_bias as fp32 0-dim leaves: output(s) and gradients."""
    im = image.detach().clone().requires_grad_()
    tx = text.detach().clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float32, device=image.device, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float32, device=image.device, requires_grad=True)
    result = mmfast.similarity_softmax(im, tx, s, b, normalize=normalize, activation=activation, topk=topk,
                                       backend=backend)
    out = result[0] if topk is not None else result
    out.backward(grad.to(out.dtype))
    grads = {"image": im.grad, "text": tx.grad, "logit_scale": s.grad, "logit_bias": None if b is None else b.grad}
    return result, grads


def check(out, ref64, ref_lowp, name):
    """assert_close_to_reference, plus exact zeros where the fp64 reference is exactly zero (C=1 softmax)."""
    if ref64.abs().max() == 0:
        assert out.abs().max() == 0, f"{name}: expected exact zeros"
        return
    assert_close_to_reference(out, ref64, ref_lowp, name=name)


def check_scalar(value, ref64, ref_lowp, magnitude, dtype, name):
    """A scalar gradient is a sum of N*C terms (grad_logit_bias of a softmax is ~0 by cancellation), so
    its error is measured against `magnitude`, the sum of the terms' absolute values, not its own size.
    The same rules as assert_close_to_reference, `dtype` being the features' dtype."""
    err = abs(value.double().item() - ref64.item()) / magnitude
    if dtype in LOW_PRECISION:
        ref_err = abs(ref_lowp.double().item() - ref64.item()) / magnitude
        floor = 4 * torch.finfo(dtype).eps
        assert err <= max(2 * ref_err, floor), f"{name}: err {err:.3e} > 2 x reference's {ref_err:.3e}"
    else:
        assert err <= 1e-5, f"{name}: err {err:.3e} > 1e-5"


def compare(image, text, scale, bias, normalize, activation, backend, *, topk=None, seed=1):
    """Runs mmfast and the references on the same data and checks the output(s) and every gradient."""
    dtype = image.dtype
    n, c = image.shape[0], text.shape[0]
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, topk or c, generator=g, dtype=torch.float64).to(image.device).to(dtype)
    result, grads = run_mmfast(image, text, scale, bias, normalize, activation, grad, backend, topk=topk)
    indices = None
    if topk is not None:
        values, indices = result
        check_topk_indices(values, indices, image, text, scale, bias, normalize, activation, topk)
        out = values
    else:
        out = result
    out64, grads64 = run_reference(image.double(), text.double(), scale, bias, normalize, activation, grad,
                                   torch.float64, indices)
    lowp = dtype in LOW_PRECISION
    out_lp, grads_lp = (run_reference(image, text, scale, bias, normalize, activation, grad, dtype, indices)
                        if lowp else (None, {}))
    check(out, out64, out_lp, "out")
    for name in ("image", "text"):
        assert grads[name].dtype == dtype and grads[name].shape == (image if name == "image" else text).shape
        check(grads[name], grads64[name], grads_lp.get(name), f"grad_{name}")
    # Magnitudes of the scalar gradients' terms: sum |ds| <= sum |g| (all three activations) and
    # |x_i . y_c| <= max |x . y| (1 when normalized).
    sum_abs_grad = grad.double().abs().sum().item()
    x, y = (F.normalize(image.double(), dim=-1), F.normalize(text.double(), dim=-1)) if normalize else (
        image.double(), text.double())
    max_dot = max(1.0, (x @ y.T).abs().max().item())
    check_scalar(grads["logit_scale"], grads64["logit_scale"], grads_lp.get("logit_scale"),
                 sum_abs_grad * max_dot, dtype, "grad_logit_scale")
    if bias is not None:
        check_scalar(grads["logit_bias"], grads64["logit_bias"], grads_lp.get("logit_bias"), sum_abs_grad,
                     dtype, "grad_logit_bias")


def check_topk_indices(values, indices, image, text, scale, bias, normalize, activation, k):
    """Indices are int64 [N, k], distinct, sorted by descending value, and pick the k largest reference
    probabilities: torch.topk's own for fp32 at small k (random data has no ties), else the reference
    values at them match torch.topk's values (to fp32 rounding, or to the low-precision reference's
    own error: a near-tie may swap)."""
    assert indices.dtype == torch.int64 and indices.shape == values.shape == (image.shape[0], k)
    assert (values[:, :-1] >= values[:, 1:]).all(), "values are not sorted descending"
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all(), "repeated indices"
    probs64 = ref.similarity_softmax(image.double(), text.double(), scale, bias, normalize, activation)
    want = probs64.topk(k, dim=-1)
    if image.dtype == torch.float32 and k <= 5:
        assert torch.equal(indices, want.indices)
    elif image.dtype == torch.float32:
        torch.testing.assert_close(probs64.gather(1, indices), want.values, rtol=1e-5, atol=0)
    else:
        probs_lp = ref.similarity_softmax(image, text, scale, bias, normalize, activation).double()
        slack = 3 * (probs_lp - probs64).abs().max().item()
        assert (probs64.gather(1, indices) >= want.values[:, -1:] - slack).all()


# ---- forward and all gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params())
def test_matches_reference(backend, device, dtype, activation, normalize):
    image, text = make_features(64, 100, 128, normalize)
    bias = -2.5 if activation == "sigmoid" else 0.75
    compare(image.to(device, dtype), text.to(device, dtype), default_scale(normalize, activation), bias, normalize,
            activation, backend)


@pytest.mark.parametrize("shape", [(1, 37, 24), (6, 1, 24), (9, 13, 7)], ids=["N1", "C1", "D7"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params())
def test_odd_shapes(backend, device, dtype, activation, shape):
    image, text = make_features(*shape, normalize=True, seed=2)
    compare(image.to(device, dtype), text.to(device, dtype), 10.0, 0.5, True, activation, backend)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params())
def test_feature_dim_one(backend, device, dtype, activation, normalize):
    """D=1. Normalized, every x_i is +-1 and the gradient through the normalization is exactly zero, so
    a relative comparison is meaningless there: forward only, gradients checked without normalization."""
    image, text = make_features(7, 11, 1, normalize, seed=3)
    image, text = image.to(device, dtype), text.to(device, dtype)
    if not normalize:
        compare(image, text, 2.0, 0.25, False, activation, backend)
        return
    out = mmfast.similarity_softmax(image, text, 4.0, activation=activation, backend=backend)
    want = ref.similarity_softmax(image.double(), text.double(), 4.0, None, True, activation)
    want_lp = ref.similarity_softmax(image, text, 4.0, None, True, activation)
    check(out, want, want_lp, "out")


@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params())
def test_many_classes(backend, device, dtype):
    """ImageNet-21k's 21843 classes (rows longer than any tile); the interpreter gets a shorter odd C."""
    c = 1531 if interpreted(backend, device) else 21843
    image, text = make_features(3, c, 16, True, seed=4)
    compare(image.to(device, dtype), text.to(device, dtype), 100.0, None, True, "softmax", backend)
    compare(image.to(device, dtype), text.to(device, dtype), 100.0, None, True, "softmax", backend, topk=5)


# ---- top-k mode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params())
def test_topk_matches_reference(backend, device, dtype, activation, normalize):
    """values/indices against torch.topk of the reference, and the gradients of the gathered values."""
    image, text = make_features(32, 100, 64, normalize, seed=5)
    compare(image.to(device, dtype), text.to(device, dtype), default_scale(normalize, activation), 0.5, normalize,
            activation, backend, topk=5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params(first_dtype_only=True))
def test_topk_extreme_k(backend, device, dtype, activation):
    """k=1 and k=C (all classes, sorted)."""
    image, text = make_features(8, 100, 32, True, seed=6)
    image, text = image.to(device, dtype), text.to(device, dtype)
    for k in (1, 100):
        compare(image, text, 20.0 if activation == "softmax" else 5.0, 0.5, True, activation, backend, topk=k)


def test_topk_large_k_cpu():
    """The CPU kernel takes any k <= C (the Triton kernel stops at 128): k spanning several class tiles."""
    if "cpu" not in mmfast.available_backends("cpu"):
        pytest.skip("mmfast._C not built")
    image, text = make_features(5, 5000, 16, True, seed=7)
    compare(image.float(), text.float(), 30.0, None, True, "softmax", "cpu", topk=3000)


# ---- arguments: strided views, logit_scale forms, inputs left alone -------------------------------------
@pytest.mark.parametrize("topk", [None, 4])
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params(first_dtype_only=True))
def test_non_contiguous_inputs_and_inputs_unchanged(backend, device, dtype, topk):
    image, text = make_features(20, 30, 24, True, seed=8)
    image_t = image.T.contiguous().to(device, dtype).T  # transposed view, strides (1, N)
    text_s = torch.cat([text, text], dim=1).to(device, dtype)[:, ::2]  # column-strided view
    assert not image_t.is_contiguous() and not text_s.is_contiguous()
    before = (image_t.clone(), text_s.clone())
    compare(image_t, text_s, 50.0, None, True, "softmax", backend, topk=topk)
    assert torch.equal(image_t, before[0]) and torch.equal(text_s, before[1]), "an input was modified"


@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params(first_dtype_only=True))
def test_logit_scale_forms(backend, device, dtype):
    """A float, a 0-dim and a shape-[1] tensor give the same output; tensors get gradients of their shape."""
    image, text = make_features(5, 9, 16, True, seed=9)
    image, text = image.to(device, dtype), text.to(device, dtype)
    outs, grads = [], []
    for scale in (20.0, torch.tensor(20.0, device=device, requires_grad=True),
                  torch.tensor([20.0], device=device, requires_grad=True)):
        out = mmfast.similarity_softmax(image, text, scale, 0.5, backend=backend)
        outs.append(out)
        if isinstance(scale, torch.Tensor):
            out.backward(torch.ones_like(out).cumsum(-1))
            grads.append(scale.grad)
        else:
            grads.append(None)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert grads[1].shape == () and grads[2].shape == (1,)
    torch.testing.assert_close(grads[1].reshape(1), grads[2])


@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params())
def test_zero_feature_row_is_finite(backend, device, dtype):
    """F.normalize maps a zero row to a zero vector: its logits are the bias, never NaN. Its gradient is
    g / eps (F.normalize's), ~1e12, beyond fp16's range, so fp16 checks the forward only, against fp64:
    the fp16 reference itself gives NaN there (its eps, 1e-12, underflows to 0 in fp16 and 0/0 = NaN)."""
    image, text = make_features(6, 10, 16, True, seed=10)
    image[2] = 0
    text[3] = 0
    image, text = image.to(device, dtype), text.to(device, dtype)
    for activation in ACTIVATIONS:
        if dtype == torch.float16:
            out = mmfast.similarity_softmax(image, text, 10.0, 0.5, activation=activation, backend=backend)
            assert torch.isfinite(out).all()
            want = ref.similarity_softmax(image.double(), text.double(), 10.0, 0.5, True, activation)
            torch.testing.assert_close(out.double(), want, rtol=4 * torch.finfo(dtype).eps, atol=1e-3)
        else:
            compare(image, text, 10.0, 0.5, True, activation, backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, from the Triton interpreter on NaN
@pytest.mark.parametrize("case", ["nan_image_row", "inf_text_row", "inf_image_unnormalized"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params(first_dtype_only=True))
def test_nan_inf_propagate_as_in_reference(backend, device, dtype, activation, case):
    """NaN/Inf in an input row give NaN at exactly the reference's positions (a NaN image row: its output
    row; an Inf text row, normalized: inf/inf = NaN in that class's column, hence every softmax row), and
    the same values elsewhere; in the top-k mode too."""
    normalize = case != "inf_image_unnormalized"
    image, text = make_features(5, 8, 16, normalize, seed=11)
    if case == "nan_image_row":
        image[1, 3] = float("nan")
    elif case == "inf_text_row":
        text[2, 5] = float("inf")
    else:
        image[3, 0] = float("inf")
    image, text = image.to(device, dtype), text.to(device, dtype)
    out = mmfast.similarity_softmax(image, text, 3.0, 0.5, normalize=normalize, activation=activation,
                                    backend=backend)
    want = ref.similarity_softmax(image.double(), text.double(), 3.0, 0.5, normalize, activation)
    assert want.isnan().any() or case == "inf_image_unnormalized"
    assert torch.equal(out.isnan(), want.isnan()), "NaN positions differ from the reference"
    assert torch.equal(out.isinf(), want.isinf()), "Inf positions differ from the reference"
    finite = torch.isfinite(want)
    if finite.any():
        torch.testing.assert_close(out[finite].double(), want[finite], rtol=1e-5, atol=1e-6)
    # Top-k ranks NaN above everything, as torch.topk does; k = C also returns the -inf logits.
    values, _ = mmfast.similarity_softmax(image, text, 3.0, 0.5, normalize=normalize, activation=activation,
                                          topk=text.shape[0], backend=backend)
    want_values = want.topk(text.shape[0], dim=-1).values
    assert torch.equal(values.isnan(), want_values.isnan()), "top-k NaN positions differ from the reference"
    assert torch.equal(values.isinf(), want_values.isinf()), "top-k Inf positions differ from the reference"
    finite = torch.isfinite(want_values)
    torch.testing.assert_close(values[finite].double(), want_values[finite], rtol=1e-5, atol=1e-6)


# ---- operator registration: opcheck and torch.compile ----------------------------------------------------
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params(first_dtype_only=True))
def test_opcheck(backend, device, dtype):
    fwd, bwd, topk, topk_bwd = (getattr(torch.ops.mmfast, n) for n in op_names(backend))
    image, text = make_features(3, 5, 8, True, seed=12)
    image = image.to(device, dtype).requires_grad_()
    text = text.to(device, dtype).requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-1.0, device=device, requires_grad=True)
    for activation in ("softmax", "sigmoid"):
        torch.library.opcheck(fwd, (image, text, scale, bias, True, activation))
        torch.library.opcheck(topk, (image, text, scale, bias, True, activation, 2))
        with torch.no_grad():
            out, inv_i, inv_t = fwd(image, text, scale, bias, True, activation)
            values, indices, row_lse, _, _ = topk(image, text, scale, bias, True, activation, 2)
            args = [t.detach() for t in (image, text, scale, bias)]
        torch.library.opcheck(bwd, (torch.randn_like(out), out, args[0], args[1], inv_i, inv_t, args[2], True,
                                    activation))
        torch.library.opcheck(topk_bwd, (torch.randn_like(values), values, indices, row_lse, args[0], args[1], inv_i,
                                         inv_t, args[2], args[3], True, activation))


@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params(first_dtype_only=True))
def test_torch_compile_fullgraph(backend, device, dtype):
    """Forward and backward of the functional API traced into one graph each (fake impls, autograd)."""
    torch._dynamo.reset()

    def loss_fn(image, text, scale):
        probs = mmfast.similarity_softmax(image, text, scale, -0.5, backend=backend)
        values, _ = mmfast.similarity_softmax(image, text, scale, -0.5, topk=3, backend=backend)
        return (probs * probs).sum() + values.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if interpreted(backend, device) else "inductor")
    image, text = make_features(6, 12, 16, True, seed=13)
    results = []
    for fn in (loss_fn, compiled):
        im = image.to(device, dtype).requires_grad_()
        tx = text.to(device, dtype).requires_grad_()
        s = torch.tensor(10.0, device=device, requires_grad=True)
        loss = fn(im, tx, s)
        loss.backward()
        results.append((loss.detach(), im.grad, tx.grad, s.grad))
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-6)


# ---- backend selection and bad input ---------------------------------------------------------------------
def test_float64_runs_the_reference_under_auto():
    image, text = make_features(4, 6, 8, True, seed=14)
    image.requires_grad_()
    with mmfast.use_backend("auto"):
        out = mmfast.similarity_softmax(image, text, 100.0)
        values, indices = mmfast.similarity_softmax(image, text, 100.0, topk=2)
    want = ref.similarity_softmax(image, text, 100.0)
    assert out.dtype == torch.float64 and torch.equal(out, want)
    assert torch.equal(values, want.topk(2).values) and torch.equal(indices, want.topk(2).indices)
    out.sum().backward()
    assert image.grad is not None and image.grad.dtype == torch.float64
    with pytest.raises(mmfast.BackendUnavailableError, match="float64"):
        mmfast.similarity_softmax(image, text, backend="cpu")


def test_cuda_backend_on_cpu_tensors_raises():
    with pytest.raises(mmfast.BackendUnavailableError, match="cuda"):
        mmfast.similarity_softmax(torch.randn(2, 4), torch.randn(3, 4), backend="cuda")


def _bad_calls():
    img, txt = torch.randn(4, 8), torch.randn(5, 8)
    cases = [
        ((img, torch.randn(5, 9)), {}, ValueError, "feature dim D mismatch.*image_features.*text_features"),
        ((torch.randn(4), txt), {}, ValueError, "image_features must have 2 or 3 dimensions"),
        ((img, torch.randn(2, 5, 8)), {}, ValueError, r"text_features \(2, 5, 8\) is batched: image_features must be"),
        ((img, torch.randn(2, 5, 8, 1)), {}, ValueError, "text_features must have 2 or 3 dimensions"),
        ((torch.randn(0, 8), txt), {}, ValueError, "image_features must not be empty"),
        ((img, torch.randn(0, 8)), {}, ValueError, "text_features must not be empty"),
        ((img.long(), txt.long()), {}, TypeError, "image_features must be a floating tensor"),
        ((img, txt.half()), {}, TypeError, "text_features is torch.float16 but image_features is torch.float32"),
        ((img, txt.to("meta")), {}, ValueError, "text_features is on meta but image_features is on cpu"),
        ((img, txt), {"activation": "relu"}, ValueError, "activation must be"),
        ((img, txt), {"topk": 0}, ValueError, r"topk must be an int in \[1, C=5\]"),
        ((img, txt), {"topk": 6}, ValueError, r"topk must be an int in \[1, C=5\]"),
        ((img, txt), {"topk": 2.0}, ValueError, "topk must be"),
        ((img, txt), {"topk": True}, ValueError, "topk must be"),
        ((img, txt, torch.ones(2)), {}, ValueError, "logit_scale must be a float, a 0-dim or a shape-\\[1\\] tensor"),
        ((img, txt, 1.0, torch.ones(2)), {}, ValueError, "logit_bias must be"),
        ((img, txt, "100"), {}, TypeError, "logit_scale must be a float or a tensor"),
        ((img, txt), {"backend": "gpu"}, ValueError, "backend must be one of"),
    ]
    return [pytest.param(a, k, e, m, id=m.split(" ")[0] + f"-{i}") for i, (a, k, e, m) in enumerate(cases)]


@pytest.mark.parametrize("args, kwargs, exc, match", _bad_calls())
def test_bad_input_raises_naming_the_argument(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mmfast.similarity_softmax(*args, **kwargs)


def test_cpu_operators_check_their_arguments():
    """Direct torch.ops.mmfast.* calls (no Python checks in front) raise, naming the argument."""
    if "cpu" not in mmfast.available_backends("cpu"):
        pytest.skip("mmfast._C not built")
    ops = torch.ops.mmfast
    img, txt, s = torch.randn(4, 8), torch.randn(5, 8), torch.tensor(10.0)
    for args, match in [
        ((img, torch.randn(5, 9), s, None, True, "softmax"), "feature dim D mismatch"),
        ((img.long(), txt.long(), s, None, True, "softmax"), "image must be float32, float16 or bfloat16"),
        ((img, txt.double(), s, None, True, "softmax"), "text is Double but image is Float"),
        ((img, txt, torch.ones(2), None, True, "softmax"), "logit_scale must be a 0-dim or shape-\\[1\\] tensor"),
        ((img, txt, s, torch.ones(3), True, "softmax"), "logit_bias must be a 0-dim"),
        ((img, txt, s, None, True, "relu"), "activation must be"),
        ((torch.randn(0, 8), txt, s, None, True, "softmax"), "image must not be empty"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops.similarity_softmax(*args)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, C=5\]"):
        ops.similarity_topk(img, txt, s, None, True, "softmax", 6)
    out, inv_i, inv_t = ops.similarity_softmax(img, txt, s, None, True, "softmax")
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.similarity_softmax_backward(out[:, :2], out, img, txt, inv_i, inv_t, s, True, "softmax")
    with pytest.raises(RuntimeError, match="inv_norm_text must be a float32 tensor of shape \\[5\\]"):
        ops.similarity_softmax_backward(out, out, img, txt, inv_i, inv_i, s, True, "softmax")
    values, indices, lse, _, _ = ops.similarity_topk(img, txt, s, None, True, "softmax", 2)
    with pytest.raises(RuntimeError, match="indices must be in \\[0, C=5\\)"):
        ops.similarity_topk_backward(values, values, indices + 5, lse, img, txt, inv_i, inv_t, s, None, True,
                                     "softmax")
