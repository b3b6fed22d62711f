"""GPU check of the CUDA similarity_softmax kernels (run on the device after `make build`).

  python gpu_check_similarity.py            # correctness on odd shapes + timing at the target size
Exit code 1 on any failure. Correctness: error vs the fp64 reference <= 2x the error of the
reference run in the input dtype, floored at 1e-5 (fp32, TF32 off) or 4 eps (fp16/bf16).
CHECK_DEVICE=cpu CHECK_BACKEND=cpu runs the same checks on the CPU kernels (small shapes).
"""
import os
import sys

import torch

import mmfast
from mmfast.reference import similarity_softmax as R

torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
dev = os.environ.get("CHECK_DEVICE", "cuda")
BACKEND = os.environ.get("CHECK_BACKEND", "cuda")
fails = []


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(name, out, ref64, ref_lp, dtype=None):
    """dtype: the inputs' dtype (grad_scale / grad_bias are fp32 whatever it is). Where the exact
    answer is ~0 (C=1 softmax, D=1 normalize, saturated rows) the check is absolute."""
    dtype = dtype or out.dtype
    if ref64.double().norm() <= 1e-4:
        err, lim = (out.double() - ref64.double()).abs().max().item(), (1e-5 if dtype == torch.float32 else 1e-2)
    else:  # 2x the same-precision reference's error (cancellation in p * (g - r) hits fp32 too)
        floor = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        err, lim = rel(out, ref64), max(2 * rel(ref_lp, ref64), floor)
    ok = err <= lim and bool(torch.isfinite(out).all()) == bool(torch.isfinite(ref64).all())
    if not ok:
        fails.append(f"{name}: err {err:.3e} > {lim:.3e}")
        print("FAIL", fails[-1])


def leaf(t):
    return t.detach().clone().requires_grad_(True)


SHAPES = [(1, 1, 1), (1, 3, 5), (5, 37, 7), (33, 1001, 65), (7, 21843, 768), (3, 5000, 33)]
if dev == "cpu":
    SHAPES = SHAPES[:3]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for (n, c, d) in SHAPES:
        for act in ("softmax", "sigmoid", None):
            for normalize in (True, False):
                img = torch.randn(n, d, device=dev, dtype=dtype)
                txt = torch.randn(c, d, device=dev, dtype=dtype)
                if n > 2 and dtype == torch.float32:  # fp16's F.normalize turns a zero row into NaN (eps
                    img[1] = 0                         # underflows), so the zero row is an fp32 case
                scale = torch.tensor(4.0 if normalize else 0.5, device=dev, requires_grad=True)
                bias = torch.tensor(-1.0, device=dev, requires_grad=True) if act == "sigmoid" else None
                tag = f"{dtype} N={n} C={c} D={d} act={act} norm={normalize}"
                ins = [leaf(img), leaf(txt), leaf(scale)] + ([leaf(bias)] if bias is not None else [])
                out = mmfast.similarity_softmax(ins[0], ins[1], ins[2], ins[3] if bias is not None else None,
                                                normalize=normalize, activation=act, backend=BACKEND)
                g = torch.randn_like(out)
                grads = torch.autograd.grad(out, ins, g)
                ref = {}
                for prec in (torch.float64, dtype):
                    ri = [leaf(t.to(prec) if t.dim() else t.double() if prec == torch.float64 else t) for t in ins]
                    ro = R.similarity_softmax(ri[0], ri[1], ri[2], ri[3] if bias is not None else None, normalize,
                                              act or "none")
                    ref[prec] = (ro, torch.autograd.grad(ro, ri, g.to(ro.dtype)))
                check(tag + " out", out, ref[torch.float64][0], ref[dtype][0])
                for i, nm in enumerate(["grad_image", "grad_text", "grad_scale", "grad_bias"][:len(ins)]):
                    check(f"{tag} {nm}", grads[i], ref[torch.float64][1][i], ref[dtype][1][i], dtype)
                # top-k: values vs the reference's values at the reference's indices
                k = min(c, 5 if c < 1000 else 128)
                vals, idx = mmfast.similarity_softmax(ins[0], ins[1], ins[2], ins[3] if bias is not None else None,
                                                      normalize=normalize, activation=act, topk=k, backend=BACKEND)
                rv, ri_ = ref[torch.float64][0].topk(k, dim=-1)
                check(tag + f" topk{k} values", vals, rv, ref[dtype][0].topk(k, dim=-1)[0])
                # indices must point at entries whose reference value equals the returned rank's value
                gathered = ref[torch.float64][0].gather(1, idx)
                check(tag + f" topk{k} gathered", gathered.to(dtype), rv, ref[dtype][0].topk(k, dim=-1)[0])
                gv = torch.randn_like(vals)
                tgrads = torch.autograd.grad(vals, ins, gv)
                ri = [leaf(t.double()) for t in ins]
                ro = R.similarity_softmax(ri[0], ri[1], ri[2], ri[3] if bias is not None else None, normalize,
                                          act or "none").gather(1, idx)
                rgr = torch.autograd.grad(ro, ri, gv.double())
                rl = [leaf(t) for t in ins]
                rlo = R.similarity_softmax(rl[0], rl[1], rl[2], rl[3] if bias is not None else None, normalize,
                                           act or "none").gather(1, idx)
                rgl = torch.autograd.grad(rlo, rl, gv.to(rlo.dtype))
                for i, nm in enumerate(["grad_image", "grad_text", "grad_scale", "grad_bias"][:len(ins)]):
                    check(f"{tag} topk grad {nm}", tgrads[i], rgr[i], rgl[i], dtype)
if dev == "cpu":
    print("FAILURES:", len(fails)); sys.exit(1 if fails else 0)
torch.cuda.synchronize()

# Timing at the target: N=4096, C=21843, D=768 fp16 (brief: 2x faster than eager).
from triton.testing import do_bench  # noqa: E402

img = torch.randn(4096, 768, device=dev, dtype=torch.float16)
txt = torch.randn(21843, 768, device=dev, dtype=torch.float16)
scale = torch.tensor(100.0, device=dev)
eager = do_bench(lambda: R.similarity_softmax(img, txt, scale, None, True, "softmax"))
fused = do_bench(lambda: torch.ops.mmfast.similarity_softmax(img, txt, scale, None, True, "softmax"))
gemm = do_bench(lambda: img @ txt.T)
print(f"fwd fp16 4096x21843x768: eager {eager:.3f} ms  cuda {fused:.3f} ms  ({eager / fused:.2f}x)  bare GEMM {gemm:.3f} ms")
print("row cache bytes:", os.environ.get("MMFAST_ROW_CACHE_BYTES", "default 96K"))
print("FAILURES:", len(fails))
sys.exit(1 if fails else 0)
