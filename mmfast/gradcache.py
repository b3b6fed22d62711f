"""mmfast.contrastive_step: a gradient-cache training step (GradCache, Gao et al. 2021) for CLIP/SigLIP-style training.

This module is mmfast.gradcache, not mmfast.contrastive_step: importing a submodule binds its name on the package,
which would shadow the lazily exported function of the same name.

mmfast's fused losses need O(B*D) memory, but a full-batch step still holds every encoder activation of the
batch until backward. `contrastive_step` holds one chunk's activations at a time, in three stages:

  1. embed the images, then the texts, chunk by chunk without autograd, saving the RNG state before each chunk;
  2. on leaf copies of the full embedding matrices: normalize (as open_clip's CLIP.forward does), call
     loss_fn once and backpropagate it, which gives d loss / d embedding for every row and accumulates the
     logit_scale / logit_bias gradients (and those of anything else the loss reads) into their `.grad`;
  3. re-run each chunk with autograd, its RNG state restored, and backpropagate the cached embedding
     gradients through it: torch.autograd.backward(chunk_embeddings, chunk_gradients).

The loss and the parameter gradients are those of `loss_fn(*model(images, texts)).backward()`, up to the
order in which the chunks' contributions are summed; the memory is one chunk's activations plus O(B*D).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

__all__ = ["contrastive_step"]


def contrastive_step(model, images, texts, loss_fn, *, chunk_size, image_encoder=None, text_encoder=None,
                     scaler=None, normalize=True):
    """One contrastive training step's loss and gradients, with activation memory of one chunk.

    Args:
        model: open_clip-style: `encode_image`, `encode_text`, `logit_scale` (the log of the scale, a Parameter,
            exponentiated here as open_clip's CLIP.forward does) and, for SigLIP, `logit_bias` (passed to the
            loss when the model has one that is not None). A DistributedDataParallel model: its `.module`'s
            encoders are called (DDP's hooks, installed by DDP's forward, do not fire) and the gradients are
            averaged over `model.process_group` once at the end, as DDP's backward does (comm hooks are not
            applied). Distributed losses (mmfast.nn.ClipLoss gather or ring, SigLipLoss, open_clip's) work: stage
            2 is one ordinary call of the loss and its backward on every rank.
        images, texts: tensors whose first dimension is the batch (the same on both).
        loss_fn: called as loss_fn(image_features, text_features, logit_scale[, logit_bias]), e.g.
            mmfast.nn.ClipLoss / SigLipLoss or open_clip's; a 0-dim tensor, or a dict of them (summed, as
            open_clip_train sums `output_dict=True` losses).
        chunk_size: rows per encoder call (an int >= 1); the last chunk may be smaller.
        image_encoder, text_encoder: callables chunk -> [rows, D] embeddings, replacing model.encode_image /
            model.encode_text (models of other shapes); `model` still supplies logit_scale / logit_bias.
        scaler: a torch.amp.GradScaler. Backward runs inside this function, so `scaler.scale(loss).backward()`
            cannot be called on the returned loss: pass the scaler here and the gradients are scaled as that call
            would scale them; then call scaler.step(optimizer) and scaler.update() as usual. The returned loss is
            not scaled.
        normalize: L2-normalize the encoders' outputs (open_clip's `normalize=True`) before the loss.

    Returns the loss, detached. The parameter gradients are accumulated into `.grad`, as `loss.backward()` does.

    Dropout, stochastic depth and patch dropout draw the same masks in stages 1 and 3 (the CPU generator and
    the CUDA generators of the inputs' and parameters' devices are restored per chunk); the masks are those of a
    forward pass that runs chunk by chunk (images then texts): the same distribution as a full-batch pass's,
    other draws. Afterwards the generators stand where that one forward pass leaves them.
    torch.autocast: call this inside the autocast context; it applies to the encoders in both passes and to
    the loss. The autocast weight-cast cache is cleared after stage 1, whose casts carry no autograd history.

    BatchNorm-style layers normalize each chunk with that chunk's statistics, not the full batch's, so with
    them the gradients are those of a batch whose BN groups are the chunks (GradCache's known limitation; use
    LayerNorm/GroupNorm towers or BN in eval mode for the full-batch result). Their running statistics are
    updated once per chunk: the stage-3 re-run's update is undone (stage 1 already made it).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"mmfast.contrastive_step: chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"mmfast.contrastive_step: chunk_size must be >= 1, got {chunk_size}")
    for name, x in (("images", images), ("texts", texts)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"mmfast.contrastive_step: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"mmfast.contrastive_step: {name} needs a non-empty batch dimension, got shape "
                             f"{tuple(x.shape)}")
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"mmfast.contrastive_step: images and texts must have the same batch size, got "
                         f"{images.shape[0]} images and {texts.shape[0]} texts")
    ddp = model if isinstance(model, DistributedDataParallel) else None
    module = model.module if ddp is not None else model
    encoders = [_encoder(module, image_encoder, "image"), _encoder(module, text_encoder, "text")]
    if not hasattr(module, "logit_scale"):
        raise AttributeError(f"mmfast.contrastive_step: model ({type(module).__name__}) has no logit_scale "
                             "(open_clip's log-scale Parameter)")

    towers = [(encode, batch.split(chunk_size), name)
              for encode, batch, name in zip(encoders, (images, texts), ("image_encoder", "text_encoder"))]
    devices = _cuda_devices(images, texts, *module.parameters())  # the generators dropout may draw from

    # Stage 1: embeddings without autograd; RNG state saved before each chunk.
    rng_states, embeddings = [], []  # per tower: per chunk
    with torch.no_grad():
        for encode, chunks, name in towers:
            outs, states = [], []
            for chunk in chunks:
                states.append(_rng_state(devices))
                outs.append(_checked(encode(chunk), chunk.shape[0], name, outs[0] if outs else None))
            rng_states.append(states)
            embeddings.append(torch.cat(outs))
    if embeddings[0].shape[1] != embeddings[1].shape[1]:
        raise ValueError(f"mmfast.contrastive_step: image_encoder gives D={embeddings[0].shape[1]} but "
                         f"text_encoder gives D={embeddings[1].shape[1]}; the loss needs the same D")
    # Autocast caches that ignore grad mode (older PyTorch; 2.14 skips caching under no_grad) would hand stage 3
    # stage 1's weight casts, which have no grad_fn, and the weights would get no gradient.
    torch.clear_autocast_cache()
    norm_stats = [(m, _norm_buffers(m)) for m in module.modules()
                  if isinstance(m, _NormBase) and m.training and m.track_running_stats]

    # Stage 2: the loss and its gradients w.r.t. every embedding, logit_scale and logit_bias, in one call.
    leaves = [e.requires_grad_() for e in embeddings]  # fresh tensors from torch.cat: leaves of their own
    with torch.enable_grad():
        features = [F.normalize(e, dim=-1) for e in leaves] if normalize else leaves
        args = [*features, module.logit_scale.exp()]
        if getattr(module, "logit_bias", None) is not None:
            args.append(module.logit_bias)
        loss = loss_fn(*args)
        if isinstance(loss, dict):
            loss = sum(loss.values())
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"mmfast.contrastive_step: loss_fn must return a scalar tensor (or a dict of them), got "
                            f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        (scaler.scale(loss) if scaler is not None else loss).backward()

    # Stage 3: re-run each chunk with autograd and the same RNG state; backpropagate the cached gradients.
    for (encode, chunks, _), leaf, states in zip(towers, leaves, rng_states):
        if leaf.grad is None:
            continue  # the loss does not read this tower's embeddings
        for chunk, grad, state in zip(chunks, leaf.grad.split(chunk_size), states):
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                _set_rng_state(state, devices)
                out = encode(chunk)
                if not out.requires_grad:
                    break  # a frozen tower (LiT): nothing of it to train, skip its other chunks too
                torch.autograd.backward(out, grad.to(out.dtype))
    for m, saved in norm_stats:
        for name, value in saved.items():
            getattr(m, name).copy_(value)

    if ddp is not None:
        _average_gradients(module, ddp.process_group)
    return loss.detach()


