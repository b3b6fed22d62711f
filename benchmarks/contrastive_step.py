"""Peak memory and step time of one CLIP training step against the batch size: the plain full-batch step, open_clip's
accum_freq path and mmfast.contrastive_step (GradCache), at a fixed chunk (issue 17).

    python benchmarks/contrastive_step.py                       # small ViT CLIP, fp32, this CPU, B = 256 .. 2048
    python benchmarks/contrastive_step.py --model ViT-B-32 --amp bf16 --batch-sizes 4096 16384 65536   # a GPU
    python benchmarks/contrastive_step.py --model ViT-B-32 --amp bf16 --find-max     # largest B that fits (CUDA)

The step is forward + backward with the gradients left in .grad (no optimizer). The loss is mmfast.nn.ClipLoss
(--siglip: SigLipLoss) for all three methods, so they differ only in how the encoders run:
  plain        loss_fn(*model(images, texts)).backward(): every activation of the batch is live at once;
  accum        open_clip_train's --accum-freq (B / chunk micro-batches): embed every micro-batch without grad,
               then per micro-batch re-embed it with grad, splice it into the cached features, compute the whole
               loss and backpropagate it: the loss runs B / chunk times;
  gradcache    mmfast.contrastive_step(..., chunk_size=chunk): the loss runs once.
Peak memory: examples/common.peak_memory (CUDA allocator counters; on the CPU the profiler's allocation trace),
above what was live before the step (model, inputs); measured on a call of its own, as it slows the CPU step.
Not a registered `python -m mmfast bench` case: the runner's cases are one op against its float64 reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

METHODS = ("plain", "accum", "gradcache")


def accum_step(model, images, texts, loss_fn, chunk):
    """open_clip_train.train.train_one_epoch's accum_freq > 1 branch, one optimizer step's worth (its
    model(images, texts) -> dict of features; the features' row blocks replaced one micro-batch at a time)."""
    image_chunks, text_chunks = images.split(chunk), texts.split(chunk)
    cached = []
    with torch.no_grad():
        for i, t in zip(image_chunks, text_chunks):
            out = model(i, t)
            cached.append({k: v for k, v in out.items() if k in ("image_features", "text_features")})
    total = 0.0
    for j, (i, t) in enumerate(zip(image_chunks, text_chunks)):
        out = model(i, t)
        inputs = {k: v for k, v in out.items() if k not in cached[j]}
        for key in cached[j]:
            inputs[key] = torch.cat([c[key] for c in cached[:j]] + [out[key]] + [c[key] for c in cached[j + 1:]])
        loss = loss_fn(**inputs)
        loss.backward()
        total += loss.item()
    return total / len(image_chunks)  # open_clip logs the micro-batches' mean; each backward is the full loss


def make_model(name, siglip):
    import open_clip

    if name == "small":  # a small ViT CLIP: 2 layers of width 64 on 32 px images (17 tokens), 2-layer text tower
        return open_clip.CLIP(embed_dim=64,
                              vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                              text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2),
                              init_logit_bias=-10.0 if siglip else None, output_dict=True)
    return open_clip.create_model(name, pretrained=None, output_dict=True, init_logit_bias=-10.0 if siglip else None)


def run(method, model, images, texts, loss_fn, chunk):
    import mmfast

    if method == "plain":
        loss = loss_fn(**model(images, texts))
        loss.backward()
        return loss.item()
    if method == "accum":
        return accum_step(model, images, texts, loss_fn, chunk)
    return mmfast.contrastive_step(model, images, texts, loss_fn, chunk_size=chunk).item()


def measure(method, model, batch, chunk, loss_fn, device, amp, steps, warmup=True):
    """(loss, peak bytes, median step seconds) or None when CUDA runs out of memory."""
    from common import peak_memory, timed

    g = torch.Generator().manual_seed(batch)
    size = model.visual.image_size[0]
    images = texts = None
    try:
        images = torch.randn(batch, 3, size, size, generator=g).to(device)
        texts = torch.randint(0, model.vocab_size, (batch, model.context_length), generator=g).to(device)
    except torch.OutOfMemoryError:  # the inputs alone do not fit
        return None

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return run(method, model, images, texts, loss_fn, chunk)

    try:
        if warmup:  # allocator, kernels; the gradients' memory is part of every measured step
            step()
            model.zero_grad(set_to_none=True)
        loss, peak = peak_memory(step, device)
        seconds = sorted(timed(step, device)[1] for _ in range(steps))
    except torch.OutOfMemoryError:
        return None
    finally:
        del images, texts
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return loss, peak, seconds[len(seconds) // 2]


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from common import mib, pick_device, print_table

    import mmfast

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="'small' (the CPU default) or an open_clip model name")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--chunk", type=int, default=128, help="gradcache chunk and accum micro-batch (default 128)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--siglip", action="store_true", help="SigLipLoss instead of ClipLoss")
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="torch.autocast dtype (default: fp32)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (median)")
    parser.add_argument("--find-max", action="store_true",
                        help="CUDA: per method, double B from the first --batch-sizes until it runs out of memory "
                             "or passes --max-batch")
    parser.add_argument("--max-batch", type=int, default=1 << 20, help="--find-max stops after this batch size")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--no-warmup", action="store_true",
                        help="no warm-up step: the peak-memory step warms up (a GPU lease: at B=65536 a step is ~18 s)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.find_max and device.type != "cuda":
        parser.error("--find-max needs a CUDA device (the CPU has no out-of-memory error to stop at)")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    torch.manual_seed(0)
    model = make_model(args.model, args.siglip).to(device)
    loss_fn = mmfast.nn.SigLipLoss() if args.siglip else mmfast.nn.ClipLoss()
    print(f"{args.model} {'SigLIP' if args.siglip else 'CLIP'} on {device} ({args.amp or 'fp32'}), chunk {args.chunk}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows, largest = [], {}
    for method in args.methods:
        batches = args.batch_sizes
        if args.find_max:
            batches = [b for b in (args.batch_sizes[0] * 2 ** k for k in range(21)) if b <= args.max_batch]
        for batch in batches:
            result = measure(method, model, batch, args.chunk, loss_fn, device, amp, args.steps,
                             warmup=not args.no_warmup)
            if result is None:
                rows.append([method, batch, "out of memory", "", ""])
                break
            loss, peak, seconds = result
            largest[method] = batch
            rows.append([method, batch, mib(peak), f"{1e3 * seconds:.0f}", f"{loss:.4f}"])
            print(f"  {method} B={batch}: {mib(peak)}, {1e3 * seconds:.0f} ms", flush=True)
    print_table(["method", "batch", "peak memory", "step ms", "loss"], rows)
    if args.find_max:
        print("largest batch that fits: " + ", ".join(f"{m} {b}" for m, b in largest.items()))
    return rows


if __name__ == "__main__":
    main()
