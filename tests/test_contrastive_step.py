"""mmfast.contrastive_step (GradCache): loss and every parameter gradient equal the full-batch step's, in float64 on
a small random open_clip CLIP, for ClipLoss and SigLipLoss (mmfast's and open_clip's) and chunk sizes that do and do
not divide the batch; with dropout on (attention dropout in both towers, open_clip's patch dropout); under CPU
autocast and a GradScaler; on a gloo group of 2 (distributed losses, and a DDP-wrapped model); bad input."""
import copy
import sys
from pathlib import Path

import open_clip
from open_clip.loss import ClipLoss as OpenClipLoss, SigLipLoss as OpenSigLipLoss
import pytest
import torch

import mmfast
import mmfast.gradcache
from conftest import save_results_per_world, spawn_and_wait
from mmfast.testing import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import clip_train  # noqa: E402  (examples/)
from clip_train import small_clip  # noqa: E402

B, CONTEXT, VOCAB = 10, 8, 100
LOSSES = {"clip-mmfast": lambda: mmfast.nn.ClipLoss(), "siglip-mmfast": lambda: mmfast.nn.SigLipLoss(),
          "clip-open_clip": lambda: OpenClipLoss(), "siglip-open_clip": lambda: OpenSigLipLoss()}


def _model(siglip, dropout, seed=0):
    torch.manual_seed(seed)
    model = small_clip(siglip, context_length=CONTEXT, vocab_size=VOCAB).double().train()
    model.output_dict = False  # loss_fn(*model(images, texts)), as the issue states the full-batch step
    if dropout:
        model.visual.patch_dropout = open_clip.transformer.PatchDropout(0.5)
        for mha in [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]:
            mha.dropout = 0.3
    return model


def _batch(seed=1, batch=B, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype)
    return images, torch.randint(0, VOCAB, (batch, CONTEXT), generator=g)


