"""An open_clip training loop with mmfast's patched loss, against open_clip's own loss.

    python examples/clip_train.py                 # a small random CLIP on this CPU (well under 2 minutes)
    python examples/clip_train.py --full          # ViT-B-32 (random init) at batch 256..4096, on a GPU
    python examples/clip_train.py --siglip        # SigLipLoss instead of ClipLoss
    python examples/clip_train.py --gradcache 64  # each step through mmfast.contrastive_step, 64 rows per chunk

The loss is built the way open_clip_train.main builds it, `open_clip.create_loss(args)`, once before
`mmfast.patch_open_clip()` (open_clip's ClipLoss) and once after (mmfast.nn.ClipLoss), and the step is
open_clip_train's: model(images, texts) -> dict, loss(**out, output_dict=True), backward, optimizer step.
Both runs start from the same weights and see the same synthetic batches, so their losses agree step for
step. Per batch size it prints the last loss, the median step time and the peak memory of one step (model,
loss and optimizer together: the loss's share is the B x B logits open_clip builds and mmfast does not).
"""
from __future__ import annotations

import argparse
import copy
from argparse import Namespace

import torch
from tqdm import tqdm

from common import median_ms, mib, peak_memory, pick_device, print_table, timed

import mmfast  # noqa: E402  (after common, which makes a checkout importable)
import open_clip  # noqa: E402

SMALL_CONTEXT, SMALL_VOCAB = 16, 1000


def small_clip(siglip: bool = False, *, context_length: int = SMALL_CONTEXT, vocab_size: int = SMALL_VOCAB,
               embed_dim: int = 64) -> torch.nn.Module:
    """A CLIP of open_clip's own classes at toy sizes: 32 px images, one-layer towers of width 64, random weights
    (vocab_size 49408 takes open_clip's tokenizer's tokens)."""
    return open_clip.CLIP(embed_dim=embed_dim,
                          vision_cfg=dict(layers=1, width=64, head_width=32, patch_size=8, image_size=32),
                          text_cfg=dict(context_length=context_length, vocab_size=vocab_size, width=64, heads=2,
                                        layers=1),
                          init_logit_bias=-10.0 if siglip else None, output_dict=True)


def loss_args(siglip: bool) -> Namespace:
    """The fields of open_clip_train's arguments that create_loss reads (one process)."""
    return Namespace(distill=False, model="ViT-B-32", siglip=siglip, local_loss=False, gather_with_grad=False,
                     rank=0, world_size=1, horovod=False, loss_dist_impl=None)


def batches(batch: int, steps: int, image_size: int, context: int, vocab: int, device):
    g = torch.Generator().manual_seed(batch)
    for _ in range(steps):
        yield (torch.randn(batch, 3, image_size, image_size, generator=g).to(device),
               torch.randint(0, vocab, (batch, context), generator=g).to(device))


def train(model, loss_fn, data, progress, gradcache=None):
    """open_clip_train's step on each batch: (losses, step seconds, peak bytes of the first step). With gradcache
    (a chunk size) the forward and backward are mmfast.contrastive_step's: the same loss and gradients, the
    encoders' activations of one chunk at a time."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = next(model.parameters()).device
    losses, seconds, peak = [], [], None

    def step(images, texts):
        if gradcache:
            total = mmfast.contrastive_step(model, images, texts, loss_fn, chunk_size=gradcache)
        else:
            out = model(images, texts)
            total = sum(loss_fn(**out, output_dict=True).values())
            total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total.item()

    for i, (images, texts) in enumerate(data):
        if i == 0:  # measured apart: the CPU measurement slows the step it watches
            loss, peak = peak_memory(lambda: step(images, texts), device)
        else:
            loss, dt = timed(lambda: step(images, texts), device)
            seconds.append(dt)
        losses.append(loss)
        progress.update()
    return losses, seconds, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ViT-B-32 at batch sizes 256, 1024, 4096 (for a GPU)")
    parser.add_argument("--siglip", action="store_true", help="train with SigLipLoss")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 64 256 1024 (--full: 256 1024 4096)")
    parser.add_argument("--gradcache", type=int, metavar="CHUNK",
                        help="train through mmfast.contrastive_step (GradCache) with CHUNK rows per encoder call")
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is the memory measurement")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.gradcache is not None and args.gradcache < 1:
        parser.error(f"--gradcache must be a chunk size >= 1, got {args.gradcache}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (one measured for memory, the rest timed)")
    torch.manual_seed(0)
    if args.full:
        model = open_clip.create_model("ViT-B-32", pretrained=None, output_dict=True,
                                       init_logit_bias=-10.0 if args.siglip else None)
        batch_sizes = args.batch_sizes or [256, 1024, 4096]
    else:
        model = small_clip(args.siglip)
        batch_sizes = args.batch_sizes or [64, 256, 1024]
    model = model.to(device)
    image_size, context = model.visual.image_size[0], model.context_length
    vocab = model.vocab_size

    upstream_loss = open_clip.create_loss(loss_args(args.siglip))
    mmfast.patch_open_clip()
    try:
        mmfast_loss = open_clip.create_loss(loss_args(args.siglip))  # unchanged call, mmfast's class
    finally:
        mmfast.unpatch_open_clip()
    print(f"{type(upstream_loss).__module__}.{type(upstream_loss).__name__} vs "
          f"{type(mmfast_loss).__module__}.{type(mmfast_loss).__name__} on {device}"
          + (f", both through mmfast.contrastive_step(chunk_size={args.gradcache})" if args.gradcache else ""))

    rows = []
    with tqdm(total=2 * len(batch_sizes) * args.steps, desc="training steps", unit="step") as progress:
        for batch in batch_sizes:
            results = {}
            for name, loss_fn in (("open_clip", upstream_loss), ("mmfast", mmfast_loss)):
                progress.set_postfix(batch=batch, loss=name)
                data = batches(batch, args.steps, image_size, context, vocab, device)
                results[name] = train(copy.deepcopy(model), loss_fn, data, progress, args.gradcache)
            (up_losses, up_s, up_peak), (mm_losses, mm_s, mm_peak) = results["open_clip"], results["mmfast"]
            drift = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(up_losses, mm_losses))
            rows.append([batch, f"{up_losses[-1]:.5f}", f"{mm_losses[-1]:.5f}", f"{drift:.1e}",
                         f"{median_ms(up_s):.1f}", f"{median_ms(mm_s):.1f}", mib(up_peak), mib(mm_peak)])
    print_table(["batch", "loss open_clip", "loss mmfast", "max rel diff", "step ms open_clip", "step ms mmfast",
                 "peak open_clip", "peak mmfast"], rows)
    return rows


if __name__ == "__main__":
    main()
