"""How an op declares its benchmark cases.

Each op has one file, benchmarks/<op>.py, holding a function decorated with `@register("<op>")`
that returns the op's `Case`s for a device. A case is a set of inputs plus three callables on
them: the eager plain-PyTorch reference (also run in float64: the oracle every implementation is
checked against), the mmfast function (called with `backend=`), and optional "floors" (the work
the op cannot avoid, e.g. its bare GEMM). The runner (mmfast.bench.runner) derives everything
else: the providers, the correctness gate, the three timing modes, memory, targets and reports.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Target:
    """A goal printed PASS/MISS beside each mmfast provider's result.

    PASS when median(baseline) / median(mmfast provider) >= min_speedup in each listed mode;
    "within 1.1x of the GEMM" is baseline="floor-gemm", min_speedup=1/1.1. metric="peak_mem_mb"
    compares peak memory the same way ("below upstream's": baseline="eager", min_speedup=1)."""
    label: str
    baseline: str  # "eager", "compile" or "floor-<name>"
    min_speedup: float
    modes: tuple[str, ...] = ("forward",)
    metric: str = "time_ms"  # or "peak_mem_mb"

    def __post_init__(self):
        if self.metric not in ("time_ms", "peak_mem_mb"):
            raise ValueError(f"mmfast bench: target {self.label!r}: metric must be time_ms or peak_mem_mb, "
                             f"got {self.metric!r}")


@dataclass
class Case:
    op: str
    label: str  # e.g. "fp32 N=4096 C=1000 D=768"; unique within the op
    dtype: torch.dtype
    x_name: str  # the CSV's x column (Liger-style): the size the plot is read against
    x_value: float
    params: dict  # JSON-able shape/dtype facts, written to the CSV's extra column
    make_inputs: Callable[[torch.device], dict[str, torch.Tensor]]  # deterministic, in `dtype`
    reference: Callable[..., Any]  # reference(**inputs): eager plain PyTorch
    mmfast: Callable[..., Any]  # mmfast(**inputs, backend=name)
    backends: tuple[str, ...]  # the op's implementations (mmfast.ops.<op>.IMPLEMENTATIONS)
    grad_inputs: tuple[str, ...] = ()  # inputs differentiated in the backward/full modes
    floors: dict[str, Callable[..., Any]] = field(default_factory=dict)  # name -> fn(**inputs), not checked
    # Other libraries' implementations of the case's math (e.g. "inf-cl"): name -> fn(**inputs), checked and
    # timed like mmfast's providers, under their own name; never part of a dispatch table.
    others: dict[str, Callable[..., Any]] = field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    targets: tuple[Target, ...] = ()
    quick: bool = True  # part of `--quick`
    # Cases of one series (e.g. "sweep fp32 D=128": one shape family at growing x_value) are plotted
    # as lines of time and peak memory against x and tabled together, not as bars per case.
    series: str | None = None
    # Estimated peak bytes of the reference's forward + backward on the inputs cast to a dtype. Where it
    # exceeds the runner's limit (--reference-max-gb) eager, compile and mmfast's reference backend are
    # skipped (reported, not failed), and so is the float64 oracle: substitute_oracle takes its place.
    reference_bytes: Callable[[torch.dtype], float] | None = None
    # substitute_oracle(**inputs cast to float64 on the CPU): an oracle in O(inputs) memory for sizes
    # where the float64 reference does not fit; fp16/bf16 cases also need the reference in their dtype to
    # fit (their bound is 2x its own error). substitute_label says what it is, in the report rows it gates.
    substitute_oracle: Callable[..., Any] | None = None
    substitute_label: str = ""
    # Run substitute_oracle on the inputs' device instead of the CPU (an oracle written for the GPU: a
    # float64 GPU GEMM takes a second where the CPU would take minutes). For fp16/bf16 cases the reference
    # in that dtype must still fit (it gives the 2x bound).
    substitute_on_device: bool = False
    # A drop-in module case (upstream's module against mmfast.nn's). Such cases are launch-bound on a GPU,
    # so on CUDA they are also timed as CUDA-graph replays (providers eager-graph and mmfast-graph: launch
    # overhead apart from kernel time), and `--profile` profiles them when no --op/--cases picks cases.
    module: bool = False

    def __post_init__(self):
        if self.substitute_oracle is not None and not (self.reference_bytes and self.substitute_label):
            raise ValueError(f"mmfast bench: case {self.label!r}: substitute_oracle needs reference_bytes (when to "
                             f"use it) and substitute_label (what to call it in the report)")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"mmfast bench: case {self.label!r}: modes must be among {MODES}, got {unknown}")
        if any(m != "forward" for m in self.modes) and not self.grad_inputs:
            raise ValueError(f"mmfast bench: case {self.label!r} times a backward but names no grad_inputs")


CaseFactory = Callable[[str, bool], list[Case]]  # (device type, quick) -> cases
_REGISTRY: dict[str, CaseFactory] = {}
_loaded_dirs: set[str] = set()


def register(op: str) -> Callable[[CaseFactory], CaseFactory]:
    """`@register("similarity_softmax") def cases(device, quick): ...` in benchmarks/<op>.py."""
    def decorator(factory: CaseFactory) -> CaseFactory:
        _REGISTRY[op] = factory  # re-registering replaces (a reloaded file, a test's tiny op)
        return factory
    return decorator


def unregister(op: str) -> None:
    _REGISTRY.pop(op, None)


def default_bench_dir() -> str:
    """benchmarks/ beside the mmfast package (the source tree)."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))


def load(bench_dir: str | None = None) -> dict[str, CaseFactory]:
    """Import every benchmarks/<op>.py (not test_*.py) once; returns op name -> case factory."""
    bench_dir = os.path.normpath(bench_dir or default_bench_dir())
    if bench_dir not in _loaded_dirs and os.path.isdir(bench_dir):
        for name in sorted(os.listdir(bench_dir)):
            if name.endswith(".py") and not name.startswith(("test_", "_")):
                path = os.path.join(bench_dir, name)
                spec = importlib.util.spec_from_file_location(f"mmfast_benchmarks_{name[:-3]}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
        _loaded_dirs.add(bench_dir)
    return dict(_REGISTRY)


def cases(op: str, device: str, quick: bool) -> list[Case]:
    factory = _REGISTRY[op]
    found = factory(device, quick)
    return [c for c in found if c.quick] if quick else found