def _grads(model):
    module = getattr(model, "module", model)  # a DDP wrapper's names without "module."
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _full_step(model, images, texts, loss_fn, chunk=None):
    """The plain step, loss_fn(*model(images, texts)).backward(); with `chunk`, the towers run chunk by chunk with
    autograd (images then texts, as contrastive_step's first stage), which draws the same dropout masks."""
    if chunk is None:
        out = model(images, texts)
    else:
        img = torch.cat([model.encode_image(c, normalize=True) for c in images.split(chunk)])
        txt = torch.cat([model.encode_text(c, normalize=True) for c in texts.split(chunk)])
        out = (img, txt, model.logit_scale.exp()) + ((model.logit_bias,) if model.logit_bias is not None else ())
    loss = loss_fn(*out)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(ours, theirs, what, rtol=1e-9, atol=1e-12, norm_rtol=None):
    """Loss and gradients elementwise close, or (norm_rtol) each within norm_rtol of its reference in norm."""
    (loss, grads), (loss_ref, grads_ref) = ours, theirs
    assert grads.keys() == grads_ref.keys(), f"{what}: parameters with gradients differ"
    for name, x, ref in [("loss", loss, loss_ref)] + [(n, grads[n], grads_ref[n]) for n in grads_ref]:
        if norm_rtol is None:
            torch.testing.assert_close(x, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")
        else:
            assert rel_err(x, ref) <= norm_rtol, f"{what} {name}: relative error {rel_err(x, ref):.2e}"


def _step(model, images, texts, loss_fn, chunk, **kw):
    loss = mmfast.contrastive_step(model, images, texts, loss_fn, chunk_size=chunk, **kw)
    assert loss.grad_fn is None and not loss.requires_grad
    return loss, _grads(model)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_equals_full_batch_step(loss_name):
    """Without dropout: exactly the full-batch step, loss_fn(*model(images, texts)).backward(), for chunks that divide
    B (5, 10), do not (3, 4, 7: a last chunk of 1, 2 and 3 rows), exceed it (16) and of one row."""
    model = _model("siglip" in loss_name, dropout=False)
    images, texts = _batch()
    ref = _full_step(copy.deepcopy(model), images, texts, LOSSES[loss_name]())
    for chunk in (1, 3, 4, 5, 7, 10, 16):
        m = copy.deepcopy(model)
        _assert_same(_step(m, images, texts, LOSSES[loss_name](), chunk), ref, f"{loss_name} chunk {chunk}")


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_dropout_masks_replayed(siglip):
    """With dropout on, stage 3 must draw stage 1's masks: the gradients equal those of the forward run chunk by chunk
    from the same seed; and the step leaves the RNG where that forward leaves it. A different seed changes them
    (the dropout is live)."""
    model = _model(siglip, dropout=True)
    images, texts = _batch()
    loss_fn = mmfast.nn.SigLipLoss() if siglip else mmfast.nn.ClipLoss()
    for chunk in (3, 4):
        torch.manual_seed(7)
        ref = _full_step(copy.deepcopy(model), images, texts, loss_fn, chunk)
        after_ref = torch.rand(1)
        torch.manual_seed(7)
        _assert_same(_step(copy.deepcopy(model), images, texts, loss_fn, chunk), ref, f"dropout chunk {chunk}")
        assert torch.equal(torch.rand(1), after_ref), "the step must consume the RNG as one forward pass does"
    torch.manual_seed(8)
    other = _step(copy.deepcopy(model), images, texts, loss_fn, 4)
    assert not torch.allclose(other[0], ref[0]), "dropout had no effect: the test would not see a wrong mask"


def test_accumulates_into_existing_grads_and_logit_params():
    """Gradients add to what .grad holds (as backward does), logit_scale and logit_bias included."""
    model = _model(True, dropout=False)
    images, texts = _batch()
    loss_fn = mmfast.nn.SigLipLoss()
    _, once = _full_step(copy.deepcopy(model), images, texts, loss_fn)
    m = copy.deepcopy(model)
    _step(m, images, texts, loss_fn, 4)
    _, twice = _step(m, images, texts, loss_fn, 3)
    assert {"logit_scale", "logit_bias"} <= once.keys()
    for name, g in once.items():
        torch.testing.assert_close(twice[name], 2 * g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_dict_loss_and_own_normalization():
    """A loss returning open_clip's output_dict form (summed), and encoders that normalize themselves with
    normalize=False: still the full-batch step."""
    model = _model(False, dropout=False)
    images, texts = _batch()
    ref = _full_step(copy.deepcopy(model), images, texts, mmfast.nn.ClipLoss())
    m = copy.deepcopy(model)
    loss_fn = mmfast.nn.ClipLoss()
    _assert_same(_step(m, images, texts, lambda *a: loss_fn(*a, output_dict=True), 4, normalize=False,
                       image_encoder=lambda x: m.encode_image(x, normalize=True),
                       text_encoder=lambda t: m.encode_text(t, normalize=True)), ref, "dict loss, normalize=False")


def test_autocast_and_grad_scaler():
    """CPU autocast (bf16): the same gradients as the autocast forward run chunk by chunk with autograd (fp32
    parameters; only the summation order of the chunks' contributions differs), every parameter reached; a
    GradScaler's scale multiplies every gradient and not the returned loss."""
    torch.manual_seed(0)
    model = small_clip(False, context_length=CONTEXT, vocab_size=VOCAB).train()
    images, texts = _batch(dtype=torch.float32)
    loss_fn = mmfast.nn.ClipLoss()
    # Without the weight-cast cache the reference's chunks each backpropagate through their own cast, so their
    # contributions are summed in fp32 as contrastive_step's separate backward calls sum them (with the cache,
    # one shared bf16 cast sums them in bf16 first: 1e-3 apart).
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        ref = _full_step(copy.deepcopy(model), images, texts, loss_fn, chunk=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _step(copy.deepcopy(model), images, texts, loss_fn, 4)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaled = _step(copy.deepcopy(model), images, texts, loss_fn, 4, scaler=scaler)
    assert ours[1].keys() == {n for n, p in model.named_parameters()}
    _assert_same(ours, ref, "autocast", rtol=1e-5, atol=1e-7)
    _assert_same(scaled, (ours[0], {n: 1024 * g for n, g in ours[1].items()}), "scaler", rtol=1e-6, atol=1e-9)


def test_frozen_tower_and_batchnorm_running_stats():
    """A locked image tower (LiT) gets no gradient and the text tower its full-batch one; BatchNorm's running
    statistics are updated once per chunk, as by a forward run chunk by chunk."""
    model = _model(False, dropout=False)
    model.visual.requires_grad_(False)
    images, texts = _batch()
    ref = _full_step(copy.deepcopy(model), images, texts, mmfast.nn.ClipLoss())
    _assert_same(_step(copy.deepcopy(model), images, texts, mmfast.nn.ClipLoss(), 4), ref, "locked image tower")

    bn = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    towers = torch.nn.ModuleDict(dict(bn=bn, proj=torch.nn.Linear(3, 4, dtype=torch.float64)))
    towers.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    encode = lambda x: towers.proj(towers.bn(x))  # noqa: E731
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    reference = copy.deepcopy(bn)
    for chunk in x.split(4):
        reference(chunk)
    mmfast.contrastive_step(towers, x, y, mmfast.nn.ClipLoss(), chunk_size=4, image_encoder=encode,
                            text_encoder=lambda t: t)
    assert bn.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn.running_mean, reference.running_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=1e-12, atol=0)


def test_bad_input():
    model = _model(False, dropout=False)
    images, texts = _batch()
    loss_fn = mmfast.nn.ClipLoss()
    step = mmfast.contrastive_step
    for chunk, err, msg in ((0, ValueError, "chunk_size must be >= 1, got 0"), (-2, ValueError, ">= 1, got -2"),
                            (2.0, TypeError, "chunk_size must be an int, got float"),
                            (True, TypeError, "chunk_size must be an int, got bool")):
        with pytest.raises(err, match=msg):
            step(model, images, texts, loss_fn, chunk_size=chunk)
    with pytest.raises(ValueError, match="same batch size, got 10 images and 9 texts"):
        step(model, images, texts[:9], loss_fn, chunk_size=4)
    with pytest.raises(TypeError, match="texts must be a torch.Tensor, got list"):
        step(model, images, texts.tolist(), loss_fn, chunk_size=4)
    with pytest.raises(ValueError, match="images needs a non-empty batch dimension"):
        step(model, images[:0], texts[:0], loss_fn, chunk_size=4)
    with pytest.raises(ValueError, match=r"image_encoder must return \[rows, D\] = \[4, D\] for a chunk of 4, "
                                         r"got shape \(4, 2, 64\)"):
        step(model, images, texts, loss_fn, chunk_size=4, image_encoder=lambda x: model.encode_image(x)[:, None]
             .expand(-1, 2, -1))
    with pytest.raises(ValueError, match=r"text_encoder must return \[rows, D\] = \[4, D\] .* got shape \(3, 64\)"):
        step(model, images, texts, loss_fn, chunk_size=4, text_encoder=lambda t: model.encode_text(t)[:3])
    with pytest.raises(TypeError, match="image_encoder must return a tensor"):
        step(model, images, texts, loss_fn, chunk_size=4, image_encoder=lambda x: (model.encode_image(x),))
    with pytest.raises(ValueError, match="image_encoder gives D=64 but text_encoder gives D=32"):
        step(model, images, texts, loss_fn, chunk_size=4, text_encoder=lambda t: model.encode_text(t)[:, :32])
    with pytest.raises(AttributeError, match="has no encode_text; pass text_encoder="):
        step(torch.nn.Module(), images, texts, loss_fn, chunk_size=4, image_encoder=model.encode_image)
    with pytest.raises(AttributeError, match="has no logit_scale"):
        step(torch.nn.Module(), images, texts, loss_fn, chunk_size=4, image_encoder=model.encode_image,
             text_encoder=model.encode_text)
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor .* got Tensor\\(10,\\)"):
        step(model, images, texts, lambda i, t, s: (i * t).sum(-1), chunk_size=4)


# ---- a gloo group of 2 -----------------------------------------------------------------------------------------
def _rank_results(rank, world):
    """Per rank: (ours, full-batch) for mmfast's distributed ClipLoss (gather_with_grad, gather and ring) and
    SigLipLoss on a plain model, and ClipLoss on a DDP-wrapped model (gradients averaged over the ranks)."""
    torch.set_num_threads(1)
    images, texts = _batch(seed=10 + rank, batch=5)
    out = {}
    losses = {"clip-gather": lambda: mmfast.nn.ClipLoss(gather_with_grad=True, rank=rank, world_size=world),
              "clip-ring": lambda: mmfast.nn.ClipLoss(gather_with_grad=True, rank=rank, world_size=world,
                                                      dist_impl="ring"),
              "siglip": lambda: mmfast.nn.SigLipLoss(rank=rank, world_size=world)}
    for name, make in losses.items():
        model = _model(name == "siglip", dropout=False)
        imgs = images
        if name == "clip-ring":  # the ring runs mmfast's fused block operators, which take fp32/fp16/bf16
            model, imgs = model.float(), images.float()
        out[name] = (_step(copy.deepcopy(model), imgs, texts, make(), 2),
                     _full_step(copy.deepcopy(model), imgs, texts, make()))
    model = _model(False, dropout=False)
    ddp_ours, ddp_ref = (torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model)) for _ in range(2))
    out["ddp"] = (_step(ddp_ours, images, texts, losses["clip-gather"](), 2),
                  _full_step(ddp_ref, images, texts, losses["clip-gather"]()))
    return out


