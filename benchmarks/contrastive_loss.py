"""Benchmark cases for mmfast.clip_loss and mmfast.siglip_loss (open_clip's single-process losses).

The targets of the issue, on the 2-core CPU, fp32, forward+backward against open_clip's formula (the
reference) in the same run: CLIP at B=8192, D=768 at least 1.6x faster (open_clip computes both B x B
logit matrices: 6 B x B x D GEMMs where the fused loss needs 4, so the floor is ~1.85x); SigLIP at
B=4096, D=512 at least 1.7x faster (loss and gradients from one pass of 3 GEMMs). Floor: the bare GEMM
image @ text.T (its backward is the two gradient GEMMs). Peak memory is the point too: the fused
losses keep no B x B buffer.

The scaling sweep (issue 3 item 8): series "sweep fp32 D=128", fp32 forward+backward at B = 1k .. 64k
(not in --quick), plotted as time and peak memory vs B (results/<device>/<op>-sweep-fp32-D-128.png):

    python -m mmfast bench --op clip_loss --op siglip_loss --cases sweep

D=128 keeps the FLOPs affordable on 2 cores (mmfast's CLIP loss at B=64k: 4 GEMMs of 64k x 64k x 128,
~4.4 TFLOP). open_clip's formula holds ~6 (CLIP) / ~10 (SigLIP) B x B buffers at its peak (measured at
B=1-2k: 5.1-6.1 and 8.5-9.5), 16 GB each at B=64k in fp32, so above the runner's memory limit eager and
compile are skipped and the float64 oracle is replaced by mmfast's own CPU block operators run in float64
(O(B*D) memory; tests/test_contrastive_loss.py checks them against the reference, gradcheck included,
and tests/test_bench.py checks these two oracles against the float64 reference at a small B). The sweep
has no GEMM floor: image @ text.T is itself a B x B buffer.
"""
import torch

import mmfast
from mmfast.bench import MODES, Case, Target, register
from mmfast.ops._checks import scalar_tensor
from mmfast.ops.contrastive_loss import IMPLEMENTATIONS
from mmfast.reference import contrastive_loss as ref

SCALE = 100.0  # open_clip's exp(logit_scale) at the end of training (its clamp)
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's init: t' = 10, b = -10
REFERENCE_BUFFERS = {"clip_loss": 6, "siglip_loss": 10}  # B x B buffers at the reference's fwd+bwd peak
SWEEP_B = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
SWEEP_D = 128
ORACLE_LABEL = "mmfast's CPU block operator in float64"


def _gemm(image, text):
    return image @ text.T


# The substitute oracles: mmfast.clip_loss / siglip_loss's own formulas on the CPU block operators, which
# run float64 (the public functions send float64 to the reference backend, which would not fit).
def _clip_cpu64(image, text):
    row_lse, col_lse, pos = torch.ops.mmfast.clip_loss_block(image, text, scalar_tensor("logit_scale", SCALE, image),
                                                             None, 0)
    return ((row_lse - pos).sum() + (col_lse - pos).sum()) / (2 * image.shape[0])


def _siglip_cpu64(image, text):
    compute_grad = torch.is_grad_enabled() and (image.requires_grad or text.requires_grad)
    loss_sum = torch.ops.mmfast.siglip_loss_block(image, text, scalar_tensor("logit_scale", SIGLIP_SCALE, image),
                                                  scalar_tensor("logit_bias", SIGLIP_BIAS, image), True,
                                                  compute_grad)[0]
    return loss_sum / image.shape[0]


SUBSTITUTE_ORACLES = {"clip_loss": _clip_cpu64, "siglip_loss": _siglip_cpu64}

# The GPU case of issue 3 (B=65536, D=768, bf16): the float64 reference would need ~200 GB and the CPU
# operators in float64 minutes, so its oracle is open_clip's CLIP loss in float64 on the GPU, column chunk
# by column chunk (a [B, 2048] float64 chunk: 1 GB), with a hand-written backward that recomputes the chunks.
GPU_B, GPU_D, GPU_CHUNK = 65536, 768, 2048
GPU_ORACLE_LABEL = "open_clip's CLIP loss in float64 on the GPU, in column chunks"


class _ChunkedClipLoss64(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text):
        b = image.shape[0]
        row_lse = torch.full((b,), -torch.inf, dtype=torch.float64, device=image.device)
        col_lse = torch.empty(b, dtype=torch.float64, device=image.device)
        for c0 in range(0, b, GPU_CHUNK):
            logits = SCALE * image @ text[c0:c0 + GPU_CHUNK].T
            row_lse = torch.logaddexp(row_lse, logits.logsumexp(1))
            col_lse[c0:c0 + GPU_CHUNK] = logits.logsumexp(0)
        pos = SCALE * (image * text).sum(1)
        ctx.save_for_backward(image, text, row_lse, col_lse)
        return ((row_lse - pos).sum() + (col_lse - pos).sum()) / (2 * b)

    @staticmethod
    def backward(ctx, grad):
        image, text, row_lse, col_lse = ctx.saved_tensors
        b = image.shape[0]
        g_image, g_text = torch.zeros_like(image), torch.empty_like(text)
        for c0 in range(0, b, GPU_CHUNK):
            cols = text[c0:c0 + GPU_CHUNK]
            logits = SCALE * image @ cols.T
            d_logits = (logits - row_lse[:, None]).exp() + (logits - col_lse[None, c0:c0 + GPU_CHUNK]).exp()
            idx = torch.arange(c0, c0 + cols.shape[0], device=image.device)
            d_logits[idx, idx - c0] -= 2  # the positive pair in both directions
            d_logits *= grad * SCALE / (2 * b)
            g_image += d_logits @ cols
            g_text[c0:c0 + GPU_CHUNK] = d_logits.T @ image
        return g_image, g_text


