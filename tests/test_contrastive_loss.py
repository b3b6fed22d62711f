"""mmfast.ops.contrastive_loss (fused CLIP and SigLIP losses) and its block operators, against the
open_clip formulas of mmfast/reference/contrastive_loss.py evaluated in float64.

Gradient checks: the C++ CPU kernels also run in float64 (for this purpose only; the functional API
sends float64 to the reference), so torch.autograd.gradcheck runs on the kernels themselves, and
opcheck covers the schemas, fake impls and autograd registration of every operator.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close_to_reference, backend_device_params, dtypes_for, rel_err
from torch.library import opcheck

import mmfast
from mmfast.ops import contrastive_loss as cl
from mmfast.reference import contrastive_loss as ref

F64 = torch.float64
LOSSES = {"clip": (cl.clip_loss, ref.clip_loss), "siglip": (cl.siglip_loss, ref.siglip_loss)}
GRAD_NAMES = ("image_features", "text_features", "logit_scale", "logit_bias")

# (B, D, logit_scale, logit_bias): every B in {1, 2, 3, 17, 128, 1000}, D in {1, 8, 64, 511, 768} and
# scale in {1, 14.3, 100} at least once, with and without a bias. B=1000 spans several 512-wide tiles
# (and both threads' row/column chunks).
CASES = [
    (1, 8, 14.3, None),
    (2, 1, 1.0, -1.0),
    (2, 768, 100.0, -10.0),
    (3, 64, 100.0, None),
    (17, 1, 100.0, -3.0),
    (17, 511, 14.3, -10.0),
    (128, 8, 1.0, None),
    (128, 768, 100.0, -10.0),
    (1000, 64, 14.3, -10.0),
    (1000, 511, 100.0, None),
]


def skip_unless_implemented(backend):
    if backend not in cl.IMPLEMENTATIONS:
        pytest.skip(f"the contrastive-loss ops have no {backend!r} implementation registered yet "
                    f"(they have {cl.IMPLEMENTATIONS})")


def features(B, D, seed=0, device="cpu"):
    """Unit-norm image features and text features correlated with them (so the positives matter)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B, D, generator=gen, dtype=F64), dim=-1)
    text = F.normalize(image + 0.7 * torch.randn(B, D, generator=gen, dtype=F64), dim=-1)
    return image.to(device), text.to(device)


def loss_and_grads(fn, image, text, scale, bias, dtype, **kwargs):
    """fn's loss and the gradients of (image, text, logit_scale, logit_bias), inputs cast to dtype."""
    scalar_dtype = F64 if dtype == F64 else torch.float32
    i = image.detach().to(dtype).requires_grad_()
    t = text.detach().to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=scalar_dtype, device=image.device, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=scalar_dtype, device=image.device, requires_grad=True)
    loss = fn(i, t, s, b, **kwargs)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad, None if b is None else b.grad


def compare(loss_name, got, want64, want_same_precision):
    """Loss and gradients against the fp64 reference. fp16/bf16: conftest's 2x rule. fp32: relative error
    <= 1e-5, or at most 2x that of the reference run in fp32 where the quantity itself is ill-conditioned
    (the logit_scale / logit_bias gradients are sums of B^2 terms that cancel to a small value, and fp32
    logits at scale 100 are off by ~1e-5 each: measured 4e-5 relative for open_clip's own fp32 bias
    gradient at B=128)."""
    for k, name in enumerate(("loss",) + GRAD_NAMES):
        out, ref64, ref_same = got[k], want64[k], want_same_precision[k]
        if ref64 is None:
            assert out is None, name
        elif loss_name == "clip" and name == "logit_bias":
            assert torch.equal(out, torch.zeros_like(out)), "CLIP's bias gradient must be exactly zero"
        elif out.dtype == torch.float32:
            err, ref_err = rel_err(out, ref64), rel_err(ref_same, ref64)
            assert err <= max(1e-5, 2 * ref_err), f"{name}: rel err {err:.3e} (fp32 reference: {ref_err:.3e})"
        else:
            assert_close_to_reference(out, ref64, ref_same, name=name)


