"""`python -m mmfast bench`: check every implementation against the float64 reference, then time it.

Per case (mmfast.bench.registry.Case) and device:
1. the oracle: the eager reference on the inputs cast to float64 (outputs, and gradients for a
   fixed random grad_output); the same reference in the case's dtype gives the low-precision error
   that fp16/bf16 implementations are held to (at most 2x of it, FlashAttention's rule);
2. each checked provider (torch.compile(reference), "mmfast" = backend auto, "mmfast-<backend>")
   is compared with the oracle — forward outputs, then gradients. A wrong one is reported FAIL
   and not timed; one that raises is reported ERROR; the run goes on;
3. the timing of every provider that passed, plus the eager reference and the case's floors, in
   the modes forward (under no_grad: inference), backward (autograd.grad of a graph built,
   untimed, before each call) and full (forward + backward), with the peak memory of a call;
4. speedups vs eager and vs the floors, and the case's targets (PASS/MISS).
Rows go to <out>/<device-name>/<op>.csv (mmfast.bench.report.COLUMNS), a PNG plot (a series of cases:
one of time and peak memory vs x), and a table
between markers in RESULTS.md.

References too big for the machine. A case may declare reference_bytes (the reference's estimated peak
in a dtype, e.g. ~6 B x B buffers of open_clip's loss). Above the limit (--reference-max-gb; default:
half the physical memory on CPU, 80% of the GPU's) eager, compile and mmfast's reference backend are
reported "skipped: reference needs ~N GB ..." (not failures), and where the float64 oracle would not
fit, the case's substitute_oracle (run in float64 on the CPU, O(inputs) memory) takes its place; every
row it gates says "vs <its label>" and names it in the CSV's extra ("oracle").

Timing. CPU: time.perf_counter around each call, after warm-up, with torch.set_num_threads(
os.cpu_count()); the providers of a mode take turns call by call, so that other jobs on a shared
machine slow them alike. CUDA: torch.cuda.Event pairs around each call, a 256 MB buffer zeroed
before each to flush L2 (as triton.testing.do_bench does). Median, p20 and p80 of the samples.

CUDA graphs (module cases on CUDA: Case.module). The providers eager-graph and mmfast-graph capture the
reference's and mmfast's (auto) forward, and forward + backward (full), in a torch.cuda.CUDAGraph after a
warm-up on a side stream, and are timed as replays: launch and host overhead apart from kernel time. The
check captures on other input values, copies the case's in and compares the replay with the oracle. A
capture that fails (a host sync inside, say) is that provider's "ERROR: ... not capturable ..." status.
Their peak memory is what the capture allocated (a replay allocates nothing); no backward mode (its
forward is built per call, untimed: no single graph).

--profile. Instead of checks and timings: torch.profiler over a few calls of each provider (eager and
mmfast unless --providers says otherwise) per case and mode, summarized in <out>/<device-name>/<op>-profile.txt
(report.profile_text): host vs GPU time, kernels, host syncs and top-level ops per call, the top CUDA
kernels and host events. Default cases: the module cases; --op or --cases pick any.

Peak memory. CUDA: torch.cuda.max_memory_allocated() minus the allocated bytes before the call.
CPU: torch's CPU allocator keeps no statistics, so this measures the growth of the process's
resident set: glibc's free memory is handed back (malloc_trim), the kernel's high-water mark is
reset (/proc/self/clear_refs "5"), and after the call VmHWM minus the VmRSS before it is the
peak. Precision: whole 4 KiB pages, and glibc may put a new buffer in fresh pages while a freed
one is still resident, so a call can read up to about one intermediate buffer more than its live
tensors (measured here: the eager N=4096 C=1000 fp32 forward reads 46.2 MB, exactly its live
tensors, in most calls and 61.8 MB in some); the minimum over the first 3 calls (2 with --quick)
is reported. Memory written outside torch (malloc scratch in a kernel) counts too. "nan" where
/proc/self/clear_refs is not available.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import mmfast
from mmfast import backend as _backend
from mmfast.bench import registry, report
from mmfast.bench.registry import Case
from mmfast.testing import LOW_PRECISION, accuracy_problem, rel_err  # noqa: F401  (re-exported)

FP32_RTOL = 1e-4  # at bench sizes (K=768 sums) fp32 kernels land near 1e-6; 1e-4 leaves room for
#                   other summation orders while still catching any real bug


# ---- the accuracy rule: mmfast/testing.py, shared with the tests ---------------------------------
def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _compare(outs, outs64, outs_lowp, what: str) -> tuple[str | None, float]:
    """Check every tensor of `outs`; (None or the first problem, largest floating rel err)."""
    outs = _as_list(outs)
    if len(outs) != len(outs64):
        return f"{what}: {len(outs)} outputs, reference has {len(outs64)}", math.nan
    worst = 0.0
    for i, (o, r64, rl) in enumerate(zip(outs, outs64, outs_lowp)):
        problem, err = accuracy_problem(o, r64, rl, fp32_rtol=FP32_RTOL)
        if problem is not None:
            return f"{what}[{i}]: {problem}", err
        if o.is_floating_point():
            worst = max(worst, err)
    return None, worst


# ---- providers -------------------------------------------------------------------------------
@dataclass
class Provider:
    name: str  # "eager", "compile", "floor-<name>", "mmfast", "mmfast-<backend>", "eager-graph", "mmfast-graph",
    # or another library's name (Case.others)
    fn: Callable[..., Any]
    checked: bool  # compared with the float64 reference before timing
    backend: str | None = None  # the concrete mmfast backend (for "mmfast": what auto resolved to)
    graph: bool = False  # fn's step captured once in a CUDA graph, then timed as replays (captured_step)


GRAPH_PROVIDERS = ("eager-graph", "mmfast-graph")


def kernel_backends(case: Case, device: torch.device) -> list[str]:
    """The op's non-reference backends that run on `device`; Triton only on CUDA (the CPU
    interpreter is a correctness tool, timing it means nothing)."""
    found = []
    for name in case.backends:
        if name == "reference" or (name == "triton" and device.type != "cuda"):
            continue
        if _backend._why_unavailable(name, device) is None:
            found.append(name)
    return found


def providers_for(case: Case, device: torch.device, backends: list[str] | None = None,
                  only: list[str] | None = None) -> list[Provider]:
    """Eager reference, torch.compile(reference), the floors, other libraries, mmfast (auto) and mmfast-<backend>
    for each backend (default: kernel_backends); an explicit backend that auto resolves to is
    timed once, as "mmfast". On CUDA, a module case also gets eager-graph and mmfast-graph: the
    reference and mmfast (auto) captured in CUDA graphs. `only`: these providers and eager (the
    baseline of every ratio), and eager-graph with mmfast-graph (its baseline)."""
    def wanted(name):
        return (not only or name in only or name == "eager"
                or (name == "eager-graph" and "mmfast-graph" in only))

    auto = _backend.resolve(case.op, case.backends, device, case.dtype, "auto", case.params.get("dispatch"))
    found = [Provider("eager", case.reference, checked=False)]
    if wanted("compile"):  # dynamic=False: specialized to the case's shapes, like a deployed model
        found.append(Provider("compile", torch.compile(case.reference, dynamic=False), checked=True))
    found += [Provider(f"floor-{name}", fn, checked=False) for name, fn in case.floors.items()]
    found += [Provider(name, fn, checked=True) for name, fn in case.others.items()]
    found.append(Provider("mmfast", _bind_backend(case.mmfast, "auto"), checked=True, backend=auto))
    for name in (kernel_backends(case, device) if backends is None else backends):
        if name != auto:
            found.append(Provider(f"mmfast-{name}", _bind_backend(case.mmfast, name), checked=True, backend=name))
    if case.module and device.type == "cuda":  # checked too: a replay must give the oracle's values
        found.append(Provider("eager-graph", case.reference, checked=True, graph=True))
        found.append(Provider("mmfast-graph", _bind_backend(case.mmfast, "auto"), checked=True, backend=auto,
                              graph=True))
    return [p for p in found if wanted(p.name)]


def _bind_backend(fn, backend):
    return lambda **inputs: fn(**inputs, backend=backend)


# ---- the oracle and the steps that get timed --------------------------------------------------
@dataclass
class Prepared:
    """A case's inputs on the device and what every provider is compared with."""
    case: Case
    inputs: dict[str, torch.Tensor]
    grad_outputs: list[torch.Tensor] = field(default_factory=list)  # one per differentiable output
    diff_positions: list[int] = field(default_factory=list)  # which outputs are differentiable
    out64: list = field(default_factory=list)
    out_lowp: list = field(default_factory=list)
    grads64: list = field(default_factory=list)
    grads_lowp: list = field(default_factory=list)
    oracle: str | None = None  # None: the float64 reference; else what stood in for it, and why

    @property
    def has_backward(self) -> bool:
        return bool(self.case.grad_inputs) and any(m != "forward" for m in self.case.modes)