def _worker(rank, out_dir):
    save_results_per_world(rank, out_dir, (2,), _rank_results)


def test_gloo_group_of_2(tmp_path):
    spawn_and_wait(_worker, tmp_path, 2, timeout_s=120)
    ranks = [torch.load(tmp_path / f"world2_rank{r}.pt") for r in range(2)]
    for key in ranks[0]:
        for r, res in enumerate(ranks):
            ours, ref = res[key]
            # the ring runs in fp32 (the project's fp32 rule): the chunked towers' matmuls round differently
            _assert_same(ours, ref, f"rank {r} {key}", norm_rtol=1e-5 if key == "clip-ring" else None)
    ddp = [res["ddp"][0][1] for res in ranks]
    for name in ddp[0]:  # DDP's averaging: every rank holds the same gradient
        torch.testing.assert_close(ddp[0][name], ddp[1][name], rtol=0, atol=0, msg=lambda m: f"ddp {name}: {m}")


def test_example_clip_train_gradcache(monkeypatch):
    """examples/clip_train.py --gradcache: the same losses, step for step (AdamW), as its plain full-batch steps."""
    plain = clip_train.main(["--batch-sizes", "12", "--steps", "2"])
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["chunk_size"])
        return mmfast.gradcache.contrastive_step(*args, **kwargs)

    monkeypatch.setattr(mmfast, "contrastive_step", counted, raising=False)
    chunked = clip_train.main(["--batch-sizes", "12", "--steps", "2", "--gradcache", "5"])
    assert calls == [5] * 4  # 2 steps x (open_clip's loss, mmfast's)
    for a, b in zip(plain, chunked):
        for column in (1, 2):  # last loss with open_clip's ClipLoss, with mmfast's
            assert abs(float(a[column]) - float(b[column])) <= 2e-5, (a, b)
