"""Shared test helpers.

Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET=1 must be set before
triton is imported, so it is set here, first, unless a CUDA device is present (then Triton runs
for real) or the caller chose already.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # torch does not import triton at import time

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import mmfast  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW_PRECISION = (torch.float16, torch.bfloat16)


def kernel_backends(device) -> list[str]:
    """The non-reference backends that can run on `device` here (triton on CPU: interpreter)."""
    return [b for b in mmfast.available_backends(device) if b != "reference"]


def backend_device_params():
    """pytest params (backend, device) for every kernel backend available on this machine."""
    return [pytest.param(b, d, id=f"{b}-{d}") for d in DEVICES for b in kernel_backends(d)]


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """Dtypes a backend is tested in: Triton under the interpreter cannot do bf16 tl.dot (garbage)."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / max(||ref||, tiny), in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_to_reference(out, ref64, ref_lowp=None, *, name="output", fp32_rtol=1e-5):
    """fp32: relative error to the fp64 reference <= fp32_rtol (TF32 off). fp16/bf16: at most 2x the
    error of the reference computed in the same low precision (FlashAttention's rule), with a floor
    of a few units of that dtype's rounding so exact-match cases don't demand zero error."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all() == torch.isfinite(ref64).all(), f"{name}: finiteness differs"
    err = rel_err(out, ref64)
    if out.dtype in LOW_PRECISION:
        assert ref_lowp is not None, "low precision needs the low-precision reference"
        ref_err = rel_err(ref_lowp, ref64)
        floor = 4 * torch.finfo(out.dtype).eps
        assert err <= max(2 * ref_err, floor), f"{name}: rel err {err:.3e} > 2 x reference's {ref_err:.3e}"
    else:
        assert err <= fp32_rtol, f"{name}: rel err {err:.3e} > {fp32_rtol:.1e}"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons assume full-precision matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
