"""Benchmark cases for mmfast.similarity_softmax: CLIP zero-shot classification.

softmax(100 * normalize(image) @ normalize(text).T) with ViT-L/14 features (D=768): a batch of
4096 images against ImageNet-1k's 1000 class prompts, and 256 images against ImageNet-21k's
21843 classes, where the N x C matrix (and its softmax passes) dominates; the top-k mode of the
21k case never builds that matrix. Floor: the bare GEMM image @ text.T on the same shapes.
Read it with care on CUDA when C is not a multiple of 8: at fp16 N=4096 C=21843 the cuBLAS GEMM
took 1.47 ms on an H200 (93 TFLOP/s; an 8192^3 fp16 GEMM runs at 759) while
torch.compile(reference) ran the whole op in 0.54 ms (measured; likely cause, not verified:
rows of 21843 halves are not 16-byte aligned, which cuBLAS's fast paths need).
Targets: those of the issue, declared with each case below.
"""
import torch

import mmfast
from mmfast.bench import MODES, Case, Target, register
from mmfast.ops.similarity_softmax import IMPLEMENTATIONS
from mmfast.reference import similarity_softmax as ref

D = 768  # ViT-L/14 embedding width
SCALE = 100.0  # CLIP's exp(logit_scale)
NOT_SLOWER_THAN_COMPILE = Target("not slower than torch.compile(reference)", "compile", 1.0, MODES)


def _gemm(image, text):
    return image @ text.T


def _case(dtype: torch.dtype, n: int, c: int, *, topk: int | None = None, targets=(), quick=True) -> Case:
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    label = f"{short} N={n} C={c} D={D}" + (f" top-{topk}" if topk else "")

    def make_inputs(device):
        gen = torch.Generator().manual_seed(n * 100_003 + c)  # the same features on every device
        image = torch.randn(n, D, generator=gen).to(device=device, dtype=dtype)
        text = torch.randn(c, D, generator=gen).to(device=device, dtype=dtype)
        return {"image": image, "text": text}

    if topk is None:
        def reference(image, text):
            return ref.similarity_softmax(image, text, SCALE)

        def fused(image, text, backend):
            return mmfast.similarity_softmax(image, text, SCALE, backend=backend)
    else:
        def reference(image, text):  # eager softmax + topk over the full N x C matrix
            return ref.similarity_topk(image, text, SCALE, k=topk)

        def fused(image, text, backend):
            return mmfast.similarity_softmax(image, text, SCALE, topk=topk, backend=backend)

    return Case(op="similarity_softmax", label=label, dtype=dtype, x_name="C", x_value=c,
                # the top-k mode is ranked apart in the dispatch table (mmfast/tuning): other kernels win there
                params={"N": n, "C": c, "D": D, "topk": topk, "scale": SCALE} | ({"dispatch": "topk"} if topk else {}),
                make_inputs=make_inputs, reference=reference, mmfast=fused, backends=IMPLEMENTATIONS,
                grad_inputs=("image", "text"), floors={"gemm": _gemm},
                targets=tuple(targets) + (NOT_SLOWER_THAN_COMPILE,), quick=quick)


@register("similarity_softmax")
def cases(device: str, quick: bool) -> list[Case]:
    near_gemm = Target("within 1.1x of the GEMM", "floor-gemm", 1 / 1.1)
    beats_eager = Target(">= 1.1x faster than eager", "eager", 1.1)
    found = [
        _case(torch.float32, 4096, 1000, targets=[near_gemm]),
        _case(torch.float32, 256, 21843, targets=[beats_eager]),
        _case(torch.bfloat16, 4096, 1000, targets=[near_gemm], quick=device == "cuda"),
        _case(torch.bfloat16, 256, 21843, targets=[beats_eager]),
        _case(torch.float32, 256, 21843, topk=5, targets=[Target("faster than eager softmax+topk", "eager", 1.0)]),
    ]
    if device == "cuda":
        found.append(_case(torch.float16, 4096, 21843, targets=[Target(">= 2x faster than eager", "eager", 2.0)]))
    return found
