"""Shared test helpers, and a pytest plugin: the dtype coverage guard (MMFAST_COVERAGE_GUARD=1, at the end).

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
    # Python bools and accuracy_problem (which works on ref64's device): out and ref_lowp may be on a GPU.
    assert bool(torch.isfinite(out).all()) == bool(torch.isfinite(ref64).all()), f"{name}: finiteness differs"
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
    assert g.double().norm().item() <= bound * grad_v64.norm().item(), f"{name}: not ~0"


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


# ---- dtype coverage guard (a pytest plugin) -----------------------------------------------------------------
# With MMFAST_COVERAGE_GUARD=1 the session fails, listing them, when (file, backend, device, dtype) combinations
# that an op test file claims had no passing test: skipped (a kernel missing from the build), failed, deselected
# or never generated. (On 2026-12-04 no fp16/bf16 cross-attention result was checked on the GPU.) The files
# below parametrize their kernel tests over (backend, device, dtype), so each claims backend_device_params() x
# dtypes_for(); test_sam_attention and test_perceiver parametrize backends in fp32 only or dtypes without a
# backend, and claim none. Scope: the files that ran such a test, on the devices those tests name, so
# `pytest tests -k "cuda and not emulated"` guards the CUDA combinations. Set it for a whole run or one device's
# selection; a narrower -k lists what it left out. Works under pytest-xdist: each combination reaches the
# controller in its report's user_properties.
COVERAGE_FILES = ("test_contrastive_loss.py", "test_cross_attention.py", "test_similarity_softmax.py")
_COMBINATION = "mmfast_combination"  # user_properties key
_coverage_outcomes: list[tuple[str, str, str, str, bool]] = []  # (file, backend, device, dtype, passed)
_coverage_summary = pytest.StashKey[str]()


def claimed_combinations(files=COVERAGE_FILES) -> dict[str, list[tuple[str, str, str]]]:
    """file -> the (backend, device, dtype name) it claims to test on this machine, on every device."""
    claims = [(*p.values, str(dtype)) for p in backend_device_params() for dtype in dtypes_for(*p.values)]
    return {f: claims for f in files}


def missing_combinations(claims, outcomes) -> tuple[list[tuple[str, str, str, str]], int]:
    """(missing, number in scope). claims: file -> [(backend, device, dtype)]; outcomes: one
    (file, backend, device, dtype, passed) per test that ran or was skipped. In scope: the claimed combinations of
    the files that have an outcome, on the devices the outcomes name. Missing: those in scope that no test passed."""
    files = {o[0] for o in outcomes}
    devices = {o[2] for o in outcomes}
    scope = {(f, *c) for f, combos in claims.items() if f in files for c in combos if c[1] in devices}
    passed = {o[:4] for o in outcomes if o[4]}
    return sorted(scope - passed), len(scope)


def _coverage_guard_on() -> bool:
    return os.environ.get("MMFAST_COVERAGE_GUARD") == "1"


def pytest_collection_modifyitems(config, items):
    """Tags each test of COVERAGE_FILES parametrized over (backend, device, dtype) with that combination (under
    xdist this runs in the workers, whose reports carry user_properties to the controller)."""
    if not _coverage_guard_on():
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.path.name in COVERAGE_FILES and {"backend", "device", "dtype"} <= params.keys():
            combination = (item.path.name, params["backend"], params["device"], str(params["dtype"]))
            item.user_properties.append((_COMBINATION, combination))


def pytest_runtest_logreport(report):
    """One outcome per test: its call, or the setup that skipped or failed it."""
    if report.when != "call" and report.passed:
        return
    for key, value in report.user_properties:
        if key == _COMBINATION:
            _coverage_outcomes.append((*value, report.when == "call" and report.passed))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if (not _coverage_guard_on() or hasattr(config, "workerinput") or config.option.collectonly
            or session.shouldstop or session.shouldfail
            or exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)):
        return  # off, an xdist worker (the controller judges), or a run cut short (-x, interrupted)
    missing, in_scope = missing_combinations(claimed_combinations(), _coverage_outcomes)
    if in_scope and not missing:
        devices = ", ".join(sorted({o[2] for o in _coverage_outcomes}))
        config.stash[_coverage_summary] = f"all {in_scope} claimed combinations on {devices} passed"
        return
    if not in_scope:
        text = (f"no test of {', '.join(COVERAGE_FILES)} parametrized over (backend, device, dtype) ran, so "
                f"nothing was checked (devices here: {', '.join(DEVICES)})")
    else:
        lines = [f"{len(missing)} of {in_scope} claimed (file, backend, device, dtype) combinations had no passing "
                 "test (skipped, failed, deselected or not generated):"]
        for f in sorted({m[0] for m in missing}):
            lines.append(f"  {f}: " + ", ".join(f"{b}-{d}-{t}" for g, b, d, t in missing if g == f))
        lines.append("Claimed: backend_device_params() x dtypes_for() of tests/conftest.py, on the devices that "
                     "this run tested.")
        text = "\n".join(lines)
    config.stash[_coverage_summary] = "FAILED: " + text
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    text = config.stash.get(_coverage_summary, None)
    if text is not None:
        terminalreporter.write_sep("=", "mmfast dtype coverage guard (MMFAST_COVERAGE_GUARD=1)")
        terminalreporter.line(text)
