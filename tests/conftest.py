"""Shared test helpers.

Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET=1 must be set before
triton is imported, so it is set here, first, unless a CUDA device is present (then Triton runs
for real) or the caller chose already.
"""
import os

# The Triton interpreter runs each tl.dot as a small numpy matmul; numpy's multithreaded OpenBLAS stalls on
# these 2-core machines (a 64x64x256 dot: 15-30 ms with 2 threads, 0.05 ms with 1; the Triton
# cross-attention tests took 93 s instead of 130 s). Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # torch does not import triton at import time

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import mmfast  # noqa: E402
from mmfast.testing import LOW_PRECISION, accuracy_problem, rel_err  # noqa: E402,F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def assert_close_to_reference(out, ref64, ref_lowp=None, *, name="output", fp32_rtol=1e-5):
    """The accuracy rule of mmfast/testing.py (fp32: <= fp32_rtol relative to the fp64 reference, TF32
    off; fp16/bf16: <= 2x the same-precision reference's error), plus: NaN/Inf where the reference has them."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all() == torch.isfinite(ref64).all(), f"{name}: finiteness differs"
    if out.dtype in LOW_PRECISION:
        assert ref_lowp is not None, "low precision needs the low-precision reference"
    problem, _ = accuracy_problem(out, ref64, ref_lowp, fp32_rtol=fp32_rtol)
    assert problem is None, f"{name}: {problem}"


def assert_attention_grad_close(g, g64, g_lp, grad_v64, *, name):
    """An attention gradient vs the fp64 reference. With one key in all the softmax is constant and
    dq = dk = 0 exactly; the kernels' rounding leaves ~eps there, so such a gradient is held to ~0 relative
    to the value gradient's size (fp32: 1e-5; fp16/bf16: 2x the same-precision reference's, >= 4 eps)."""
    if g64.norm() != 0:
        assert_close_to_reference(g, g64, g_lp, name=name)
        return
    bound = 1e-5 if g_lp is None else max(2 * g_lp.double().norm().item() / grad_v64.norm().item(),
                                          4 * torch.finfo(g.dtype).eps)
    assert g.double().norm() <= bound * grad_v64.norm(), f"{name}: not ~0"


def save_results_per_world(rank: int, out_dir, worlds, compute) -> None:
    """In a spawned worker: for each world size in `worlds` that includes `rank`, join a gloo group
    (file:// rendezvous in out_dir) and save compute(rank, world) to out_dir/world{W}_rank{R}.pt."""
    from datetime import timedelta

    import torch.distributed as dist

    for world in worlds:
        if rank >= world:
            continue
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/init{world}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            torch.save(compute(rank, world), f"{out_dir}/world{world}_rank{rank}.pt")
        finally:
            dist.destroy_process_group()


def spawn_and_wait(worker, out_dir, nprocs: int, timeout_s: float) -> None:
    """Spawn worker(rank, out_dir) in nprocs processes (gloo process-group tests) and wait, failing the
    test (and terminating the workers) if they have not finished in timeout_s seconds."""
    import time

    ctx = torch.multiprocessing.start_processes(worker, args=(str(out_dir),), nprocs=nprocs, join=False,
                                                start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the spawned process group did not finish in {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons assume full-precision matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