def _grad_copy(inputs: dict, names, dtype=None) -> dict:
    out = {}
    for key, value in inputs.items():
        if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.detach().requires_grad_() if key in names else value
    return out


def _forward_backward(fn, inputs: dict, names, positions, grad_outputs):
    """(outputs, gradients of `names`) of one fn call with the given grad_outputs."""
    with torch.enable_grad():
        outs = _as_list(fn(**inputs))
        diff = [outs[i] for i in positions]
        grads = torch.autograd.grad(diff, [inputs[n] for n in names], grad_outputs)
    return outs, list(grads)


def _random_grad_outputs(outs: list) -> tuple[list[int], list[torch.Tensor]]:
    """The differentiable outputs' positions, and a fixed random grad_output for each."""
    positions = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.requires_grad]
    gen = torch.Generator().manual_seed(1234)  # on the CPU: the same numbers on every device
    return positions, [torch.randn(outs[i].shape, generator=gen).to(outs[i].device, outs[i].dtype) for i in positions]


def default_reference_limit(device: torch.device) -> float:
    """Bytes the reference may take (--reference-max-gb's default): 80% of a GPU's memory; half the
    physical memory of a CPU machine (it may be shared, and the float64 oracle runs beside the inputs)."""
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf


def reference_too_big(case: Case, dtype: torch.dtype, limit: float) -> str | None:
    """None when the reference fits in `limit` bytes with inputs in `dtype`, else why not ("skipped: ...")."""
    if case.reference_bytes is None:
        return None
    need = float(case.reference_bytes(dtype))
    if need <= limit:
        return None
    return (f"skipped: reference needs ~{need / 1e9:.3g} GB in {str(dtype).replace('torch.', '')} "
            f"> limit {limit / 1e9:.3g} GB")


def _runs_reference(provider: Provider) -> bool:
    return provider.name in ("eager", "compile", "eager-graph") or provider.backend == "reference"