def _clip_gpu64(image, text):
    return _ChunkedClipLoss64.apply(image, text)


def _inf_cl(device: str) -> dict:
    """Inf-CL (pip inf-cl 1.2.1, github DAMO-NLP-SG/Inf-CLIP) as provider "inf-cl" where it imports (CUDA only).
    Its cal_flash_loss is one direction (per-row image->text cross entropy, labels arange(B)), so the provider
    calls it twice, image->text and text->image, and averages the means: open_clip's symmetric loss. It casts
    the features to fp32 inside (its forward and backward run in fp32 whatever the input dtype) and views D as
    heads of 256 features (D % 256 == 0; smaller D as one head)."""
    if device != "cuda":
        return {}
    try:
        from inf_cl import cal_flash_loss
    except ImportError:
        return {}

    def inf_cl(image, text):
        head_dim = 256 if image.shape[1] % 256 == 0 else image.shape[1]
        i2t = cal_flash_loss(image, text, scale=SCALE, head_dim=head_dim).mean()
        t2i = cal_flash_loss(text, image, scale=SCALE, head_dim=head_dim).mean()
        return ((i2t + t2i) / 2).to(image.dtype)

    return {"inf-cl": inf_cl}


def _case(op: str, dtype: torch.dtype, batch: int, dim: int, targets=(), quick=True, series=None) -> Case:
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
            return ref.siglip_loss(image, text, SIGLIP_SCALE, SIGLIP_BIAS)

        def fused(image, text, backend):
            return mmfast.siglip_loss(image, text, SIGLIP_SCALE, SIGLIP_BIAS, backend=backend)

    def reference_bytes(ref_dtype):
        return REFERENCE_BUFFERS[op] * batch * batch * ref_dtype.itemsize

    sweep = series is not None
    return Case(op=op, label=f"{'sweep ' if sweep else ''}{short} B={batch} D={dim}", dtype=dtype, x_name="B",
                x_value=batch, params={"B": batch, "D": dim}, make_inputs=make_inputs, reference=reference,
                mmfast=fused, backends=IMPLEMENTATIONS, grad_inputs=("image", "text"),
                floors={} if sweep else {"gemm": _gemm}, modes=("full",) if sweep else MODES,
                targets=tuple(targets), quick=quick, series=series, reference_bytes=reference_bytes,
                substitute_oracle=SUBSTITUTE_ORACLES[op], substitute_label=ORACLE_LABEL)


def sweep_cases(op: str) -> list[Case]:
    """The scaling sweep: fp32 forward+backward at B = 1k .. 64k, D=128, one series."""
    return [_case(op, torch.float32, b, SWEEP_D, quick=False, series=f"sweep fp32 D={SWEEP_D}") for b in SWEEP_B]


def gpu_clip_case() -> Case:
    """Issue 3's GPU target: B=65536, D=768, bf16, forward+backward; peak loss memory under 2 GB (read the
    peak_mem_mb row: the targets compare ratios) and time no worse than eager, which holds ~6 B x B bf16
    buffers (~52 GB: it fits an H100's 80 GB)."""
    targets = [Target("time no worse than open_clip's formula (eager)", "eager", 1.0, ("full",)),
               Target("peak memory below eager's", "eager", 1.0, ("full",), metric="peak_mem_mb")]
    case = _case("clip_loss", torch.bfloat16, GPU_B, GPU_D, targets=targets)
    case.substitute_oracle, case.substitute_label, case.substitute_on_device = _clip_gpu64, GPU_ORACLE_LABEL, True
    case.others = _inf_cl("cuda")
    return case


@register("clip_loss")
def clip_cases(device: str, quick: bool) -> list[Case]:
    faster = Target(">= 1.6x faster than open_clip's formula", "eager", 1.6, ("full",))
    fp32 = _case("clip_loss", torch.float32, 8192, 768, targets=[faster])
    fp32.others = _inf_cl(device)
    return [fp32,
            _case("clip_loss", torch.bfloat16, 8192, 768, quick=False),
            _case("clip_loss", torch.float32, 4096, 768, quick=False)] + sweep_cases("clip_loss") + (
                [gpu_clip_case()] if device == "cuda" else [])


@register("siglip_loss")
def siglip_cases(device: str, quick: bool) -> list[Case]:
    faster = Target(">= 1.7x faster than open_clip's formula", "eager", 1.7, ("full",))
    return [_case("siglip_loss", torch.float32, 4096, 512, targets=[faster]),
            _case("siglip_loss", torch.bfloat16, 4096, 512, quick=False)] + sweep_cases("siglip_loss")
