"""Benchmark cases for mmfast.cross_attention, the attention core of the Perceiver Resampler and of SAM,
alone against F.scaled_dot_product_attention on the same shapes.

The Perceiver shape (B=8, H=8, Lq=64, 256 media keys + 64 latent keys, d=64): SDPA needs the keys and
values concatenated (the torch.cat is timed as part of it, as upstream does it), mmfast takes the latents
as its second segment k2/v2. SAM's token->image shape (B=16 prompts, H=8, Lq=7, Lk=4096, d=16), on the
GPU also in fp16/bf16 (issue: token-to-image attention vs SDPA). Inputs are laid out as the modules
produce them ([B, L, H, d] projections viewed as [B, H, L, d]).
"""
import torch
import torch.nn.functional as F

import mmfast
from mmfast.bench import Case, register
from mmfast.ops.cross_attention import IMPLEMENTATIONS

SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _heads_view(x: torch.Tensor) -> torch.Tensor:
    """[B, L, H, d] -> [B, H, L, d] view: how a projection's output reaches the core."""
    return x.transpose(1, 2)


def _attention_case(name: str, dtype: torch.dtype, b: int, h: int, lq: int, lk: int, lk2: int, d: int,
                    quick=True) -> Case:
    scale = d ** -0.5

    def make_inputs(device):
        gen = torch.Generator().manual_seed(b * 1000 + lk)
        shapes = {"q": lq, "k": lk, "v": lk} | ({"k2": lk2, "v2": lk2} if lk2 else {})
        return {n: _heads_view(torch.randn(b, L, h, d, generator=gen)).to(device=device, dtype=dtype)
                for n, L in shapes.items()}

    if lk2:
        def reference(q, k, v, k2, v2):  # what upstream does: concatenate, then attend
            return F.scaled_dot_product_attention(q, torch.cat((k, k2), dim=-2), torch.cat((v, v2), dim=-2), scale=scale)

        def fast(q, k, v, k2, v2, backend):
            return mmfast.cross_attention(q, k, v, k2=k2, v2=v2, scale=scale, backend=backend)
    else:
        def reference(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        def fast(q, k, v, backend):
            return mmfast.cross_attention(q, k, v, scale=scale, backend=backend)

    keys = f"Lk={lk}+{lk2}" if lk2 else f"Lk={lk}"
    return Case(op="cross_attention", label=f"{SHORT[dtype]} {name} B={b} H={h} Lq={lq} {keys} d={d}", dtype=dtype,
                x_name="Lk", x_value=lk + lk2, params={"B": b, "H": h, "Lq": lq, "Lk": lk, "Lk2": lk2, "d": d},
                make_inputs=make_inputs, reference=reference, mmfast=fast, backends=IMPLEMENTATIONS,
                grad_inputs=("q", "k", "v") + (("k2", "v2") if lk2 else ()), modes=("forward", "full"), quick=quick)


@register("cross_attention")
def attention_cases(device: str, quick: bool) -> list[Case]:
    gpu = device == "cuda"
    return [_attention_case("perceiver", torch.float32, 8, 8, 64, 256, 64, 64),
            _attention_case("sam-t2i", torch.float32, 16, 8, 7, 4096, 0, 16),
            _attention_case("perceiver", torch.bfloat16, 8, 8, 64, 256, 64, 64, quick=gpu),
            _attention_case("sam-t2i", torch.bfloat16, 16, 8, 7, 4096, 0, 16, quick=gpu),
            _attention_case("sam-t2i", torch.float16, 16, 8, 7, 4096, 0, 16, quick=gpu)]
