"""Benchmark cases for mmfast.clip_loss and mmfast.siglip_loss (open_clip's single-process losses).

The targets of the issue, on the 2-core CPU, fp32, forward+backward against open_clip's formula (the
reference) in the same run: CLIP at B=8192, D=768 at least 1.6x faster (open_clip computes both B x B
logit matrices: 6 B x B x D GEMMs where the fused loss needs 4, so the floor is ~1.85x); SigLIP at
B=4096, D=512 at least 1.7x faster (loss and gradients from one pass of 3 GEMMs). Floor: the bare GEMM
image @ text.T (its backward is the two gradient GEMMs). Peak memory is the point too: the fused
losses keep no B x B buffer.
"""
import torch

import mmfast
from mmfast.bench import Case, Target, register
from mmfast.ops.contrastive_loss import IMPLEMENTATIONS
from mmfast.reference import contrastive_loss as ref

SCALE = 100.0  # open_clip's exp(logit_scale) at the end of training (its clamp)


def _gemm(image, text):
    return image @ text.T


def _case(op: str, dtype: torch.dtype, batch: int, dim: int, targets=(), quick=True) -> Case:
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def make_inputs(device):
        gen = torch.Generator().manual_seed(batch * 7 + dim)
        image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
        text = torch.nn.functional.normalize(image + 0.5 * torch.randn(batch, dim, generator=gen), dim=-1)
        return {"image": image.to(device=device, dtype=dtype), "text": text.to(device=device, dtype=dtype)}

    if op == "clip_loss":
        def reference(image, text):
            return ref.clip_loss(image, text, SCALE)

        def fused(image, text, backend):
            return mmfast.clip_loss(image, text, SCALE, backend=backend)
    else:
        def reference(image, text):
            return ref.siglip_loss(image, text, 10.0, -10.0)  # SigLIP's init: t' = 10, b = -10

        def fused(image, text, backend):
            return mmfast.siglip_loss(image, text, 10.0, -10.0, backend=backend)

    return Case(op=op, label=f"{short} B={batch} D={dim}", dtype=dtype, x_name="B", x_value=batch,
                params={"B": batch, "D": dim}, make_inputs=make_inputs, reference=reference, mmfast=fused,
                backends=IMPLEMENTATIONS, grad_inputs=("image", "text"), floors={"gemm": _gemm},
                targets=tuple(targets), quick=quick)


@register("clip_loss")
def clip_cases(device: str, quick: bool) -> list[Case]:
    faster = Target(">= 1.6x faster than open_clip's formula", "eager", 1.6, ("full",))
    return [_case("clip_loss", torch.float32, 8192, 768, targets=[faster]),
            _case("clip_loss", torch.bfloat16, 8192, 768, quick=False),
            _case("clip_loss", torch.float32, 4096, 768, quick=False)]


@register("siglip_loss")
def siglip_cases(device: str, quick: bool) -> list[Case]:
    faster = Target(">= 1.7x faster than open_clip's formula", "eager", 1.7, ("full",))
    return [_case("siglip_loss", torch.float32, 4096, 512, targets=[faster]),
            _case("siglip_loss", torch.bfloat16, 4096, 512, quick=False)]
