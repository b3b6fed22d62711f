"""Block-size sweep of the Triton kernels on a GPU: for each tuned table entry (mmfast/triton/*.py `_BLOCKS`),
time a few candidate configurations at the benchmark's shape, check each against an fp32 torch computation (at
that shape and at an odd one, where every tile is ragged), and write the fastest correct one per entry.

    python benchmarks/_triton_sweep.py OUTDIR [--jobs 8] [--only NAME ...]

Standalone (the leading underscore keeps the bench registry from importing it). OUTDIR gets sweep.txt (every
candidate: ms, error, verdict) and triton_blocks.json in the format that MMFAST_TRITON_BLOCKS reads
(mmfast/triton/_utils.apply_block_overrides): point that variable at it and the tests and benchmarks of the
same process tree run on the winners; copy the winners into the `_BLOCKS` tables to keep them. The current
entry is always candidate 0 and the baseline; a winner must be at least 3% faster (MIN_GAIN) on the mean
of the timed shapes.

Two phases: compile every candidate in --jobs processes at once (Triton's on-disk cache is shared; a
compile is 1-5 s of one CPU core, the GPU barely used), then time them one process, one kernel at a time
(CUDA events, median), so that no two timings share the GPU. Not a test: nothing here fails CI; the
tests run on whatever the tables hold.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DEVICE = "cuda"  # a dry run of the script's logic may set "cpu" (TRITON_INTERPRET=1, small ENTRIES)


@dataclass
class Entry:
    """One `_BLOCKS[table][kind]` (several kinds set together) of a Triton module, and how to judge it."""
    name: str
    family: str  # the module: contrastive_loss, similarity_softmax, cross_attention
    table: str  # "fp32" or "half"
    candidates: list[dict]  # {kind: config tuple}; the first is today's entry
    # () -> list of (label, inputs builder, run(inputs) -> tensors, reference(inputs) -> tensors): the bench
    # shapes, timed and checked, then one odd shape (every tile ragged), only checked. On the H200 of 2026-12-04
    # the odd shapes' times (1-5 ms: launch-bound, noisy) outweighed the bench shapes' in the mean and picked
    # an fp32 similarity entry that was 1% faster where it matters.
    make: Callable
    tolerance: float  # relative error (norm of the difference / norm of the reference) allowed per tensor


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype).requires_grad_()


def _grads(out, inputs):
    """The output (detached) and the gradients of inputs for a fixed random cotangent (ones for a scalar)."""
    gen = torch.Generator(device=DEVICE).manual_seed(99)  # fp32 draws, then rounded: the same in every dtype
    cot = torch.ones_like(out) if out.dim() == 0 else torch.randn(out.shape, generator=gen, device=DEVICE).to(out.dtype)
    return [out.detach()] + list(torch.autograd.grad(out, inputs, cot))


def _loss_case(op, b, d, dtype, mode="full", seed=0):
    import mmfast
    from mmfast.reference import contrastive_loss as ref

    def build():
        image = _randn(b, d, dtype=dtype, seed=seed)
        text = _randn(b, d, dtype=dtype, seed=seed + 1)
        with torch.no_grad():  # unit rows, as the losses see them
            image /= image.norm(dim=1, keepdim=True)
            text /= text.norm(dim=1, keepdim=True)
        return image, text

    def run(x):
        with torch.set_grad_enabled(mode == "full"):
            out = (mmfast.clip_loss(*x, 30.0, backend="triton") if op == "clip"
                   else mmfast.siglip_loss(*x, 10.0, -10.0, backend="triton"))
        return [out] if mode == "forward" else _grads(out, list(x))

    def reference(x):
        wide = [t.detach().float().requires_grad_() for t in x]
        fn = ref.clip_loss if op == "clip" else ref.siglip_loss
        out = fn(*wide, *((30.0,) if op == "clip" else (10.0, -10.0)))
        return [out.detach()] if mode == "forward" else _grads(out, wide)

    return f"{op} {str(dtype)[6:]} B={b} D={d} {mode}", build, run, reference


def _similarity_case(n, c, d, dtype, mode="full", topk=None):
    """topk: the top-k values (whose backward runs the Triton GEMM kernels; the dense backward's GEMMs are
    cuBLAS's) instead of the N x C probabilities."""
    import mmfast
    from mmfast.reference import similarity_softmax as ref

    def build():
        return _randn(n, d, dtype=dtype, seed=2), _randn(c, d, dtype=dtype, seed=3)

    def run(x):
        out = mmfast.similarity_softmax(*x, 100.0, topk=topk, backend="triton")
        out = out if topk is None else out[0]
        return [out.detach()] if mode == "forward" else _grads(out, list(x))

    def reference(x):
        wide = [t.detach().float().requires_grad_() for t in x]
        out = ref.similarity_softmax(*wide, 100.0) if topk is None else ref.similarity_topk(*wide, 100.0, k=topk)[0]
        return [out.detach()] if mode == "forward" else _grads(out, wide)

    kind = "similarity_softmax" if topk is None else f"similarity_topk k={topk}"
    return f"{kind} {str(dtype)[6:]} N={n} C={c} D={d} {mode}", build, run, reference


def _attention_case(b, h, lq, lk, lk2, d, dtype, mode):
    import mmfast
    from mmfast.reference.perceiver import perceiver_cross_attention

    def build():
        q = _randn(b, h, lq, d, dtype=dtype, seed=4)
        k, v = _randn(b, h, lk, d, dtype=dtype, seed=5), _randn(b, h, lk, d, dtype=dtype, seed=6)
        k2, v2 = ((_randn(b, h, lk2, d, dtype=dtype, seed=7), _randn(b, h, lk2, d, dtype=dtype, seed=8))
                  if lk2 else (None, None))
        return q, k, v, k2, v2

    def leaves(x):
        return [t for t in x if t is not None]

    def run(x):
        out = mmfast.cross_attention(x[0], x[1], x[2], k2=x[3], v2=x[4], backend="triton")
        return [out.detach()] if mode == "forward" else _grads(out, leaves(x))

    def reference(x):
        wide = [None if t is None else t.detach().float().requires_grad_() for t in x]
        out = perceiver_cross_attention(*wide)
        return [out.detach()] if mode == "forward" else _grads(out, leaves(wide))

    return f"cross_attention {str(dtype)[6:]} B={b} H={h} Lq={lq} Lk={lk}+{lk2} d={d} {mode}", build, run, reference


def _attention_cases(mode):
    """The bench's Perceiver and SAM token->image shapes in bf16, then an odd fp16 shape (checked only)."""
    return [_attention_case(8, 8, 64, 256, 64, 64, BF16, mode), _attention_case(16, 8, 7, 4096, 0, 16, BF16, mode),
            _attention_case(2, 3, 70, 130, 5, 40, FP16, mode)]


def _both_losses(b, d, dtype, mode="full"):
    return [_loss_case("clip", b, d, dtype, mode), _loss_case("siglip", b, d, dtype, mode)]


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MIN_GAIN = 0.97  # a candidate replaces today's entry only if its mean relative time is at most this (noise)
ENTRIES = [
    # The losses' gradient tile kernel (one GEMM of dots per chunk; the gradient GEMMs are cuBLAS's).
    Entry("loss-backward-half", "contrastive_loss", "half",
          [{"backward": c} for c in ((128, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 64, 64, 4, 2), (128, 128, 64, 8, 3),
                                     (64, 128, 64, 4, 3), (128, 64, 64, 8, 4))],
          lambda: _both_losses(16384, 768, BF16) + [_loss_case("clip", 1000, 200, FP16)], 2e-2),
    # similarity_softmax's Triton GEMM backward kernels serve the top-k backward only (the dense one is cuBLAS's).
    Entry("similarity-backward-half", "similarity_softmax", "half",
          [{"backward": c, "backward_features": (f,)} for c, f in (
              ((64, 64, 64, 8, 2), 256), ((64, 64, 64, 4, 2), 128), ((128, 64, 64, 8, 2), 256),
              ((64, 64, 64, 8, 2), 512), ((64, 64, 32, 8, 3), 256), ((128, 128, 64, 8, 3), 256))],
          lambda: [_similarity_case(4096, 21843, 768, FP16, topk=5), _similarity_case(4096, 1000, 768, BF16, topk=5),
                   _similarity_case(37, 1001, 200, FP16, topk=5)], 2e-2),
    Entry("attention-forward-half", "cross_attention", "half",
          [{"forward": c} for c in ((128, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 3), (128, 128, 8, 3),
                                    (64, 32, 4, 2), (32, 128, 4, 2))],
          lambda: _attention_cases("forward"), 2e-2),
    Entry("attention-backward-half", "cross_attention", "half",
          [{"backward": c} for c in ((64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2),
                                     (32, 64, 4, 2), (64, 32, 4, 3))],
          lambda: _attention_cases("full"), 2e-2),
    Entry("loss-backward-fp32", "contrastive_loss", "fp32",
          [{"backward": c} for c in ((64, 64, 32, 8, 2), (64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2),
                                     (32, 64, 32, 4, 2))],
          lambda: _both_losses(8192, 768, FP32) + [_loss_case("clip", 1000, 200, FP32)], 1e-4),
    Entry("similarity-backward-fp32", "similarity_softmax", "fp32",
          [{"backward": c, "backward_features": (f,)} for c, f in (
              ((64, 64, 32, 4, 2), 128), ((64, 64, 32, 8, 2), 256), ((128, 64, 32, 8, 2), 128),
              ((64, 64, 32, 4, 2), 256), ((32, 64, 32, 4, 2), 256))],
          lambda: [_similarity_case(4096, 1000, 768, FP32, topk=5),
                   _similarity_case(37, 1001, 200, FP32, topk=5)], 1e-4),
    Entry("loss-forward-half", "contrastive_loss", "half",
          [{"forward": c} for c in ((128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4),
                                    (64, 128, 64, 4, 3), (256, 64, 64, 8, 3))],
          lambda: _both_losses(16384, 768, BF16, "forward") + [_loss_case("clip", 1000, 200, FP16, "forward")], 2e-2),
]


def _module(family):
    import importlib
    return importlib.import_module(f"mmfast.triton.{family}")


def _apply(entry: Entry, candidate: dict) -> None:
    blocks = _module(entry.family)._BLOCKS[entry.table]
    for kind, config in candidate.items():
        blocks[kind] = tuple(config)


def _rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def median_ms(fn, reps: int, budget_s: float) -> float:
    """Median of up to reps calls (CUDA events), stopping once budget_s of wall time is spent."""
    fn()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        if time.perf_counter() - start > budget_s:
            break
    return sorted(times)[len(times) // 2]


def sweep(entry: Entry, compile_only: bool, log) -> dict | None:
    """Time (or only compile) every candidate of `entry`; the winner's {kind: config} (None if compile_only)."""
    tables = _module(entry.family)._BLOCKS[entry.table]
    if any(tuple(tables[kind]) != tuple(config) for kind, config in entry.candidates[0].items()):
        raise RuntimeError(f"{entry.name}: candidate 0 must be today's table entry (the baseline); the table holds "
                           f"{ {kind: tables[kind] for kind in entry.candidates[0]} }")
    cases = entry.make()
    built = [(label, build()) for label, build, _, _ in cases]
    references = [reference(x) for (_, _, _, reference), (_, x) in zip(cases, built)]
    scores = []  # (candidate, {case label: ms}, mean of ms / today's ms, correct)
    for i, candidate in enumerate(entry.candidates):
        _apply(entry, candidate)
        times, worst, failure = {}, 0.0, None
        try:
            for n, ((label, _, run, _), (_, x), want) in enumerate(zip(cases, built, references)):
                got = run(x)
                worst = max([worst] + [_rel_err(g, w) for g, w in zip(got, want)])
                if not compile_only and n < len(cases) - 1:  # the last case, the odd shape, is only checked
                    times[label] = median_ms(lambda: run(x), reps=10, budget_s=1.5)
        except Exception as e:  # a config that does not compile or launch (shared memory, registers)
            failure = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if compile_only:
            continue
        base = scores[0][1] if scores else times  # today's entry is candidate 0
        relative = sum(ms / base.get(label, ms) for label, ms in times.items()) / max(len(times), 1)
        ok = failure is None and worst <= entry.tolerance
        scores.append((candidate, times, relative, ok))
        verdict = ("ok" if ok else failure if failure else f"REJECTED (error {worst:.1e} > {entry.tolerance:.0e})")
        cells = "; ".join(f"{label}: {ms:.3f} ms" for label, ms in times.items())
        print(f"  [{entry.name} {i}] {json.dumps({k: list(v) for k, v in candidate.items()})}: {cells}; "
              f"max error {worst:.1e} -> relative time {relative:.3f} {verdict}", file=log, flush=True)
    _apply(entry, entry.candidates[0])
    if compile_only:
        return None
    passing = [s for s in scores if s[3] and len(s[1]) == len(cases) - 1]
    if not scores[0][3]:  # today's entry failed: nothing to compare against
        return None
    best = min(passing, key=lambda s: s[2])
    return best[0] if best[2] <= MIN_GAIN else entry.candidates[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--jobs", type=int, default=8, help="compile processes (phase 1)")
    parser.add_argument("--only", nargs="*", help="entry names (default: all)")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)  # phase 1's workers
    args = parser.parse_args(argv)
    entries = [e for e in ENTRIES if not args.only or e.name in args.only]
    if not torch.cuda.is_available():
        parser.error("the sweep needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.compile_only:
        for entry in entries:
            sweep(entry, compile_only=True, log=sys.stdout)
        return 0
    start = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, __file__, str(args.out), "--compile-only", "--only", e.name],
                                env=dict(os.environ, MMFAST_TRITON_BLOCKS=""))
               for e in entries[:args.jobs]]
    rest = entries[args.jobs:]
    for w in workers:
        w.wait()
    for e in rest:
        subprocess.run([sys.executable, __file__, str(args.out), "--compile-only", "--only", e.name], check=False)
    print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)
    winners: dict = {}
    with open(args.out / "sweep.txt", "w") as log:
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton "
              f"{__import__('triton').__version__}; relative time = mean over the timed cases of ms / today's ms",
              file=log)
        for entry in entries:
            best = sweep(entry, compile_only=False, log=log)
            if best is not None and best != entry.candidates[0]:
                winners.setdefault(entry.family, {}).setdefault(entry.table, {}).update(
                    {k: list(v) for k, v in best.items()})
                # written after each entry: a sweep cut short by its time cap keeps what it decided
                (args.out / "triton_blocks.json").write_text(json.dumps(winners, indent=1) + "\n")
            print(f"{entry.name}: {'today' if best == entry.candidates[0] else best} "
                  f"({time.perf_counter() - start:.0f} s)", file=log, flush=True)
    (args.out / "triton_blocks.json").write_text(json.dumps(winners, indent=1) + "\n")
    print((args.out / "sweep.txt").read_text())
    print(f"winners: {json.dumps(winners)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