def _encoder(module, encoder, tower):
    if encoder is not None:
        if not callable(encoder):
            raise TypeError(f"mmfast.contrastive_step: {tower}_encoder must be callable, got {type(encoder).__name__}")
        return encoder
    method = getattr(module, f"encode_{tower}", None)
    if method is None:
        raise AttributeError(f"mmfast.contrastive_step: model ({type(module).__name__}) has no encode_{tower}; "
                             f"pass {tower}_encoder=")
    return method


def _checked(out, rows, name, first):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"mmfast.contrastive_step: {name} must return a tensor [rows, D], got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != rows:
        raise ValueError(f"mmfast.contrastive_step: {name} must return [rows, D] = [{rows}, D] for a chunk of "
                         f"{rows}, got shape {tuple(out.shape)}")
    if first is not None and (out.shape[1], out.dtype, out.device) != (first.shape[1], first.dtype, first.device):
        raise ValueError(f"mmfast.contrastive_step: {name} returned D={out.shape[1]} {out.dtype} on {out.device} "
                         f"for one chunk and D={first.shape[1]} {first.dtype} on {first.device} for another")
    return out


def _cuda_devices(*tensors):
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.device.type == "cuda"})


def _rng_state(devices):
    # torch.utils.checkpoint's approach: the CPU generator (open_clip's PatchDropout draws there even on a
    # GPU) and the CUDA generator of each device the inputs are on.
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def _norm_buffers(m):
    return {name: getattr(m, name).clone() for name in ("running_mean", "running_var", "num_batches_tracked")
            if getattr(m, name, None) is not None}


def _average_gradients(module, group):
    """DDP's reduction: every gradient summed over the group and divided by its size (one flat all-reduce per
    dtype, as DDP's buckets do it in fewer calls)."""
    world = dist.get_world_size(group)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group_grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group_grads])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in group_grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