def _float64_on(inputs: dict, device: torch.device) -> dict:
    return {k: (v.detach().to(device, torch.float64) if v.is_floating_point() else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _reference_outputs_and_grads(case: Case, prep: Prepared, inputs: dict, grad_outputs) -> tuple[list, list]:
    """The reference's outputs and gradients on `inputs` (their dtype), the gradients for grad_outputs."""
    with torch.no_grad():
        outs = [o.detach() for o in _as_list(case.reference(**inputs))]
    if not prep.has_backward:
        return outs, []
    _, grads = _forward_backward(case.reference, _grad_copy(inputs, case.grad_inputs), case.grad_inputs,
                                 prep.diff_positions, grad_outputs)
    return outs, grads


def _prepare_substitute(case: Case, device: torch.device, why: str, limit: float) -> Prepared:
    """The oracle from case.substitute_oracle on float64 copies of the inputs (the reference's float64
    run does not fit), on the CPU or, with case.substitute_on_device, on `device`: outputs and gradients
    moved back to `device`. fp16/bf16 cases also need the reference in their dtype (the 2x bound)."""
    why = why.removeprefix("skipped: ")
    if case.substitute_oracle is None:
        raise RuntimeError(f"the float64 {why}, and the case has no substitute_oracle")
    lowp = case.dtype in LOW_PRECISION
    if lowp and reference_too_big(case, case.dtype, limit) is not None:
        raise RuntimeError(f"the float64 {why}, and the substitute oracle cannot give the {case.dtype} bound "
                           f"(2x the reference's own error in that dtype): the {case.dtype} reference does not "
                           f"fit either")
    prep = Prepared(case, case.make_inputs(device), oracle=f"{case.substitute_label} (float64 {why})")
    inputs64 = _float64_on(prep.inputs, device if case.substitute_on_device else torch.device("cpu"))
    if not prep.has_backward:
        with torch.no_grad():
            prep.out64 = [o.detach().to(device) for o in _as_list(case.substitute_oracle(**inputs64))]
    else:  # one forward + backward gives the outputs and the gradients
        grad_in = _grad_copy(inputs64, case.grad_inputs)
        with torch.enable_grad():
            outs = _as_list(case.substitute_oracle(**grad_in))
        prep.diff_positions, grad_outputs = _random_grad_outputs(outs)
        prep.grad_outputs = [g.to(device, case.dtype) for g in grad_outputs]
        grads = torch.autograd.grad([outs[i] for i in prep.diff_positions], [grad_in[n] for n in case.grad_inputs],
                                    [g.to(case.dtype).double() for g in grad_outputs])  # the values the providers get
        prep.out64 = [o.detach().to(device) for o in outs]
        prep.grads64 = [g.to(device) for g in grads]
        del outs, grads, grad_in
    if lowp:
        prep.out_lowp, prep.grads_lowp = _reference_outputs_and_grads(case, prep, prep.inputs, prep.grad_outputs)
    else:  # unused: fp32 is held to FP32_RTOL
        prep.out_lowp, prep.grads_lowp = prep.out64, prep.grads64
    return prep


def prepare_inputs(case: Case, device: torch.device) -> Prepared:
    """The inputs and, where a backward is timed, the fixed grad_outputs (one reference forward gives
    their shapes); no oracle. What --profile needs, and the start of prepare."""
    prep = Prepared(case, case.make_inputs(device))
    if prep.has_backward:
        with torch.enable_grad():
            outs = _as_list(case.reference(**_grad_copy(prep.inputs, case.grad_inputs)))
        prep.diff_positions, prep.grad_outputs = _random_grad_outputs(outs)
    return prep


def prepare(case: Case, device: torch.device, limit: float | None = None) -> Prepared:
    """Inputs and the oracle: the reference in float64, or case.substitute_oracle where that would take
    more than `limit` bytes (default: default_reference_limit)."""
    limit = default_reference_limit(device) if limit is None else limit
    too_big = reference_too_big(case, torch.float64, limit)
    if too_big is not None:
        return _prepare_substitute(case, device, too_big, limit)
    prep = prepare_inputs(case, device)
    inputs = prep.inputs
    with torch.no_grad():
        prep.out_lowp = [o.detach() for o in _as_list(case.reference(**inputs))]
        prep.out64 = [o.detach() for o in _as_list(case.reference(**_grad_copy(inputs, (), torch.float64)))]
    if prep.has_backward:
        grad_in = _grad_copy(inputs, case.grad_inputs)
        _, prep.grads_lowp = _forward_backward(case.reference, grad_in, case.grad_inputs,
                                               prep.diff_positions, prep.grad_outputs)
        _, prep.grads64 = _forward_backward(case.reference, _grad_copy(inputs, case.grad_inputs, torch.float64),
                                            case.grad_inputs, prep.diff_positions,
                                            [g.double() for g in prep.grad_outputs])
    return prep


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def check(provider: Provider, prep: Prepared) -> dict[str, str]:
    """Per mode: "ok", "FAIL: <why>" (wrong result) or "ERROR: <exception>"; rel errs appended."""
    case = prep.case
    vs = "" if prep.oracle is None else f" vs {case.substitute_label}"
    if provider.graph:
        return {m: _check_captured(provider, prep, m, vs) for m in case.modes}
    try:
        with torch.no_grad():
            outs = provider.fn(**prep.inputs)
        problem, err = _compare(outs, prep.out64, prep.out_lowp, "output")
        del outs
    except Exception as e:  # a kernel that raises is reported, never fatal to the run
        return {m: f"ERROR: {_short(e)}" for m in case.modes}
    if problem is not None:
        return {m: f"FAIL: {problem}{vs}" for m in case.modes}
    status = {"forward": f"ok (rel err {err:.1e}{vs})"}
    if prep.has_backward:
        try:
            grad_in = _grad_copy(prep.inputs, case.grad_inputs)
            _, grads = _forward_backward(provider.fn, grad_in, case.grad_inputs, prep.diff_positions,
                                         prep.grad_outputs)
            problem, gerr = _compare(grads, prep.grads64, prep.grads_lowp, "grad")
            back = f"FAIL: {problem}{vs}" if problem else f"ok (grad rel err {gerr:.1e}{vs})"
        except Exception as e:
            back = f"ERROR: {_short(e)}"
        status.update(backward=back, full=back)
    return {m: status[m] for m in case.modes}


@dataclass
class Step:
    """What one measurement calls: setup() untimed, then run(state) timed. Only the backward mode
    has a setup (the forward pass whose graph run() differentiates: a fresh graph per call, so no
    retain_graph, which torch.compile's donated buffers refuse). A captured step (captured_step) also
    has the static inputs its graph reads and the peak memory of its capture."""
    run: Callable[[Any], Any]
    setup: Callable[[], Any] = lambda: None
    inputs: dict | None = None
    peak_mb: float | None = None


def _grad_outputs_of(fn, grad_in: dict, prep: Prepared, own: bool):
    """(positions, grad_outputs): the case's for checked providers; a floor computes something
    else, so it gets fixed random grad_outputs shaped like its own differentiable outputs."""
    if not own:
        return prep.diff_positions, prep.grad_outputs
    with torch.enable_grad():
        return _random_grad_outputs(_as_list(fn(**grad_in)))


def make_step(fn, prep: Prepared, mode: str, own_outputs: bool = False) -> Step:
    """forward: under no_grad (inference). backward: autograd.grad of a graph built untimed.
    full: forward + autograd.grad. own_outputs: fn is a floor (its outputs differ from the case's)."""
    if mode == "forward":
        def forward(_):
            with torch.no_grad():
                return fn(**prep.inputs)
        return Step(forward)
    names = prep.case.grad_inputs
    grad_in = _grad_copy(prep.inputs, names)
    leaves = [grad_in[n] for n in names]
    positions, grad_outputs = _grad_outputs_of(fn, grad_in, prep, own_outputs)

    def forward_with_graph():
        with torch.enable_grad():
            outs = _as_list(fn(**grad_in))
        return [outs[i] for i in positions]

    # A floor may leave some grad inputs unused (a GEMM floor skips LayerNorm weights).
    def grad(diff):
        return torch.autograd.grad(diff, leaves, grad_outputs, allow_unused=own_outputs)

    if mode == "backward":
        return Step(grad, setup=forward_with_graph)
    if mode == "full":
        return Step(lambda _: grad(forward_with_graph()))
    raise ValueError(f"mmfast bench: unknown mode {mode!r}")


# ---- CUDA graphs: the graph providers, and tests/test_cuda_graphs.py ---------------------------------
GRAPH_WARMUP = 3  # calls on a side stream before capture (torch's recipe; DDP needs 11, nothing here does)
GRAPH_NO_BACKWARD = ("skipped: a CUDA graph is timed in the forward and full modes (the backward mode's forward is "
                     "built per call)")


class NotCapturable(RuntimeError):
    pass


def capture_graph(call: Callable[[], Any], device: torch.device, warmup: int = GRAPH_WARMUP):
    """torch's recipe (torch.cuda.graphs docs): `call` warmed up on a side stream (lazy initialization,
    cuBLAS workspaces and Triton autotuning happen there, not in the graph), then one call captured on that
    same stream (as make_graphed_callables does: handles cached per stream exist before capture), with
    host syncs made errors (torch.cuda.set_sync_debug_mode("error")): a sync inside would read values of
    the capture, not of later replays, and is not permitted while capturing. Returns (graph, what the
    captured call returned: static tensors that every replay rewrites, MB the capture allocated: a
    replay allocates nothing). A capture that fails raises NotCapturable."""
    # Autograd graphs left from eager calls and not yet collected (reference cycles) would keep AccumulateGrad
    # nodes bound to the stream they ran on; the captured backward cannot make that stream wait on the capture.
    gc.collect()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    graph = torch.cuda.CUDAGraph()
    old_mode, inner = torch.cuda.get_sync_debug_mode(), None
    try:
        with torch.cuda.graph(graph, stream=stream):
            torch.cuda.set_sync_debug_mode("error")  # inside: graph.__enter__ itself synchronizes
            try:
                outputs = call()
            except Exception as e:
                inner = e  # the cause; ending the broken capture may raise an error of its own
                raise
            finally:
                torch.cuda.set_sync_debug_mode(old_mode)
    except Exception as e:
        raise NotCapturable(f"not capturable in a CUDA graph: {_short(inner or e)}") from e
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return graph, outputs, peak


def captured_step(fn, prep: Prepared, mode: str, capture_inputs: dict | None = None) -> Step:
    """make_step's forward or full step on static copies of the inputs, captured in a CUDA graph; run()
    replays it and returns its static outputs (forward: fn's outputs; full: the gradients). The graph
    reads the copies in step.inputs, holding capture_inputs' values (default: the case's) until a
    caller copies others in. The backward mode has no single graph (its forward is set up per call)."""
    if mode == "backward":
        raise ValueError(f"mmfast bench: {GRAPH_NO_BACKWARD}")
    source = prep.inputs if capture_inputs is None else capture_inputs
    static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in source.items()}
    device = next(v.device for v in static.values() if isinstance(v, torch.Tensor))
    eager = make_step(fn, dataclasses.replace(prep, inputs=static), mode)  # full: leaves share static's storage
    graph, outputs, peak = capture_graph(lambda: eager.run(None), device)

    def replay(_):
        graph.replay()
        return outputs
    return Step(replay, inputs=static, peak_mb=peak)


def _other_values(x):
    """Floating x with neighbours mixed in, 0.75 x + 0.5 x.roll(1) (over the flat order): of x's size, but
    unlike a scaling or a shift not undone by the normalizations that modules apply (LayerNorm, cosine);
    a scalar becomes 1.25 x."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    return 0.75 * x + 0.5 * x.flatten().roll(1).view_as(x)


def _check_captured(provider: Provider, prep: Prepared, mode: str, vs: str) -> str:
    """A graph provider's status in one mode: captured on other input values, then the case's inputs
    copied in and replayed, against the oracle; a value baked in at capture would show here."""
    if mode == "backward":
        return GRAPH_NO_BACKWARD
    try:
        other = {k: _other_values(v) for k, v in prep.inputs.items()}
        step = captured_step(provider.fn, prep, mode, capture_inputs=other)
        with torch.no_grad():
            for key, value in step.inputs.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(prep.inputs[key])
        outs = step.run(None)
        if mode == "forward":
            problem, err = _compare(outs, prep.out64, prep.out_lowp, "output")
            return f"FAIL: {problem}{vs}" if problem else f"ok (rel err {err:.1e}{vs})"
        problem, err = _compare(outs, prep.grads64, prep.grads_lowp, "grad")
        return f"FAIL: {problem}{vs}" if problem else f"ok (grad rel err {err:.1e}{vs})"
    except Exception as e:  # NotCapturable included: that provider's status, the run goes on
        return f"ERROR: {_short(e)}"


def step_for(provider: Provider, prep: Prepared, mode: str) -> Step:
    """The step that times `provider` in `mode`."""
    if provider.graph:
        return captured_step(provider.fn, prep, mode)
    return make_step(provider.fn, prep, mode, own_outputs=provider.name.startswith("floor-"))


# ---- timing and memory ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    memory_calls: int  # first calls: peak memory (min over them); they warm up too
    warmup: int  # more untimed calls (CPU); CUDA warms up for seconds / 10
    min_samples: int
    max_samples: int
    seconds: float  # stop sampling after this much, once min_samples are in


FULL = Budget(memory_calls=3, warmup=1, min_samples=10, max_samples=100, seconds=3.0)
QUICK = Budget(memory_calls=2, warmup=0, min_samples=3, max_samples=10, seconds=0.5)


def _once(step: Step):
    return step.run(step.setup())


def time_steps(steps: list[Step], device: torch.device, budget: Budget) -> list[list[float] | Exception]:
    """Per-call times in ms of each step's run (or the exception it raised).

    The steps take turns, so that what drifts during a case (load from other processes on a shared CPU; on a
    GPU the host's speed, clocks, the allocator) falls on every provider alike and their ratios stay
    meaningful. CPU: one call each per round. CUDA: blocks of calls timed with events (interleaved_blocks);
    timed one step after the other, a host-bound SAM forward of one code measured 1.36x and 0.86x upstream
    in two runs minutes apart on the H200 of 2026-12-04."""
    if device.type == "cuda":
        return _time_cuda(steps, device, budget)
    found: list[list[float] | Exception] = [[] for _ in steps]

    def call(i: int, timed: bool) -> None:
        if isinstance(found[i], Exception):
            return
        try:
            state = steps[i].setup()
            t0 = time.perf_counter()
            steps[i].run(state)
            if timed:
                found[i].append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # e.g. out of memory in one mode: reported, the others go on
            found[i] = e

    for _ in range(budget.warmup):
        for i in range(len(steps)):
            call(i, timed=False)
    start, rounds = time.perf_counter(), 0
    while rounds < budget.max_samples and (rounds < budget.min_samples
                                           or time.perf_counter() - start < budget.seconds * len(steps)):
        for i in range(len(steps)):
            call(i, timed=True)
        rounds += 1
    return found


CUDA_ROUNDS = 10  # blocks per step on CUDA: each step's calls come in this many blocks, the steps taking turns


def interleaved_blocks(calls: list[int | Exception], time_block: Callable[[int, int], list[float]],
                       rounds: int = CUDA_ROUNDS) -> list[list[float] | Exception]:
    """calls[i] calls of step i (an Exception: not run, returned as is), in `rounds` blocks per step taken
    in turns, the order rotating each round; time_block(i, k) runs k calls of step i and returns their times.
    A step that raises keeps its exception and drops out; the others go on."""
    found: list[list[float] | Exception] = [e if isinstance(e, Exception) else [] for e in calls]
    n = len(calls)
    for r in range(rounds):
        for i in [(r + j) % n for j in range(n)]:  # round r starts with step r mod n
            if isinstance(found[i], Exception):
                continue
            k = calls[i] // rounds + (1 if r < calls[i] % rounds else 0)
            if k == 0:
                continue
            try:
                found[i].extend(time_block(i, k))
            except Exception as e:  # e.g. out of memory: reported, the others go on
                found[i] = e
    return found


def _time_cuda(steps: list[Step], device, budget: Budget) -> list[list[float] | Exception]:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # > L2 of H100/H200 (50-60 MB)
    calls: list[int | Exception] = []
    for step in steps:  # warm-up, and how many calls fit the budget
        try:
            torch.cuda.synchronize(device)
            t0, warm = time.perf_counter(), 0
            while warm < 3 or time.perf_counter() - t0 < budget.seconds / 10:  # clocks and caches settle
                _once(step)
                torch.cuda.synchronize(device)
                warm += 1
            per_call = (time.perf_counter() - t0) / warm  # an upper bound (includes the setup)
            calls.append(int(min(budget.max_samples * 10,
                                 max(budget.min_samples * 2, budget.seconds / 2 / max(per_call, 1e-6)))))
        except Exception as e:
            calls.append(e)

    def time_block(i: int, k: int) -> list[float]:
        events = []
        for _ in range(k):
            state = steps[i].setup()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            steps[i].run(state)
            end.record()
            events.append((start, end))
            del state
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]

    return interleaved_blocks(calls, time_block)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80), linear interpolation."""
    q = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(v) for v in q)


_libc = None


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_mb(step: Step, device: torch.device, calls: int) -> float:
    """Peak extra memory of step.run (see the module docstring for how, and its precision)."""
    global _libc
    if step.peak_mb is not None:  # a captured graph: it allocated at capture, a replay allocates nothing
        for _ in range(calls):
            _once(step)  # still the warm-up
        return step.peak_mb
    if device.type == "cpu" and not os.access("/proc/self/clear_refs", os.W_OK):
        for _ in range(calls):
            _once(step)  # still the warm-up
        return math.nan
    if device.type == "cpu" and _libc is None:
        _libc = ctypes.CDLL(None)
    best = math.inf
    for _ in range(calls):
        state = step.setup()
        gc.collect(1)  # the young generations: cycles freed mid-call would hide memory; a full
        #                collect costs 0.5 s once torch._dynamo is loaded (measured)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            result = step.run(state)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
        else:
            if hasattr(_libc, "malloc_trim"):
                _libc.malloc_trim(0)  # freed memory back to the OS: reusing it shows up as growth
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            base = _proc_status_bytes("VmRSS:")
            result = step.run(state)
            peak = _proc_status_bytes("VmHWM:")
        del result, state
        best = min(best, (peak - base) / 2**20)
    return best


# ---- the run ---------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """A folder name for the machine: "cpu-<model short name>-<cores>c" or the CUDA device's name."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = ""
        try:
            with open("/proc/cpuinfo") as f:
                raw = next((ln.split(":", 1)[1] for ln in f if ln.startswith("model name")), "")
        except OSError:
            pass
        raw = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|@.*$|\b(Intel|AMD|Genuine)\b", " ", raw or "unknown")
        raw = f"cpu {raw} {os.cpu_count()}c"
    name = re.sub(r"[^a-z0-9.]+", "-", raw.lower()).strip("-")
    return name or device.type


def setup_torch(compiling: bool) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 (no TF32), as in the checks
    if compiling:  # importing torch._dynamo costs seconds: only when torch.compile is timed
        import torch._dynamo.config as dynamo_config
        # Each case compiles the reference afresh; the default limit of 8 recompiles of one
        # function would silently fall back to eager after a few cases.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 64)


class Progress:
    def __init__(self, total: int):
        self.total, self.done = total, 0

    def line(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text}", flush=True)


@dataclass
class Options:
    ops: list[str]
    device: torch.device
    quick: bool
    out: str
    results_md: str | None
    backends: list[str] | None
    providers: list[str] | None
    bench_dir: str | None
    cases: str | None = None  # regex: only the cases whose label it matches (re.search)
    reference_max_bytes: float | None = None  # None: default_reference_limit(device)
    profile: bool = False  # torch.profiler summaries instead of checks and timings (run_profile)


def run_case(case: Case, opts: Options, progress: Progress, meta: dict) -> list[dict]:
    device, budget = opts.device, (QUICK if opts.quick else FULL)
    where = f"{case.op} {case.label} {device.type}"
    providers = providers_for(case, device, opts.backends, opts.providers)
    limit = default_reference_limit(device) if opts.reference_max_bytes is None else opts.reference_max_bytes
    skipped = reference_too_big(case, case.dtype, limit)  # eager, compile, backend reference: not run
    try:
        prep = prepare(case, device, limit)
        oracle_error = None
        if prep.oracle is not None:
            print(f"  {where}: oracle: {prep.oracle}", flush=True)
    except Exception as e:  # e.g. out of memory in float64: nothing of this case can be checked
        prep, oracle_error = None, f"ERROR: the float64 oracle failed: {_short(e)}"
        print(f"  {where}: {oracle_error}", flush=True)
    if any(p.name == "compile" for p in providers):
        torch._dynamo.reset()  # one compiled reference per case; frees the last case's graphs
    rows = []

    def row(provider: Provider, mode: str, metric: str, values, status: str, **extra) -> dict:
        info = dict(case=case.label, dtype=str(case.dtype).replace("torch.", ""), **case.params,
                    quick=opts.quick, status=status, load=round(os.getloadavg()[0], 1))  # load: CPU contention
        if provider.backend is not None:
            info["backend"] = provider.backend
        if case.series is not None:
            info["series"] = case.series
        if prep is not None and prep.oracle is not None and provider.checked:
            info["oracle"] = prep.oracle
        info.update(extra)
        median, p20, p80 = values
        return dict(kernel=case.op, provider=provider.name, mode=mode, metric=metric, x_name=case.x_name,
                    x_value=case.x_value, extra=json.dumps(info, sort_keys=True), median=median, p20=p20,
                    p80=p80, **meta)

    statuses = {}
    for provider in providers:
        if skipped is not None and _runs_reference(provider):
            statuses[provider.name] = {m: skipped for m in case.modes}
        elif oracle_error is not None:
            statuses[provider.name] = {m: oracle_error for m in case.modes}
        elif provider.checked:
            t0 = time.perf_counter()
            statuses[provider.name] = check(provider, prep)
            took = f" [{time.perf_counter() - t0:.1f} s]" if provider.name == "compile" else ""  # the compile time
            for mode in case.modes:
                print(f"  check {where} {mode:8} {provider.name:14} {statuses[provider.name][mode]}{took}",
                      flush=True)
        else:
            statuses[provider.name] = {m: "ok" for m in case.modes}

    def not_timed(provider: Provider, mode: str, why: str) -> None:
        short = why if why.startswith("skipped") else why.split(":")[0]
        progress.line(f"{where} {mode:8} {provider.name:14} {short} (not timed)")
        rows.append(row(provider, mode, "time_ms", (math.nan,) * 3, why))

    for mode in case.modes:
        ready = []  # (provider, step, peak MB) of the providers timed in this mode
        for provider in providers:
            if not statuses[provider.name][mode].startswith("ok"):
                not_timed(provider, mode, statuses[provider.name][mode])
                continue
            try:
                step = step_for(provider, prep, mode)
                ready.append((provider, step, peak_memory_mb(step, device, budget.memory_calls)))  # warms up too
            except Exception as e:  # e.g. out of memory in one mode: reported, the rest goes on
                not_timed(provider, mode, f"ERROR: {_short(e)}")
        for (provider, _, mem), samples in zip(ready, time_steps([s for _, s, _ in ready], device, budget)):
            if isinstance(samples, Exception):
                not_timed(provider, mode, f"ERROR: {_short(samples)}")
                continue
            median, p20, p80 = quantiles(samples)
            status = statuses[provider.name][mode]
            progress.line(f"{where} {mode:8} {provider.name:14} ... {report.fmt(median)} ms (p20 {report.fmt(p20)}, "
                          f"p80 {report.fmt(p80)}, n={len(samples)}) peak {mem:.1f} MB")
            rows.append(row(provider, mode, "time_ms", (median, p20, p80), status, samples=len(samples)))
            rows.append(row(provider, mode, "peak_mem_mb", (mem, mem, mem), status))
        del ready
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del prep
    report.evaluate_targets(rows, case.targets)
    print("\n" + report.results_table(rows) + "\n", flush=True)
    return rows


# ---- --profile: where the time of a call goes (torch.profiler) --------------------------------------
PROFILE_WARMUP, PROFILE_CALLS = 3, 5  # a few calls: the counts per call are exact, the times indicative
PROFILE_MARK = "mmfast_bench::call"  # record_function around each profiled call
_RUNTIME_API = re.compile(r"^cu(da)?[A-Z]")  # cudaLaunchKernel, cuLaunchKernel, cudaStreamSynchronize, ...
_HOST_SYNC = re.compile(r"Synchronize|^cudaMemcpy$")  # calls that wait for the GPU (cudaMemcpy: blocking)
_DEVICE_WAIT = re.compile(r"Sync$|Wait Event$")  # Kineto's sync records (enable_cuda_sync_events): no GPU work


def profile_providers(case: Case, opts: Options) -> list[Provider]:
    """eager and mmfast (auto) unless --providers names others; never torch.compile (its compile would
    dwarf a profile of a few calls)."""
    found = providers_for(case, opts.device, opts.backends, opts.providers or ["mmfast"])
    return [p for p in found if p.name != "compile"]


def profile_step(step: Step, device: torch.device, calls: int = PROFILE_CALLS) -> dict:
    """`calls` runs of a forward or full step under torch.profiler (after PROFILE_WARMUP untimed ones).
    Per call: host_ms (the call's span on the CPU: Python, dispatch, launches, any wait for the GPU),
    wall_ms (the calls and a final synchronize, over calls), ops (top-level ops: those directly inside
    the call, and autograd nodes on the backward's thread), top_host (name, count, self us: the host
    events inside the calls by self time). On CUDA also gpu_ms (kernels, copies and memsets), kernels,
    syncs (runtime calls that wait for the GPU inside the call) and top_kernels (name, count, us)."""
    from torch.autograd import DeviceType

    cuda = device.type == "cuda"
    for _ in range(PROFILE_WARMUP):
        _once(step)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            with torch.profiler.record_function(PROFILE_MARK):
                step.run(None)
        sync()
        wall = time.perf_counter() - t0
    events = prof.events()
    marks = [e for e in events if e.name == PROFILE_MARK and e.device_type == DeviceType.CPU]
    if len(marks) != calls:
        raise RuntimeError(f"the profile has {len(marks)} '{PROFILE_MARK}' ranges for {calls} calls")
    spans = [(m.time_range.start, m.time_range.end) for m in marks]

    def inside(e) -> bool:
        return any(a <= e.time_range.start <= b for a, b in spans)
    host = [e for e in events if e.device_type == DeviceType.CPU and e.name != PROFILE_MARK and inside(e)]
    ops = [e for e in host if not _RUNTIME_API.match(e.name)
           and (e.cpu_parent is None or e.cpu_parent.name == PROFILE_MARK)]
    found = dict(calls=calls, host_ms=sum(m.time_range.elapsed_us() for m in marks) / calls / 1e3,
                 wall_ms=wall * 1e3 / calls, ops=len(ops) / calls,
                 top_host=_top(host, lambda e: e.self_cpu_time_total, calls))
    if cuda:  # the device side of the annotation (gpu_user_annotation) is a span, not work
        gpu = [e for e in events if e.device_type == DeviceType.CUDA and e.name != PROFILE_MARK
               and not _DEVICE_WAIT.search(e.name)]
        if not gpu:  # zeros would read as "no GPU work"
            raise RuntimeError("the profiler recorded no CUDA activity (is CUPTI available?)")
        found.update(gpu_ms=sum(e.time_range.elapsed_us() for e in gpu) / calls / 1e3,
                     kernels=sum(not e.name.startswith(("Memcpy", "Memset")) for e in gpu) / calls,
                     syncs=sum(bool(_HOST_SYNC.search(e.name)) for e in host if _RUNTIME_API.match(e.name)) / calls,
                     top_kernels=_top(gpu, lambda e: e.time_range.elapsed_us(), calls))
    return found


def _top(events, us, calls: int, n: int = report.PROFILE_TOP) -> list[tuple[str, float, float]]:
    """(name, count per call, us(e) summed per call) of the n names with the most us."""
    totals: dict[str, list[float]] = {}
    for e in events:
        entry = totals.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us(e)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:n]
    return [(name, count / calls, total / calls) for name, (count, total) in ranked]


