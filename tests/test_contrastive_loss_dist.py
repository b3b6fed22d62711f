"""Distributed drop-in losses (mmfast.nn.ClipLoss / SigLipLoss) on real gloo process groups of 2 and 3
ranks: per rank, values and gradients equal the reference modules' (open_clip's math) for every
(local_loss, gather_with_grad) combination and SigLIP dist_impl, and the ring gives open_clip's
gather_with_grad=True values and feature gradients with per-rank memory O(B_local * D)."""
from itertools import product

import torch

from conftest import save_results_per_world, spawn_and_wait
from mmfast.nn import ClipLoss, SigLipLoss
from mmfast.reference import contrastive_loss as ref

WORLDS, LOCAL_B, DIM = (2, 3), 5, 16
CLIP_MODES = list(product((False, True), (False, True)))  # (local_loss, gather_with_grad)


def _global_inputs(world):
    gen = torch.Generator().manual_seed(world)
    image = torch.nn.functional.normalize(torch.randn(world * LOCAL_B, DIM, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(world * LOCAL_B, DIM, generator=gen), dim=-1)
    return image, text


def _run(loss_fn, image, text, rows):
    img, txt = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    loss = loss_fn(img, txt, scale, bias)
    loss.backward()
    return [loss.detach(), img.grad, txt.grad, scale.grad, bias.grad]


def _rank_results(rank, world):
    image, text = _global_inputs(world)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    out = {}
    for local_loss, gather_with_grad in CLIP_MODES:
        kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        out["clip", local_loss, gather_with_grad] = (_run(ClipLoss(**kw), image, text, rows),
                                                     _run(ref.ClipLoss(**kw), image, text, rows))
        if gather_with_grad:
            out["ring", local_loss] = (_run(ClipLoss(**kw, dist_impl="ring"), image, text, rows),
                                       out["clip", local_loss, gather_with_grad][1])
    for impl in ref.SigLipLoss.DIST_IMPLS:
        kw = dict(rank=rank, world_size=world, dist_impl=impl)
        out["siglip", impl] = (_run(SigLipLoss(**kw), image, text, rows), _run(ref.SigLipLoss(**kw), image, text, rows))
    try:  # uneven per-rank batches: a clear error on every rank, not a hang
        ClipLoss(rank=rank, world_size=world)(torch.randn(LOCAL_B + rank, DIM), torch.randn(LOCAL_B + rank, DIM), 1.0)
        out["uneven"] = "no error"
    except ValueError as e:
        out["uneven"] = str(e)
    return out


def _worker(rank, out_dir):
    save_results_per_world(rank, out_dir, WORLDS, _rank_results)


def _close(a, b, what):
    if b is None:
        assert a is None or torch.count_nonzero(a) == 0, f"{what}: expected no gradient"
        return
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def _check_world(world, ranks):
    for key in ranks[0]:
        if key == "uneven":
            for res in ranks:
                assert "same batch size" in res[key], res[key]
            continue
        names = ("loss", "grad image", "grad text", "grad logit_scale", "grad logit_bias")
        if key[0] == "ring":
            # Values and feature gradients per rank; logit_scale's gradient is split across ranks
            # differently, with the same sum (what DDP's averaging sees).
            for r, (ours, theirs) in enumerate(r_[key] for r_ in ranks):
                for i in range(3):
                    _close(ours[i], theirs[i], f"world {world} rank {r} {key} {names[i]}")
            _close(sum(r_[key][0][3] for r_ in ranks), sum(r_[key][1][3] for r_ in ranks), f"{key} sum grad scale")
            continue
        for r, (ours, theirs) in enumerate(r_[key] for r_ in ranks):
            for i, name in enumerate(names):
                _close(ours[i], theirs[i], f"world {world} rank {r} {key} {name}")


def test_distributed_drop_in_losses_match_open_clip(tmp_path):
    spawn_and_wait(_worker, tmp_path, max(WORLDS), 120)
    for world in WORLDS:
        _check_world(world, [torch.load(tmp_path / f"world{world}_rank{r}.pt") for r in range(world)])


def test_even_batch_check_runs_on_nccl_without_host_sync_cuda(tmp_path):
    """The drop-ins' per-rank batch check on CUDA features: NCCL takes the sizes (CUDA tensors) and the check
    adds no host sync (a one-rank NCCL group; more ranks where a multi-GPU machine is lent)."""
    import pytest
    import torch.distributed as dist

    from mmfast.nn.contrastive_loss import _check_even_batches

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        features = torch.randn(5, DIM, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            _check_even_batches(features, None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()  # the asynchronous assert, had it failed, would raise here
    finally:
        dist.destroy_process_group()
