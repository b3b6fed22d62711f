"""Benchmark case for OWLv2's class-prediction head (mmfast.nn.OwlClassHead, issue 16).

owl_class_head: OWLv2 base at 960 px (60 x 60 = 3600 patches, vision hidden 768, text hidden 512) scoring LVIS's
1203 class queries, batch 8, forward (detection is inference), the query mask all ones as the detector passes it
when every query is real: upstream's head (transformers 5.25.0's Owlv2ClassPredictionHead, mirrored by
mmfast.reference.owl) against the drop-in, both through torch.func.functional_call with the same parameter
tensors. Floor "gemm": the two GEMMs any implementation runs (dense0 over the patches, patches x queries).
Target (issue 16): >= 1.5x upstream on the CPU in fp32.
"""
import torch
from torch.func import functional_call

from mmfast.bench import Case, Target, register
from mmfast.nn.owl import OwlClassHead
from mmfast.reference import owl as ref

VISION, TEXT = 768, 512  # OWLv2 base (google/owlv2-base-patch16-ensemble)
BATCH, PATCHES, QUERIES = 8, 3600, 1203  # 960 px / 16 px patches; LVIS


def _modules():
    """(reference, mmfast) heads on the meta device: structure only, the parameters come from the inputs."""
    with torch.device("meta"):
        config = ref.owl_config(VISION, TEXT)
        return ref.OwlClassPredictionHead(config), OwlClassHead(config)


def _gemm_floor(image_embeds, query_embeds, query_mask, **params):
    patches = torch.nn.functional.linear(image_embeds, params["dense0.weight"])
    return torch.matmul(patches, query_embeds.transpose(-1, -2))


def _case(dtype: torch.dtype, targets=(), quick=True) -> Case:
    model_ref, model = _modules()
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    def make_inputs(device):
        gen = torch.Generator().manual_seed(960)
        with torch.random.fork_rng(devices=[]):  # upstream's init, without moving the global RNG
            torch.manual_seed(960)
            params = {k: v.detach() for k, v in ref.OwlClassPredictionHead(ref.owl_config(VISION, TEXT)).state_dict().items()}
        inputs = {"image_embeds": torch.randn(BATCH, PATCHES, VISION, generator=gen),
                  "query_embeds": torch.randn(BATCH, QUERIES, TEXT, generator=gen)}
        inputs.update(params)
        inputs = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
        inputs["query_mask"] = torch.ones(BATCH, QUERIES, dtype=torch.bool, device=device)
        return inputs

    def reference(image_embeds, query_embeds, query_mask, **params):
        return functional_call(model_ref, params, (image_embeds, query_embeds, query_mask))

    def fast(image_embeds, query_embeds, query_mask, backend, **params):
        return functional_call(model, params, (image_embeds, query_embeds, query_mask))

    return Case(op="owl_class_head", label=f"{short} B={BATCH} P={PATCHES} Q={QUERIES}", dtype=dtype, x_name="Q",
                x_value=QUERIES, params={"B": BATCH, "P": PATCHES, "Q": QUERIES, "vision": VISION, "text": TEXT},
                make_inputs=make_inputs, reference=reference, mmfast=fast, backends=("reference",),
                floors={"gemm": _gemm_floor}, modes=("forward",), targets=tuple(targets), quick=quick, module=True)


@register("owl_class_head")
def owl_cases(device: str, quick: bool) -> list[Case]:
    faster = [Target(">= 1.5x faster than upstream", "eager", 1.5, ("forward",))]
    return [_case(torch.float32, faster), _case(torch.bfloat16, quick=device == "cuda")]
