"""Which implementation of an op runs: auto | cuda | triton | cpu | reference.

Precedence: the per-call `backend=` argument, then the innermost `with mmfast.use_backend(...)`,
then `mmfast.set_backend(...)`, then the environment variable MMFAST_BACKEND, then "auto".

`auto` picks per device and op: on CPU the C++ kernel; on CUDA the implementation that a GPU run of the
benchmark measured fastest on this device class (the dispatch table, mmfast/tuning/<device-class>.json,
written by benchmarks/gpu_check.sh), among those validated on a GPU (GPU_VALIDATED below) — or
"upstream", upstream's own computation, where no mmfast kernel beat it: a drop-in is never slower than
what it replaces. Float64 inputs run the reference under `auto` (the kernels do fp32/fp16/bf16).
Asking for a backend that cannot run is an error that says why — never a silent fallback.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading

import torch

BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference")
# What `auto` resolves to where no mmfast kernel beat upstream on this device: each op runs upstream's own
# computation (the reference, which mirrors it line by line; for the cross-attention core, cat + SDPA).
UPSTREAM = "upstream"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Implementations whose correctness a GPU run of benchmarks/gpu_check.sh confirmed (its pytest and sanitizer
# stages, every dtype), per op. `auto` on CUDA takes only these; which of them runs, or upstream, is the
# dispatch table's call (mmfast/tuning). An implementation that fails there is removed from this table.
GPU_VALIDATED: dict[str, tuple[str, ...]] = {
    # H200, 2026-12-04 16:30 UTC (main at 84ae3d8): every (backend, dtype) the op tests claim on CUDA ran and
    # passed (the coverage guard: 18 of 18), fp16/bf16 cross-attention and the SigLIP bias gradient included;
    # the sanitizer found nothing.
    "similarity_softmax": ("cuda", "triton"),
    "clip_loss": ("cuda", "triton"),
    "siglip_loss": ("cuda", "triton"),
    "cross_attention": ("cuda", "triton"),
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


def _check_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"mmfast: backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


_env_backend = os.environ.get("MMFAST_BACKEND", "auto")
if _env_backend not in BACKEND_NAMES:
    raise ValueError(f"mmfast: MMFAST_BACKEND must be one of {BACKEND_NAMES}, got {_env_backend!r}")

_global_backend = _env_backend
_backend_stack: list[str] = []


def set_backend(name: str) -> None:
    """Set the process-wide default backend."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend in force when no `backend=` is passed."""
    return _backend_stack[-1] if _backend_stack else _global_backend


@contextlib.contextmanager
def use_backend(name: str):
    """`with mmfast.use_backend("reference"): ...` — a backend for a block."""
    _backend_stack.append(_check_name(name))
    try:
        yield
    finally:
        _backend_stack.pop()


# ---- what this machine can run (probed once at import) ----------------------------------------
_C = None
_C_error: str | None = None
try:
    from mmfast import _C  # noqa: F811  (loads the operator registrations)
except ImportError as e:  # the package still imports: reference backend only
    _C_error = str(e)

_triton_error: str | None = None
try:
    import triton  # noqa: F401
except ImportError as e:
    _triton_error = str(e)

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_native_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for torch.ops.mmfast.<op_name> under dispatch_key
    ("CPU", "CUDA"): an op's "cuda" implementation exists only where its CUDA kernels were built."""
    return (_C is not None and hasattr(torch.ops.mmfast, op_name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"mmfast::{op_name}", dispatch_key))


def _why_unavailable(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs CPU tensors; these are on {device}"
        if _C is None:
            return f"the extension mmfast._C failed to import ({_C_error}); build it with `make build`"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors; these are on {device}"
        if _C is None:
            return f"the extension mmfast._C failed to import ({_C_error}); build it with `make build`"
        if not _C.cuda_compiled:
            return "mmfast._C was built without CUDA (MMFAST_SKIP_CUDA=1, or no nvcc at build time)"
        return None
    if name == "triton":
        if _triton_error is not None:
            return f"triton is not importable ({_triton_error})"
        if device.type == "cpu" and not TRITON_INTERPRET:
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device}"
        return None
    raise ValueError(f"mmfast: unknown backend {name!r}")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """The concrete backends that can run on `device` in this process."""
    device = torch.device(device)
    return [n for n in ("cuda", "triton", "cpu", "reference") if _why_unavailable(n, device) is None]


