"""How much of LLaVA-1.5's projector time bias + GELU take, and whether fusing them gains anything (issue 16).

Standalone (the leading underscore keeps the bench registry from importing it):
    python benchmarks/_llava_projector_timing.py [--batch 16] [--reps 5] [--modes forward,full] [--device cuda]
Candidates run interleaved (one call of each per round, the order rotated each round: the first call of a round
measured slower); medians over rounds, ratios to upstream from one run.
x has no gradient in "full" (LLaVA trains the projector on a frozen CLIP tower): 3 backward GEMMs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

gelu_ = torch.ops.aten.gelu_


def candidates(x, w1, b1, w2, b2, mode):
    x2 = x.reshape(-1, x.shape[-1])

    def upstream():  # LLaVA's Sequential / transformers' projector, op for op
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    def gemms():  # the two GEMMs alone: no bias, no GELU
        return torch.mm(torch.mm(x2, w1.t()), w2.t())

    def gemms_bias():  # bias in the GEMMs (addmm), no GELU: upstream minus GELU
        return torch.addmm(b2, torch.addmm(b1, x2, w1.t()), w2.t())

    def addmm_activation():  # torch._addmm_activation (on the CPU: addmm, then gelu_ over its output)
        return torch.addmm(b2, torch._addmm_activation(b1, x2, w1.t(), use_gelu=True), w2.t())

    def inplace():  # addmm + one in-place GELU pass (no second buffer)
        return torch.addmm(b2, gelu_(torch.addmm(b1, x2, w1.t())), w2.t())

    out = {"upstream": upstream, "gemms": gemms, "gemms+bias": gemms_bias}
    if mode == "forward":
        out.update({"_addmm_activation": addmm_activation, "addmm+gelu_": inplace})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--modes", default="forward,full")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    dev = torch.device(a.device)
    torch.set_default_device(dev)

    def sync():  # a CUDA call's time includes its queued kernels
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    torch.manual_seed(0)
    n, d_in, d = a.batch * 576, 1024, 4096
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"[{a.batch}, 576, {d_in} -> {d} -> {d}], torch {torch.__version__}, {where}")
    for dtype in [getattr(torch, s) for s in a.dtypes.split(",")]:
        x = torch.randn(a.batch, 576, d_in, dtype=dtype)
        w1 = (torch.randn(d, d_in) / d_in ** 0.5).to(dtype).requires_grad_()
        b1 = torch.zeros(d, dtype=dtype).requires_grad_()
        w2 = (torch.randn(d, d) / d ** 0.5).to(dtype).requires_grad_()
        b2 = torch.zeros(d, dtype=dtype).requires_grad_()
        h = torch.randn(n, d, dtype=dtype)
        for mode in a.modes.split(","):
            fns = candidates(x, w1, b1, w2, b2, mode)
            times = {k: [] for k in fns}
            times["gelu alone"] = []
            names = list(fns)
            for rep in range(a.reps):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    fn = fns[name]
                    sync()
                    t0 = time.perf_counter()
                    if mode == "forward":
                        with torch.no_grad():
                            fn()
                    else:
                        out = fn()
                        out.backward(torch.ones_like(out))
                    sync()
                    times[name].append(time.perf_counter() - t0)
                    for t in (w1, b1, w2, b2):
                        t.grad = None
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    F.gelu(h)
                sync()
                times["gelu alone"].append(time.perf_counter() - t0)
            ref = statistics.median(times["upstream"])
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"{str(dtype)[6:]:9s} {mode:8s} {name:18s} median {med * 1e3:9.1f} ms  "
                      f"min {min(ts) * 1e3:9.1f} ms  {med / ref:6.3f} of upstream", flush=True)


if __name__ == "__main__":
    main()