# ---- the losses against the float64 reference -----------------------------------------------------
@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("B,D,scale,bias", CASES)
def test_loss_and_gradients_match_float64_reference(backend, device, loss_name, B, D, scale, bias):
    skip_unless_implemented(backend)
    fused, oracle = LOSSES[loss_name]
    image, text = features(B, D, device=device)
    got = loss_and_grads(fused, image, text, scale, bias, torch.float32, backend=backend)
    assert got[0].dtype == torch.float32
    compare(loss_name, got, loss_and_grads(oracle, image, text, scale, bias, F64),
            loss_and_grads(oracle, image, text, scale, bias, torch.float32))


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_low_precision_error_at_most_twice_the_reference_in_that_precision(backend, device, dtype, loss_name):
    skip_unless_implemented(backend)
    fused, oracle = LOSSES[loss_name]
    image, text = features(256, 64, seed=1, device=device)
    got = loss_and_grads(fused, image, text, 100.0, -10.0, dtype, backend=backend)
    assert got[0].dtype == dtype
    compare(loss_name, got, loss_and_grads(oracle, image, text, 100.0, -10.0, F64),
            loss_and_grads(oracle, image, text, 100.0, -10.0, dtype))


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_low_precision_large_batch_stays_finite(backend, device, dtype, loss_name):
    """B=8192, scale 100: open_clip's fp16 logits overflow on CPU (inf loss); the fused kernels keep
    fp32 logits and statistics. The fp32 kernel's loss stands in for the exact value."""
    skip_unless_implemented(backend)
    fused, _ = LOSSES[loss_name]
    image, text = features(8192, 64, seed=2, device=device)
    got = loss_and_grads(fused, image, text, 100.0, -10.0, dtype, backend=backend)
    assert all(torch.isfinite(g).all() for g in got), "non-finite loss or gradient"
    with torch.no_grad():
        exact = fused(image.float(), text.float(), 100.0, -10.0, backend=backend)
    assert abs(got[0].float().item() - exact.item()) <= 1e-2 * abs(exact.item())


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_loss_of_one_pair_is_exactly_zero(backend, device, dtype):
    skip_unless_implemented(backend)
    image, text = features(1, 16, device=device)
    for bias in (None, -3.0):
        loss, gi, gt, gs, _ = loss_and_grads(cl.clip_loss, image, text, 100.0, bias, dtype, backend=backend)
        assert loss.item() == 0.0
        assert not gi.any() and not gt.any() and gs.item() == 0.0


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_non_contiguous_inputs_are_read_not_written(backend, device, loss_name):
    skip_unless_implemented(backend)
    fused, _ = LOSSES[loss_name]
    image, text = features(600, 48, device=device)
    wide = torch.zeros(600, 96, device=device)
    wide[:, ::2] = image.float()
    image_view = wide[:, ::2].requires_grad_()                      # strided columns
    text_view = text.float().t().contiguous().t().requires_grad_()  # column-major
    before = (image_view.detach().clone(), text_view.detach().clone())
    loss = fused(image_view, text_view, 14.3, -1.0, backend=backend)  # a float scale: no gradient for it
    loss.backward()
    assert torch.equal(image_view.detach(), before[0]) and torch.equal(text_view.detach(), before[1])
    want = loss_and_grads(fused, image.float(), text.float(), 14.3, -1.0, torch.float32, backend=backend)
    assert torch.equal(loss, want[0])
    assert torch.equal(image_view.grad, want[1]) and torch.equal(text_view.grad, want[2])


def test_reference_backend_and_float64_use_the_reference():
    image, text = features(9, 5)
    for fused, oracle in LOSSES.values():
        torch.testing.assert_close(fused(image.float(), text.float(), 10.0, -1.0, backend="reference"),
                                   oracle(image.float(), text.float(), 10.0, -1.0))
        got = loss_and_grads(fused, image, text, 10.0, -1.0, F64)  # float64 under auto: the reference
        want = loss_and_grads(oracle, image, text, 10.0, -1.0, F64)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_siglip_skips_gradients_when_nothing_needs_them():
    image, text = features(40, 8)
    image, text = image.float(), text.float()
    scale = torch.tensor(10.0)
    loss, *grads = torch.ops.mmfast.siglip_loss_block(image, text, scale, None, True, False)
    assert all(g.numel() == 0 for g in grads)
    with torch.no_grad():
        assert torch.equal(cl.siglip_loss(image, text, scale, None), (loss / 40).float())
    needs_grad = image.clone().requires_grad_()
    out = torch.ops.mmfast.siglip_loss_block(needs_grad, text, scale, None, True, False)[0]
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        out.backward()


