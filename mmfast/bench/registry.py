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
    "within 1.1x of the GEMM" is baseline="floor-gemm", min_speedup=1/1.1."""
    label: str
    baseline: str  # "eager", "compile" or "floor-<name>"
    min_speedup: float
    modes: tuple[str, ...] = ("forward",)


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
    modes: tuple[str, ...] = MODES
    targets: tuple[Target, ...] = ()
    quick: bool = True  # part of `--quick`

    def __post_init__(self):
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