def profile_case(case: Case, opts: Options) -> list[dict]:
    """profile_step of each profiled provider in the forward and full modes (the backward mode's
    forward is set up per call: profile full); an error is that entry's, the rest goes on."""
    def entry(provider, mode, **found):
        return dict(case=case.label, mode=mode, provider=provider.name, backend=provider.backend, **found)

    providers = profile_providers(case, opts)
    try:
        prep = prepare_inputs(case, opts.device)
    except Exception as e:
        return [entry(p, m, error=f"ERROR: inputs: {_short(e)}") for m in case.modes for p in providers]
    found = []
    for mode in case.modes:
        for provider in providers:
            if mode == "backward":
                found.append(entry(provider, mode, error="skipped: the full mode is profiled instead"))
                continue
            try:
                found.append(entry(provider, mode, **profile_step(step_for(provider, prep, mode), opts.device)))
            except Exception as e:  # out of memory, not capturable, a profiler failure: this entry only
                found.append(entry(provider, mode, error=f"ERROR: {_short(e)}"))
            print(f"  profile {case.op} {case.label} {report.profile_line(found[-1])}", flush=True)
            if opts.device.type == "cuda":
                torch.cuda.empty_cache()
    return found


def run_profile(opts: Options, plan: dict[str, list[Case]], dev_name: str, meta: dict) -> int:
    """--profile: each op's cases profiled, written to <out>/<device>/<op>-profile.txt."""
    out_dir = os.path.join(opts.out, dev_name)
    os.makedirs(out_dir, exist_ok=True)
    header = (f"{opts.device.type} ({dev_name}), torch {meta['torch_version']}, mmfast {meta['mmfast_version']}, "
              f"{meta['timestamp']}: {PROFILE_CALLS} calls per provider after {PROFILE_WARMUP} warm-up calls")
    errors = 0
    for op, cases in plan.items():
        entries = []
        for case in cases:
            entries += profile_case(case, opts)
        path = os.path.join(out_dir, f"{op}-profile.txt")
        with open(path, "w") as f:
            f.write(report.profile_text(op, header, entries))
        print(f"{op}: profile in {path}", flush=True)
        errors += sum(str(e.get("error", "")).startswith("ERROR") for e in entries)
    return 1 if errors else 0


