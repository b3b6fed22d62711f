"""Benchmark cases for SAM's mask-decoder two-way transformer (mmfast.nn.TwoWayTransformer on
mmfast.sam_attention) against segment-anything's module math (mmfast.reference.sam_attention).

TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048) as in SAM's mask decoder, on a
64x64 image embedding with Nq=7 tokens (one point prompt + SAM's 5 output tokens + padding point), forward
(inference: SamPredictor / the automatic mask generator). B=16 prompts on one image: the image is
repeat_interleaved as SAM's MaskDecoder does, so mmfast's shared-image path applies. Targets on the 2-core
CPU, fp32, against the reference in the same run: B=16 at least 2x faster (upstream ~1.25 s here), B=1 at
least 1.3x (~42 ms). Both modules are called through torch.func.functional_call with the same parameter
tensors (equal state_dict keys), so the float64 oracle runs with float64 weights.
Module cases (Case.module): on CUDA also timed as CUDA-graph replays, eager-graph against mmfast-graph
(launch overhead apart from kernel time), and the default cases of `python -m mmfast bench --profile`.
"""
import torch
from torch.func import functional_call

import mmfast
from mmfast.bench import Case, Target, register
from mmfast.nn import sam_attention as fused
from mmfast.ops.cross_attention import IMPLEMENTATIONS
from mmfast.reference import sam_attention as ref

SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CONFIG = dict(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048)  # SAM's mask decoder transformer
GRID = 64  # 1024px input / 16 patch size
TOKENS = 7


def _case(dtype: torch.dtype, prompts: int, targets=(), quick=True) -> Case:
    with torch.device("meta"):
        model_ref, model = ref.TwoWayTransformer(**CONFIG), fused.TwoWayTransformer(**CONFIG)
    if list(model_ref.state_dict()) != list(model.state_dict()):
        raise RuntimeError("mmfast bench: mmfast.nn.TwoWayTransformer's state_dict keys differ from upstream's")
    dim = CONFIG["embedding_dim"]

    def make_inputs(device):
        gen = torch.Generator().manual_seed(prompts)
        with torch.random.fork_rng(devices=[]):  # upstream's init, without moving the global RNG
            torch.manual_seed(0)
            params = {k: v.detach() for k, v in ref.TwoWayTransformer(**CONFIG).state_dict().items()}
        for k in params:  # trained-like LayerNorms and biases (init is 1/0): a dropped term shows
            if k.endswith("bias") or ".norm" in k or k.startswith("norm"):
                params[k] = params[k] + 0.1 * torch.randn(params[k].shape, generator=gen)
        image = torch.randn(1, dim, GRID, GRID, generator=gen).repeat_interleave(prompts, 0)  # as MaskDecoder
        pe = torch.randn(1, dim, GRID, GRID, generator=gen).repeat_interleave(prompts, 0)
        inputs = {"image_embedding": image, "image_pe": pe,
                  "point_embedding": torch.randn(prompts, TOKENS, dim, generator=gen), **params}
        return {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}

    def reference(image_embedding, image_pe, point_embedding, **params):
        return functional_call(model_ref, params, (image_embedding, image_pe, point_embedding))

    def fast(image_embedding, image_pe, point_embedding, backend, **params):
        with mmfast.use_backend(backend):
            return functional_call(model, params, (image_embedding, image_pe, point_embedding))

    return Case(op="sam_attention", label=f"{SHORT[dtype]} B={prompts} one image {GRID}x{GRID} Nq={TOKENS}",
                dtype=dtype, x_name="B", x_value=prompts, params={"B": prompts, "grid": GRID, "Nq": TOKENS, **CONFIG},
                make_inputs=make_inputs, reference=reference, mmfast=fast, backends=IMPLEMENTATIONS,
                modes=("forward",), targets=tuple(targets), quick=quick, module=True)


@register("sam_attention")
def sam_cases(device: str, quick: bool) -> list[Case]:
    cpu = device == "cpu"
    many = [Target(">= 2x faster than segment-anything", "eager", 2.0)] if cpu else []
    one = [Target(">= 1.3x faster than segment-anything", "eager", 1.3)] if cpu else []
    cases = [_case(torch.float32, 16, many), _case(torch.float32, 1, one),
             _case(torch.bfloat16, 16, quick=not cpu), _case(torch.bfloat16, 1, quick=False)]
    if not cpu:  # issue 14's GPU targets: also SamAutomaticMaskGenerator's batch of 64 prompts on one image
        cases += [_case(torch.float32, 64), _case(torch.bfloat16, 64)]
    return cases
