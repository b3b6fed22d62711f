"""What the examples share: the device, wall time and peak memory of one call, and printing a table."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# The examples run from a checkout (`python examples/NAME.py`) without mmfast being installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pick_device(name: str | None) -> torch.device:
    """--device, else CUDA when there is one."""
    if name is not None:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def peak_memory(fn, device: torch.device):
    """(fn(), bytes): the most memory that fn's allocations held at once, above what was live before it.

    CUDA: the caching allocator's counters. CPU has none, so the profiler records every allocation and free
    (signed sizes, in time order) and the running sum's maximum is the peak; it slows fn, so the examples time
    other calls than the one they measure here."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live = peak = 0
    # kineto's "[memory]" events: + on allocation, - on free, in the order they happened.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return out, peak


@contextlib.contextmanager
def _quiet_native_stderr():
    """Drop what C++ writes to stderr (the profiler's start/stop and no-GPU lines on each use)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