# ---- the block operators -------------------------------------------------------------------------
def block_logits(rows, cols, scale, bias):
    return scale * rows.double() @ cols.double().T + (0.0 if bias is None else bias)


def assert_clip_block_statistics(row_lse, col_lse, pos, x, offset):
    """clip_loss_block's outputs vs the float64 logits x [Bi, Bt]: the rows' and columns' log-sum-exps and
    the positive logits x[i, i + offset] (0 where that column is outside the block)."""
    i = torch.arange(x.shape[0])
    inside = (i + offset >= 0) & (i + offset < x.shape[1])
    want_pos = torch.zeros(x.shape[0], dtype=F64)
    want_pos[inside] = x[i[inside], i[inside] + offset]
    torch.testing.assert_close(row_lse.cpu().double(), x.logsumexp(1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(col_lse.cpu().double(), x.logsumexp(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(pos.cpu().double(), want_pos, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("Bi,Bt,offset", [(7, 7, 0), (5, 9, 3), (9, 5, -2), (600, 1100, 513), (1030, 520, -700),
                                          (4, 4, 10)])
def test_clip_block_statistics_with_label_offset(Bi, Bt, offset):
    gen = torch.Generator().manual_seed(3)
    rows, cols = torch.randn(Bi, 24, generator=gen), torch.randn(Bt, 24, generator=gen)
    row_lse, col_lse, pos = torch.ops.mmfast.clip_loss_block(rows, cols, torch.tensor(2.5), torch.tensor(-1.0), offset)
    assert_clip_block_statistics(row_lse, col_lse, pos, block_logits(rows, cols, 2.5, -1.0), offset)


BLOCK_OPERATOR_PARAMS = [pytest.param(kernels, device, dtype, id=f"{kernels}-{device}-{str(dtype)[6:]}")
                         for device in DEVICES for kernels in ("native", "triton")
                         for dtype in dtypes_for("triton" if kernels == "triton" else "cpu", device)]


@pytest.mark.parametrize("kernels,device,dtype", BLOCK_OPERATOR_PARAMS)
def test_block_operators_across_column_chunks_match_float64(kernels, device, dtype, monkeypatch):
    """The three block operators (the extension's kernels for `device`, or the Triton ones) against float64 on
    the rounded inputs. Bt = 4136 > 4096: two column chunks in the CUDA kernels (several 512-column tiles on the
    CPU; Triton: chunks of 1024 columns here), with positives straddling the chunk boundary (offset 4080) or
    partly outside the block (offset -10). Upstream coefficients of 1e-5 (CLIP's 1/(2B) at B = 50000) make every
    dL/dx entry subnormal in fp16: rounded as they are, the fp16 feature gradients are off by ~4.5e-3 (measured
    in an emulation), so passing 2 fp16 epsilons needs the rescaled gradient (csrc/cuda/contrastive_loss.cu and
    mmfast/triton/contrastive_loss.py: ~3e-4)."""
    if kernels == "triton":
        tc = triton_contrastive_module()
        # 1024-column chunks (fp32 G at Bi = 24): the chunk loop and positives across chunk boundaries.
        monkeypatch.setattr(tc, "GRAD_CHUNK_BYTES", 24 * 1024 * 4)
    elif device == "cuda" and "cuda" not in cl.IMPLEMENTATIONS:
        pytest.skip(f"this extension has no CUDA kernels for the contrastive-loss ops ({cl.IMPLEMENTATIONS})")
    suffix = "_triton" if kernels == "triton" else ""
    clip_block = getattr(torch.ops.mmfast, "clip_loss_block" + suffix)
    clip_block_backward = getattr(torch.ops.mmfast, "clip_loss_block_backward" + suffix)
    siglip_block = getattr(torch.ops.mmfast, "siglip_loss_block" + suffix)
    gen = torch.Generator().manual_seed(14)
    Bi, Bt, D, scale, bias = 24, 4136, 16, 30.0, -1.0
    rows = F.normalize(torch.randn(Bi, D, generator=gen), dim=-1).to(dtype)
    cols = F.normalize(torch.randn(Bt, D, generator=gen), dim=-1).to(dtype)
    r64, c64 = rows.double(), cols.double()
    dots = r64 @ c64.T
    x = scale * dots + bias
    dev = {"device": device}
    args = (rows.to(device), cols.to(device), torch.tensor(scale, **dev), torch.tensor(bias, **dev))
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    i = torch.arange(Bi)

    def check_grads(got, G, name):
        want = (scale * G @ c64, scale * G.T @ r64, (G * dots).sum(), G.sum())
        for k, part in enumerate(("rows", "cols")):
            err = rel_err(got[k].cpu(), want[k])
            assert got[k].dtype == dtype and err <= tol, (name, part, err)
        # The scalar gradients sum B^2 terms of both signs: their error is relative to the sum of |terms|.
        assert abs(got[2].item() - want[2].item()) <= 1e-5 * (G * dots).abs().sum().item(), (name, "scale")
        assert abs(got[3].item() - want[3].item()) <= 1e-5 * G.abs().sum().item(), (name, "bias")

    for offset in (4080, -10):
        row_lse, col_lse, pos = clip_block(*args, offset)
        assert_clip_block_statistics(row_lse, col_lse, pos, x, offset)
        inside = (i + offset >= 0) & (i + offset < Bt)
        gr, gc, gp = (1e-5 * torch.randn(n, generator=gen) for n in (Bi, Bt, Bi))
        got = clip_block_backward(*args, offset, row_lse, col_lse, gr.to(device), gc.to(device), gp.to(device))
        rl, cl_ = row_lse.cpu().double(), col_lse.cpu().double()  # the backward's P uses the given lses
        G = gr.double()[:, None] * (x - rl[:, None]).exp() + gc.double()[None, :] * (x - cl_[None, :]).exp()
        G[i[inside], i[inside] + offset] += gp.double()[inside]
        check_grads(got, G, f"clip offset {offset}")

    for has_positives in (True, False):
        positive = torch.zeros(Bi, Bt, dtype=torch.bool)
        if has_positives:
            positive[i, i] = True
        loss, *grads = siglip_block(*args, has_positives, True)
        want_loss = F.softplus(torch.where(positive, -x, x)).sum()
        assert abs(loss.item() - want_loss.item()) <= 1e-5 * want_loss.item()
        check_grads(grads, torch.sigmoid(x) - positive.double(), f"siglip has_positives={has_positives}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_clip_row_loss_is_open_clip_local_loss(backend):
    """open_clip's local_loss on rank 1 of 3: local rows against all gathered columns, labels offset by
    B * rank, in both directions. Only row_lse and pos_logits get gradients: the column term drops out
    of the backward."""
    B, rank, world, D = 40, 1, 3, 16
    image_all, text_all = features(B * world, D, seed=4)
    image_all, text_all = image_all.float().requires_grad_(), text_all.float().requires_grad_()
    scale = torch.tensor(20.0, requires_grad=True)
    local = slice(B * rank, B * (rank + 1))
    loss = (cl.clip_row_loss(image_all[local], text_all, scale, B * rank, backend=backend)
            + cl.clip_row_loss(text_all[local], image_all, scale, B * rank, backend=backend)) / 2
    got = torch.autograd.grad(loss, (image_all, text_all, scale))

    i64, t64 = image_all.detach().double().requires_grad_(), text_all.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    labels = torch.arange(B) + B * rank
    want_loss = (F.cross_entropy(s64 * i64[local] @ t64.T, labels)
                 + F.cross_entropy(s64 * t64[local] @ i64.T, labels)) / 2
    want = torch.autograd.grad(want_loss, (i64, t64, s64))
    assert_close_to_reference(loss.detach(), want_loss.detach(), name="loss")
    for g, w, name in zip(got, want, GRAD_NAMES):
        assert_close_to_reference(g, w, name=name)
    with pytest.raises(ValueError, match="label_offset must be an int with 0 <= label_offset"):
        cl.clip_row_loss(image_all[local], text_all, scale, B * world - 1)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_siglip_negatives_only_block_matches_reference(backend):
    image, text = features(70, 12, seed=5)
    other_text, _ = features(70, 12, seed=6)

    def fused(i, t, s, b):
        return cl.siglip_block_loss(i, t, s, b, has_positives=False, backend=backend)

    def oracle(i, t, s, b):
        return ref.siglip_loss(i, t, s, b, negative_only=True)

    compare("siglip", loss_and_grads(fused, image, other_text, 10.0, -10.0, torch.float32),
            loss_and_grads(oracle, image, other_text, 10.0, -10.0, F64),
            loss_and_grads(oracle, image, other_text, 10.0, -10.0, torch.float32))


@pytest.mark.parametrize("offset", [0, 2, -3])
def test_gradcheck_float64_kernels(offset):
    gen = torch.Generator().manual_seed(7)
    rows = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    cols = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    scale = torch.tensor(1.7, dtype=F64, requires_grad=True)
    bias = torch.tensor(-0.4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r, c, s, b: torch.ops.mmfast.clip_loss_block(r, c, s, b, offset), (rows, cols, scale, bias))
    assert torch.autograd.gradcheck(
        lambda r, c, s, b: torch.ops.mmfast.siglip_loss_block(r, c, s, b, offset == 0, True)[0],
        (rows, cols, scale, bias))


def test_gradcheck_float64_kernels_across_tiles():
    """Blocks larger than one 512 x 512 tile and split between threads (fast_mode: random projections)."""
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(600, 4, generator=gen, dtype=F64, requires_grad=True)
    cols = torch.randn(530, 4, generator=gen, dtype=F64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r, c, s: torch.ops.mmfast.clip_loss_block(r, c, s, None, 70), (rows, cols, scale), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda r, c, s: torch.ops.mmfast.siglip_loss_block(r, c, s, None, True, True)[0], (rows, cols, scale),
        fast_mode=True)


def test_results_are_deterministic():
    image, text = features(1100, 32, seed=9)
    image, text = image.float().requires_grad_(), text.float().requires_grad_()
    for fn in (cl.clip_loss, cl.siglip_loss):
        runs = []
        for _ in range(2):
            loss = fn(image, text, 30.0, -5.0)
            runs.append((loss,) + torch.autograd.grad(loss, (image, text)))
        assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_opcheck():
    gen = torch.Generator().manual_seed(10)
    rows = torch.randn(6, 5, generator=gen, requires_grad=True)
    cols = torch.randn(8, 5, generator=gen, requires_grad=True)
    scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    for offset in (0, 2, -4):
        opcheck(torch.ops.mmfast.clip_loss_block, (rows, cols, scale, bias, offset))
    opcheck(torch.ops.mmfast.clip_loss_block, (rows, cols, scale, None, 0))
    r, c, s = rows.detach(), cols.detach(), scale.detach()
    row_lse, col_lse, _ = torch.ops.mmfast.clip_loss_block(r, c, s, None, 1)
    g_rows, g_cols = torch.randn(6, generator=gen), torch.randn(8, generator=gen)
    opcheck(torch.ops.mmfast.clip_loss_block_backward, (r, c, s, None, 1, row_lse, col_lse, g_rows, g_cols, g_rows))
    opcheck(torch.ops.mmfast.clip_loss_block_backward,
            (r, c, s, bias.detach(), 1, row_lse, col_lse, g_rows, None, None))
    for has_positives in (True, False):
        opcheck(torch.ops.mmfast.siglip_loss_block, (rows, cols, scale, bias, has_positives, True))
    opcheck(torch.ops.mmfast.siglip_loss_block, (r, c, s, None, True, False))


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_torch_compile_fullgraph_forward_and_backward(loss_name):
    fused, _ = LOSSES[loss_name]
    image, text = features(64, 16, seed=11)
    got = loss_and_grads(torch.compile(fused, fullgraph=True), image, text, 14.3, -2.0, torch.float32)
    want = loss_and_grads(fused, image, text, 14.3, -2.0, torch.float32)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_bad_input_errors_name_the_argument(loss_name):
    fused, _ = LOSSES[loss_name]
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    cases = [
        ((image, torch.randn(5, 8), 1.0, None), ValueError, "batch size mismatch: image_features has 4"),
        ((image, torch.randn(4, 7), 1.0, None), ValueError, "feature dim D mismatch: image_features has 8"),
        ((torch.randn(4, 8, 1), text, 1.0, None), ValueError, "image_features must have 2 dimensions"),
        ((image, torch.randn(8), 1.0, None), ValueError, "text_features must have 2 dimensions"),
        ((image, text, torch.ones(2), None), ValueError, r"logit_scale must be a float, a 0-dim or a shape-\[1\]"),
        ((image, text, 1.0, torch.ones(1, 2)), ValueError, r"logit_bias must be a float, a 0-dim or a shape-\[1\]"),
        ((image, text.double(), 1.0, None), TypeError, "text_features is torch.float64 but image_features is"),
        ((image, text.to("meta"), 1.0, None), ValueError, "text_features is on meta but image_features is on cpu"),
        ((image, text, torch.tensor(1.0, device="meta"), None), ValueError, "logit_scale is on meta"),
        ((image, text, "1.0", None), TypeError, "logit_scale must be a float or a tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            fused(*args)
    # backend='cuda' on CPU tensors: an error naming the device where the CUDA kernels are built, else
    # one saying the op has no such implementation.
    cuda_error = ("backend 'cuda' runs CUDA tensors; these are on cpu" if "cuda" in cl.IMPLEMENTATIONS
                  else "has no 'cuda' implementation")
    with pytest.raises(mmfast.BackendUnavailableError, match=cuda_error):
        fused(image, text, 1.0, None, backend="cuda")


def test_bad_operator_arguments_are_errors_not_crashes():
    rows, cols, scale = torch.randn(4, 8), torch.randn(5, 8), torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="feature dim D mismatch: rows has 8"):
        torch.ops.mmfast.clip_loss_block(rows, cols[:, :7], scale, None, 0)
    with pytest.raises(RuntimeError, match="rows must be float32, float16, bfloat16 or float64"):
        torch.ops.mmfast.siglip_loss_block(rows.int(), cols.int(), scale, None, True, True)
    with pytest.raises(RuntimeError, match=r"logit_scale must be a 0-dim or shape-\[1\] tensor"):
        torch.ops.mmfast.siglip_loss_block(rows, cols, torch.ones(2), None, True, True)
    with pytest.raises(RuntimeError, match="cols is Half but rows is Float"):
        torch.ops.mmfast.clip_loss_block(rows, cols.half(), scale, None, 0)
    row_lse, col_lse, _ = torch.ops.mmfast.clip_loss_block(rows, cols, scale, None, 0)
    with pytest.raises(RuntimeError, match=r"col_lse must have shape \[5\]"):
        torch.ops.mmfast.clip_loss_block_backward(rows, cols, scale, None, 0, row_lse, row_lse, None, None, None)
    with pytest.raises(RuntimeError, match="grad_row_lse must be Float"):
        torch.ops.mmfast.clip_loss_block_backward(rows, cols, scale, None, 0, row_lse, col_lse, row_lse.double(),
                                                  None, None)


# ---- Triton forward: band grid, scratch O(Bi + Bt) -------------------------------------------------
# (Issue 3 item 1: extra memory independent of B^2.) Small tiles and MAX_BANDS = 3 make several bands of
# uneven tile counts at small B: 100 rows of 16-row tiles = 7 tiles in bands of 2, 2, 3.
BAND_BLOCKS = (16, 16, 16, 4, 1)  # a _BLOCKS "forward" entry: BLOCK_M, BLOCK_N, BLOCK_D, warps, stages


def triton_contrastive_module():
    skip_unless_implemented("triton")
    import mmfast.triton.contrastive_loss as tc

    return tc


def scratch_bytes(tc, op, bi, bt, table):
    return sum(4 * torch.Size(s).numel() for s in tc.forward_scratch_shapes(op, bi, bt, 128, table=table).values())


@pytest.mark.parametrize("op", ["clip", "siglip"])
def test_triton_forward_scratch_grows_linearly_in_batch(op):
    tc = triton_contrastive_module()
    per_row = 2 * 4 * tc.MAX_BANDS  # (max, sum-exp) fp32 per band, at most MAX_BANDS bands
    for table in ("interpret", "fp32", "half"):
        for bi, bt in [(1, 1), (1, 5000), (1000, 1000), (1000, 4000), (4000, 4000), (4096, 65536),
                       (65536, 65536), (2 ** 20 + 3, 2 ** 20 - 5)]:
            assert scratch_bytes(tc, op, bi, bt, table) <= per_row * (bi + bt), (table, bi, bt)
        # Once a side has MAX_BANDS tiles, 4x the batch is exactly 4x the scratch (a B^2 / tile scheme: 16x).
        assert scratch_bytes(tc, op, 65536, 65536, table) == 4 * scratch_bytes(tc, op, 16384, 16384, table)
    assert scratch_bytes(tc, op, 4000, 4000, "fp32") == 4 * scratch_bytes(tc, op, 1000, 1000, "fp32")
    assert scratch_bytes(tc, op, 65536, 65536, "half") <= 17 * 2 ** 20  # 0.8 GB with one partial per tile


@pytest.mark.parametrize("device", DEVICES)
def test_triton_forward_bands_with_ragged_edges(monkeypatch, device):
    """Several bands of uneven tile counts, B not a multiple of the tile, B below one tile, B = 1, both
    label_offset signs, against float64; the launch allocates exactly forward_scratch_shapes()."""
    tc = triton_contrastive_module()
    monkeypatch.setattr(tc, "MAX_BANDS", 3)
    for dtype in (torch.float32, torch.float16):
        monkeypatch.setitem(tc._BLOCKS[tc._table(dtype)], "forward", BAND_BLOCKS)
    allocated = []
    empty = torch.empty

    def recording_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        allocated.append(tuple(out.shape))
        return out

    gen = torch.Generator().manual_seed(12)
    scale, bias = torch.tensor(2.5, device=device), torch.tensor(-1.0, device=device)
    for Bi, Bt, offset, dtype in [(100, 70, 5, torch.float32), (70, 100, -20, torch.float16),
                                  (13, 9, -2, torch.float32), (1, 1, 0, torch.float32), (1, 40, 3, torch.float32),
                                  (40, 1, -39, torch.float32)]:
        rows = torch.randn(Bi, 16, generator=gen).to(device, dtype)
        cols = torch.randn(Bt, 16, generator=gen).to(device, dtype)
        allocated.clear()
        monkeypatch.setattr(torch, "empty", recording_empty)
        row_lse, col_lse, pos = torch.ops.mmfast.clip_loss_block_triton(rows, cols, scale, bias, offset)
        monkeypatch.setattr(torch, "empty", empty)
        scratch = tc.forward_scratch_shapes("clip", Bi, Bt, 16, dtype)
        assert [s for s in allocated if len(s) > 1] == list(scratch.values()), (allocated, scratch)
        x = block_logits(rows.cpu(), cols.cpu(), 2.5, -1.0)
        assert_clip_block_statistics(row_lse, col_lse, pos, x, offset)
        # SigLIP without gradients runs the same band grid.
        sign = 1.0 - 2.0 * torch.eye(Bi, Bt, dtype=F64)
        loss = torch.ops.mmfast.siglip_loss_block_triton(rows, cols, scale, bias, True, False)[0]
        want = F.softplus(sign * x).sum()
        assert abs(loss.item() - want.item()) <= 1e-5 * want.item(), (Bi, Bt)
    again = torch.ops.mmfast.clip_loss_block_triton(rows, cols, scale, bias, offset)
    assert all(torch.equal(a, b) for a, b in zip(again, (row_lse, col_lse, pos)))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_clip_loss_with_forward_bands_matches_float64_reference(monkeypatch, device):
    tc = triton_contrastive_module()
    monkeypatch.setattr(tc, "MAX_BANDS", 2)
    monkeypatch.setitem(tc._BLOCKS[tc._table(torch.float32)], "forward", BAND_BLOCKS)
    image, text = features(50, 16, seed=13, device=device)
    compare("clip", loss_and_grads(cl.clip_loss, image, text, 100.0, None, torch.float32, backend="triton"),
            loss_and_grads(ref.clip_loss, image, text, 100.0, None, F64),
            loss_and_grads(ref.clip_loss, image, text, 100.0, None, torch.float32))
