"""pytest-benchmark entry points for the main (--quick) cases of every benchmarks/<op>.py.

    .venv/bin/python -m pytest benchmarks/test_bench.py --benchmark-only [-k "N4096 and forward"]

Not part of the test run (`pytest tests`). The same providers, modes and correctness gate as
`python -m mmfast bench` (mmfast.bench.runner): an implementation that disagrees with the float64
reference fails here instead of being timed. pytest-benchmark times with perf_counter; on CUDA
each call ends with a synchronize. MMFAST_BENCH_ROUNDS sets the timed rounds (default 5).
"""
import os

import pytest
import torch

from mmfast.bench import registry, runner

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = int(os.environ.get("MMFAST_BENCH_ROUNDS", "5"))
runner.setup_torch(compiling=True)


def _params():
    found = []
    for op in sorted(registry.load()):
        for case in registry.cases(op, DEVICE.type, quick=True):
            for provider in runner.providers_for(case, DEVICE):
                for mode in case.modes:
                    label = case.label.replace("=", "").replace(" ", "_")  # -k friendly: fp32_N4096_C1000_D768
                    found.append(pytest.param(case, provider, mode, id=f"{op}-{label}-{provider.name}-{mode}"))
    return found


_prepared_case: dict = {}  # one case's inputs and float64 oracle alive at a time
_statuses: dict = {}


def _prepared(case):
    key = (case.op, case.label)
    if key not in _prepared_case:
        _prepared_case.clear()
        _prepared_case[key] = runner.prepare(case, DEVICE)
    return _prepared_case[key]


def _status(case, provider, mode) -> str:
    key = (case.op, case.label, provider.name)
    if key not in _statuses:
        _statuses[key] = runner.check(provider, _prepared(case)) if provider.checked else {m: "ok" for m in case.modes}
    return _statuses[key][mode]


@pytest.mark.parametrize("case, provider, mode", _params())
def test_bench(benchmark, case, provider, mode):
    status = _status(case, provider, mode)
    if status.startswith("skipped"):  # a reference too big for the device; a graph in the backward mode
        pytest.skip(status)
    if not status.startswith("ok"):
        pytest.fail(f"{provider.name} is not timed: {status}")
    step = runner.step_for(provider, _prepared(case), mode)  # graph providers: captured once, replayed
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def setup():
        state = step.setup()
        sync()
        return (state,), {}

    def run(state):
        step.run(state)
        sync()

    benchmark.group = f"{case.op} {case.label} {mode}"
    benchmark.extra_info.update(case.params, provider=provider.name, backend=provider.backend, status=status)
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1)
