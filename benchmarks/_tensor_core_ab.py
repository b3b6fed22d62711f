"""The CUDA backend with and without its tensor-core kernels (MMFAST_CUDA_TENSOR_CORES), on the issues' headline
shapes: which set of kernels a GPU run should make the default.

Standalone (the leading underscore keeps the bench registry from importing it):
    python benchmarks/_tensor_core_ab.py [--device cuda] [--reps 20] [--small] [--out FILE]
The switch is read once per process, so each setting runs in a child process (`--child 0|1`) that times every
case and saves its outputs; the parent prints per case the median ms of both settings, their ratio
(CUDA cores / tensor cores: above 1, the tensor cores are faster) and the largest difference between the two
settings' results relative to the largest result (both are checked against float64 by the tests; this only
shows that the two agree on the bench shapes). --small: tiny shapes, for a CPU smoke test of the mechanics
(the CPU kernels ignore the switch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the in-place build, as _triton_sweep.py


def cases(small: bool):
    """(name, make(device) -> (fn, inputs needing grad or ())) per case; fn() returns the tensors to compare."""
    import mmfast

    def attention(b, h, lq, lk, lk2, d, dtype, backward):
        def make(dev):
            g = torch.Generator(device="cpu").manual_seed(0)
            shape = lambda n: torch.randn(b, h, n, d, generator=g).to(dev, dtype)  # noqa: E731
            q, k, v = shape(lq), shape(lk), shape(lk)
            k2, v2 = (shape(lk2), shape(lk2)) if lk2 else (None, None)
            leaves = [t.requires_grad_() for t in (q, k, v)] if backward else []

            def fn():
                out = mmfast.cross_attention(q, k, v, k2=k2, v2=v2, backend="cuda" if dev != "cpu" else "cpu")
                if not backward:
                    return [out]
                return list(torch.autograd.grad(out, leaves, torch.ones_like(out)))
            return fn
        return make

    def loss(op, bsz, d, dtype):
        def make(dev):
            g = torch.Generator(device="cpu").manual_seed(0)
            image = torch.nn.functional.normalize(torch.randn(bsz, d, generator=g), dim=-1).to(dev, dtype)
            text = torch.nn.functional.normalize(torch.randn(bsz, d, generator=g), dim=-1).to(dev, dtype)
            image.requires_grad_()
            text.requires_grad_()
            backend = "cuda" if dev != "cpu" else "cpu"

            def fn():
                if op == "clip":
                    value = mmfast.clip_loss(image, text, 100.0, backend=backend)
                else:
                    value = mmfast.siglip_loss(image, text, 10.0, -10.0, backend=backend)
                return [value.detach().reshape(1), *torch.autograd.grad(value, (image, text))]
            return fn
        return make

    def similarity(n, c, d, dtype, topk=None, backward=False):
        def make(dev):
            g = torch.Generator(device="cpu").manual_seed(0)
            image, text = torch.randn(n, d, generator=g).to(dev, dtype), torch.randn(c, d, generator=g).to(dev, dtype)
            backend = "cuda" if dev != "cpu" else "cpu"
            if backward:
                image.requires_grad_()
                text.requires_grad_()

            def fn():
                with torch.set_grad_enabled(backward):
                    out = mmfast.similarity_softmax(image, text, 100.0, topk=topk, backend=backend)
                    first = out[0] if topk else out
                    grads = list(torch.autograd.grad(first, (image, text), torch.ones_like(first))) if backward else []
                    return [t.detach() for t in (list(out) if topk else [out])] + grads
            return fn
        return make

    bf16, fp16 = torch.bfloat16, torch.float16
    if small:
        return [("attention bf16 small forward", attention(1, 2, 8, 40, 8, 16, bf16, False)),
                ("clip bf16 B=64", loss("clip", 64, 32, bf16)),
                ("similarity fp16 37x101", similarity(37, 101, 24, fp16)),
                ("similarity top-5 fp16 37x101", similarity(37, 101, 24, fp16, topk=5)),
                ("similarity top-5 fp16 37x101 forward+backward", similarity(37, 101, 24, fp16, topk=5, backward=True))]
    return [
        ("attention bf16 Perceiver forward", attention(8, 8, 64, 256, 64, 64, bf16, False)),
        ("attention bf16 Perceiver forward+backward", attention(8, 8, 64, 256, 64, 64, bf16, True)),
        ("attention bf16 SAM token->image forward", attention(16, 8, 7, 4096, 0, 16, bf16, False)),
        ("attention bf16 SAM token->image forward+backward", attention(16, 8, 7, 4096, 0, 16, bf16, True)),
        ("clip bf16 B=16384 D=768 forward+backward", loss("clip", 16384, 768, bf16)),
        ("siglip bf16 B=16384 D=768 forward+backward", loss("siglip", 16384, 768, bf16)),
        ("similarity fp16 N=4096 C=21843 D=768 forward", similarity(4096, 21843, 768, fp16)),
        ("similarity top-5 fp16 N=4096 C=21843 D=768 forward", similarity(4096, 21843, 768, fp16, topk=5)),
        ("similarity top-5 fp16 N=4096 C=21843 D=768 forward+backward",
         similarity(4096, 21843, 768, fp16, topk=5, backward=True)),
    ]


def child(setting: str, device: str, reps: int, small: bool, out_path: str):
    """Times every case under this process's setting; saves {name: ms} as JSON and the outputs next to it."""
    results, outputs = {}, {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for name, make in cases(small):
        fn = make(device)
        got = fn()  # warm-up (and Triton/cuBLAS setup)
        sync()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        results[name] = statistics.median(times)
        outputs[name] = [t.detach().float().cpu() for t in got]
        print(f"[MMFAST_CUDA_TENSOR_CORES={setting}] {name}: {results[name]:.3f} ms", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f)
    torch.save(outputs, out_path + ".pt")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", default=None, help="also write the table here")
    p.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        return child(a.child, a.device, a.reps, a.small, a.child_out)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("0", "1"):
            path = os.path.join(tmp, f"setting{setting}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", setting, "--child-out", path,
                   "--device", a.device, "--reps", str(a.reps)] + (["--small"] if a.small else [])
            subprocess.run(cmd, env=dict(os.environ, MMFAST_CUDA_TENSOR_CORES=setting), check=True)
            with open(path) as f:
                runs[setting] = (json.load(f), torch.load(path + ".pt"))
    lines = ["| case | CUDA cores ms | tensor cores ms | ratio | max diff / max |", "|---|---|---|---|---|"]
    for name in runs["0"][0]:
        off, on = runs["0"][0][name], runs["1"][0][name]
        diff = max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
                   for x, y in zip(runs["0"][1][name], runs["1"][1][name]))
        lines.append(f"| {name} | {off:.3f} | {on:.3f} | {off / on:.2f}x | {diff:.2e} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