# ---- the dispatch tables (mmfast/tuning) -----------------------------------------------------------------
_DTYPE_KEYS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_tables: dict[tuple[str, int | None], dict | None] = {}  # (device type, index) -> its table (None: none)


@torch.compiler.assume_constant_result
def _cuda_device_class(index: int) -> tuple[str, str]:
    """(device class, compute capability) of a CUDA device, e.g. ("nvidia-h200", "9.0"): the name of the
    folder and table its GPU runs are filed under (mmfast.bench.runner.device_name)."""
    props = torch.cuda.get_device_properties(index)
    name = re.sub(r"[^a-z0-9.]+", "-", props.name.lower()).strip("-")
    return name, f"{props.major}.{props.minor}"


def _cuda_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _table(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return _tables.get((device.type, device.index))  # CPU dispatch is fixed unless a test installs a table
    key = ("cuda", _cuda_index(device))
    if key not in _tables:
        if not torch.cuda.is_available():
            return None  # a CUDA device asked about where there is none (tests of the dispatch)
        from mmfast import tuning

        _tables[key] = tuning.table_for(*_cuda_device_class(key[1]))
    return _tables[key]


def set_dispatch_table(device: str | torch.device, table: dict | None) -> None:
    """Use `table` (mmfast.tuning's format; None: no table) for `auto` on `device` in this process, in place
    of the committed one: for a freshly measured GPU, or a test of the dispatch."""
    device = torch.device(device)
    _tables[(device.type, _cuda_index(device) if device.type == "cuda" else device.index)] = table
    _module_choices.clear()


def _tuned_order(op: str, device: torch.device, dtype: torch.dtype, shape_class: str | None = None) -> list[str] | None:
    """The table's order for (op, dtype); for a shape class (e.g. similarity_softmax's "topk") its own entry
    "op:class" where the table has one, else the op's; with autograd off, its inference order."""
    table = _table(device)
    if table is None:
        return None
    ops, key = table["ops"], _DTYPE_KEYS.get(dtype)
    entry = ops.get(f"{op}:{shape_class}", {}).get(key) if shape_class else None
    if entry is None:
        entry = ops.get(op, {}).get(key)
    if entry is None:
        return None
    # autograd off (inference): the table's ranking of the forward measurements, where it has one
    return entry["order"] if torch.is_grad_enabled() else entry.get("inference_order", entry["order"])


# The drop-in module cases of the bench (their table keys) run on the cross-attention core: validated as it.
_VALIDATED_AS = {"sam_attention": "cross_attention", "perceiver_resampler": "cross_attention"}


def _auto(op: str, implementations: tuple[str, ...], device: torch.device, dtype: torch.dtype,
          table_key: str, shape_class: str | None = None) -> str:
    """`auto`: the dispatch table's first runnable choice (table_key: the op's bench name), else (no entry)
    on CPU the C++ kernel and on CUDA the GPU-validated order, else upstream. On CUDA only implementations
    GPU_VALIDATED lists are taken: the table says what is fast, a GPU test run what is correct."""
    order = _tuned_order(table_key, device, dtype, shape_class)
    validated = GPU_VALIDATED.get(_VALIDATED_AS.get(op, op), ()) if device.type == "cuda" else implementations
    if order is None:
        if device.type == "cpu":
            return "cpu" if "cpu" in implementations and _why_unavailable("cpu", device) is None else "reference"
        order = list(validated) + [UPSTREAM]
    for candidate in order:
        if candidate == UPSTREAM:
            return UPSTREAM
        if candidate in validated and candidate in implementations and _why_unavailable(candidate, device) is None:
            return candidate
    return UPSTREAM


def resolve(op: str, implementations: tuple[str, ...], device: torch.device, dtype: torch.dtype,
            requested: str | None = None, shape_class: str | None = None) -> str:
    """The concrete backend that runs `op` (whose implementations are `implementations`); under `auto` it
    may be UPSTREAM (the op then runs upstream's own computation). shape_class: a kind of call the dispatch
    table may rank apart (the bench case's "dispatch" parameter), e.g. "topk"."""
    name = _check_name(requested) if requested is not None else get_backend()
    if name == "auto":
        if dtype not in KERNEL_DTYPES:
            return "reference"
        return _auto(op, implementations, device, dtype, op, shape_class)
    if name not in implementations:
        raise BackendUnavailableError(f"mmfast: op {op!r} has no {name!r} implementation (it has {implementations})")
    why = _why_unavailable(name, device)
    if why is not None:
        raise BackendUnavailableError(f"mmfast: backend {name!r} cannot run {op!r}: {why}")
    if name != "reference" and dtype not in KERNEL_DTYPES:
        raise BackendUnavailableError(
            f"mmfast: backend {name!r} runs float32, float16 and bfloat16; got {dtype} (use backend='reference')")
    return name


def module_backend(table_key: str, implementations: tuple[str, ...], device: torch.device,
                   dtype: torch.dtype, kernel_shapes: bool = True) -> str:
    """What a drop-in module runs: UPSTREAM (the upstream module's own forward) or the backend to pass to
    its ops. A backend the user chose is passed on; under `auto` the dispatch table's entry for the module's
    bench case (table_key: "sam_attention", "perceiver_resampler") decides; with no entry the module runs
    its fused path with `auto` ops (implementations: those of the module's attention core). kernel_shapes:
    whether the module's shapes (head dims) are ones the kernels take; if not, a kernel the table chose is
    not forced on the ops, which then pick under `auto` (the reference for such shapes)."""
    name = get_backend()
    if name != "auto" or dtype not in KERNEL_DTYPES:
        return name
    # Memoized: SAM calls this from 13 modules per forward, and at one prompt on an H200 the host is the
    # whole cost (upstream's forward 3.3 ms, its GPU work replayed from a CUDA graph 0.67 ms).
    key = (table_key, implementations, device, dtype, kernel_shapes, torch.is_grad_enabled())
    found = _module_choices.get(key)
    if found is None:
        if _tuned_order(table_key, device, dtype) is None:
            found = "auto"
        else:
            choice = _auto(table_key, implementations, device, dtype, table_key)
            found = choice if choice == UPSTREAM or kernel_shapes else "auto"
        _module_choices[key] = found
    return found


_module_choices: dict = {}  # module_backend's answers under auto; emptied when a dispatch table is set

_upstream_scope = threading.local()


def in_upstream_forward() -> bool:
    """True inside run_upstream: a drop-in module above this one runs upstream's forward."""
    return getattr(_upstream_scope, "depth", 0) > 0


def run_upstream(forward, *args):
    """forward(*args), a drop-in's upstream forward chosen by module_backend, with the drop-in submodules it
    calls told so (in_upstream_forward): they would resolve the same table entry to the same answer, and run
    upstream's forward at once instead. SAM's TwoWayTransformer resolves 10 times per forward otherwise;
    the upstream path then cost 1.10-1.15x the reference's host time (tiny inputs, dev CPU, interleaved
    runs), and at one prompt an H200 runs that forward host-bound (graph replays 0.669 vs 0.670 ms, eager
    2.36 vs 2.45 ms, 2026-12-04). Under torch.compile the flag is left alone (each submodule resolves)."""
    if torch.compiler.is_compiling():
        return forward(*args)
    _upstream_scope.depth = getattr(_upstream_scope, "depth", 0) + 1
    try:
        return forward(*args)
    finally:
        _upstream_scope.depth -= 1