def _module_cases_only(opts: Options) -> bool:
    return opts.profile and not opts.ops and opts.cases is None


def plan_cases(opts: Options, ops: list[str]) -> dict[str, list[Case]]:
    """op -> its cases to run. --cases picks cases by label among all of them (quick or not); --quick then
    only sets the budget. --profile without --op or --cases: the module cases (Case.module)."""
    plan = {op: [c for c in registry.cases(op, opts.device.type, opts.quick and opts.cases is None)
                 if (opts.cases is None or re.search(opts.cases, c.label)) and (c.module or not _module_cases_only(opts))]
            for op in ops}
    return {op: cases for op, cases in plan.items() if cases}


def run(opts: Options) -> int:
    started = time.perf_counter()
    setup_torch(compiling=not opts.profile and (not opts.providers or "compile" in opts.providers))
    known = registry.load(opts.bench_dir)
    ops = opts.ops or sorted(known)
    unknown = [op for op in ops if op not in known]
    if unknown:
        print(f"mmfast bench: unknown op(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
        return 2
    dev_name = device_name(opts.device)
    meta = dict(device=dev_name, torch_version=torch.__version__, mmfast_version=mmfast.__version__,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    plan = plan_cases(opts, ops)
    if not plan:
        why = "is a module case (--profile's default; name cases with --op or --cases)" \
            if _module_cases_only(opts) else f"matches --cases {opts.cases!r}"
        print(f"mmfast bench: no case of {ops} {why}", file=sys.stderr)
        return 2
    if opts.profile:
        rc = run_profile(opts, plan, dev_name, meta)
        print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
        return rc
    total = sum(len(providers_for(c, opts.device, opts.backends, opts.providers)) * len(c.modes)
                for cs in plan.values() for c in cs)
    print(f"mmfast bench on {dev_name} ({opts.device.type}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, mmfast {mmfast.__version__}{', quick' if opts.quick else ''}: "
          f"{total} measurements", flush=True)
    progress, broken, missed = Progress(total), [], []
    out_dir = os.path.join(opts.out, dev_name)
    os.makedirs(out_dir, exist_ok=True)
    for op, cases in plan.items():
        rows: list[dict] = []
        csv_path = os.path.join(out_dir, f"{op}.csv")
        kept = []  # with --cases, the rows of the op's other cases stay in its CSV, table and plot
        if opts.cases is not None and os.path.exists(csv_path):
            ran = {c.label for c in cases}
            kept = [r for r in report.read_csv(csv_path) if report.extra(r)["case"] not in ran]
        try:
            for case in cases:
                rows += run_case(case, opts, progress, meta)
                report.write_csv(csv_path, kept + rows)  # after every case: a killed run keeps what it measured
        finally:
            if rows:
                everything = kept + rows
                report.write_csv(csv_path, everything)
                note = report.plot(everything, os.path.join(out_dir, f"{op}.png"))
                print(f"{op}: {csv_path}; plot: {note}", flush=True)
                if opts.results_md:
                    report.update_results_md(opts.results_md, dev_name, op, report.results_table(everything),
                                             report.stamp(everything))
                    print(f"{op}: table refreshed in {opts.results_md}", flush=True)
        broken += report.broken(rows)
        missed += report.missed_targets(rows)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    if missed:
        print(f"targets missed ({len(missed)}):\n  " + "\n  ".join(missed), flush=True)
    if broken:
        print(f"FAILED or ERRORED implementations ({len(broken)}): not timed\n  " + "\n  ".join(broken), flush=True)
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", action="append", dest="ops", metavar="NAME",
                        help="op to benchmark (repeatable; default: every benchmarks/<op>.py)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and samples (CPU: about 2-3 minutes)")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results); files go "
                        "to OUT/<device-name>/<op>.csv and .png")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--results-md", default=None,
                        help="markdown file whose generated tables are refreshed (default: OUT/../RESULTS.md; "
                             "'none' to skip)")
    parser.add_argument("--backends", default=None,
                        help="comma list of mmfast backends timed besides auto (default: the kernel backends "
                             "available on the device; add 'reference' as a stand-in)")
    parser.add_argument("--providers", default=None,
                        help="comma list of providers to run, e.g. mmfast,floor-gemm (eager always runs)")
    parser.add_argument("--bench-dir", default=None, help="where the benchmarks/<op>.py files are")
    parser.add_argument("--cases", default=None, metavar="REGEX",
                        help="only the cases whose label matches REGEX (re.search), e.g. 'sweep', quick or "
                             "not (--quick then sets only the sample budget); the CSV keeps the rows of the op's "
                             "other cases")
    parser.add_argument("--profile", action="store_true",
                        help="instead of checking and timing: torch.profiler over a few calls of eager and "
                             "mmfast (--providers for others) per case and mode, written to "
                             "OUT/<device-name>/<op>-profile.txt (top CUDA kernels, host vs GPU time, kernels, "
                             "syncs and ops per call); default cases: the drop-in module cases")
    parser.add_argument("--reference-max-gb", type=float, default=None, metavar="GB",
                        help="memory the reference may need (its case's estimate); above it eager, compile and "
                             "the float64 oracle are skipped, and a case's substitute oracle checks mmfast "
                             "(default: half the RAM on CPU, 80%% of the GPU's memory)")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mmfast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out or os.path.join(registry.default_bench_dir(), "results"))
    results_md = args.results_md or os.path.join(os.path.dirname(out), "RESULTS.md")
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None)
    backends = split(args.backends)
    for name in backends or ():
        if name not in _backend.BACKEND_NAMES or name == "auto":
            print(f"mmfast bench: --backends takes {_backend.BACKEND_NAMES[1:]}, got {name!r}", file=sys.stderr)
            return 2
    if args.cases is not None:
        try:
            re.compile(args.cases)
        except re.error as e:
            print(f"mmfast bench: --cases is not a regular expression ({e}): {args.cases!r}", file=sys.stderr)
            return 2
    if args.reference_max_gb is not None and not args.reference_max_gb >= 0:
        print(f"mmfast bench: --reference-max-gb must be >= 0, got {args.reference_max_gb}", file=sys.stderr)
        return 2
    opts = Options(ops=args.ops or [], device=device, quick=args.quick, out=out,
                   results_md=None if results_md.lower() == "none" else results_md,
                   backends=backends, providers=split(args.providers), bench_dir=args.bench_dir,
                   cases=args.cases, profile=args.profile,
                   reference_max_bytes=None if args.reference_max_gb is None else args.reference_max_gb * 1e9)
    return run(opts)
