"""The dispatch tables behind `backend="auto"` on a GPU: per device class, op and dtype, which
implementation a GPU run of the benchmark measured fastest — or `upstream` when no mmfast kernel beat
upstream's own computation there.

One JSON file per device class beside this file (`nvidia-h200.json`), written from a GPU run's bench CSVs
by `python -m mmfast tune RESULTS_DIR` (benchmarks/gpu_check.sh does it) and committed. Its shape:

    {"device": "nvidia-h200", "compute_capability": "9.0", "source": ..., "rule": ...,
     "ops": {"<bench op>": {"<dtype>": {"order": ["upstream"], "inference_order": ["cuda", "upstream"],
                                         "speedup": {...}}}}}

`order` lists the implementations that were at least as fast as upstream eager in every measured case and
mode of that op and dtype (fastest first by geometric-mean speedup), then "upstream"; `inference_order`,
where present, the same over the forward (no_grad) measurements alone: calls made with autograd off use it. `backend.resolve`
walks it and takes the first implementation that GPU_VALIDATED also lists (correctness stays decided
there). The keys are the bench's op names: `sam_attention` and `perceiver_resampler` are the drop-in
module cases (SAM's TwoWayTransformer, the Perceiver Resampler), so they govern the modules; the others
are the functional ops (and the loss/zero-shot modules, which are thin wrappers of them). A bench case
whose params name a "dispatch" class gets its own entry "<op>:<class>" (similarity_softmax's top-k mode,
"similarity_softmax:topk": on the H200 of 2026-12-04 the CUDA kernel was 1.2-1.6x eager without top-k in
fp32 and 0.82x in the top-k backward), which the op looks up for such calls.

Otherwise one entry per (op, dtype), not per shape: with the few cases a GPU run times, a kernel takes
`auto` only where it won every case of its dtype (the 2026-12-04 run had e.g. the CUDA core 2.6x SDPA on
SAM's fp32 shape and 0.28x on the bf16 one: per-dtype entries separate those).
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os
from collections import defaultdict

TABLE_DIR = os.path.dirname(os.path.abspath(__file__))
UPSTREAM = "upstream"
# A kernel takes `auto` only when eager / kernel >= this in every case and mode of its op and dtype. Not 1.0:
# medians of one case moved by up to ~10% between two runs on the H200 (2026-12-04, the fp32 top-k backward:
# 1.01x, then 0.91x), so a near-tie goes to upstream's own computation.
MIN_SPEEDUP = 1.05
_DTYPE_NAMES = {"float32", "float16", "bfloat16"}


def table_path(device_class: str) -> str:
    return os.path.join(TABLE_DIR, f"{device_class}.json")


def _is_order(order) -> bool:
    return isinstance(order, list) and bool(order) and order[-1] == UPSTREAM


def load_table(path: str) -> dict:
    """A dispatch table, checked: a malformed file is an error naming it, never a silent `auto` change."""
    with open(path) as f:
        table = json.load(f)
    ops = table.get("ops") if isinstance(table, dict) else None
    if not isinstance(ops, dict):
        raise ValueError(f"mmfast: dispatch table {path} has no 'ops' object")
    for op, per_dtype in ops.items():
        if not isinstance(per_dtype, dict):
            raise ValueError(f"mmfast: dispatch table {path}: ops.{op} must map dtypes to entries; got {per_dtype!r}")
        for dtype, entry in per_dtype.items():
            if dtype not in _DTYPE_NAMES or not isinstance(entry, dict) or not all(
                    _is_order(entry.get(key, [UPSTREAM])) for key in ("order", "inference_order")) or "order" not in entry:
                raise ValueError(f"mmfast: dispatch table {path}: ops.{op}.{dtype} must be a float32/float16/"
                                 f"bfloat16 entry whose 'order' (and 'inference_order') list ends with 'upstream'; "
                                 f"got {entry!r}")
    return table


def available_tables() -> dict[str, dict]:
    """device class -> table, for every committed table."""
    return {os.path.basename(p)[:-5]: load_table(p) for p in sorted(glob.glob(os.path.join(TABLE_DIR, "*.json")))}


def table_for(device_class: str, compute_capability: str | None) -> dict | None:
    """The table of this device class, else one measured on a device of the same compute capability
    (an H100 uses the H200's: the same sm_90 kernels, and the ratios between implementations carry over
    better than no table at all), else None."""
    tables = available_tables()
    if device_class in tables:
        return tables[device_class]
    same_arch = [t for t in tables.values() if compute_capability and t.get("compute_capability") == compute_capability]
    return same_arch[0] if same_arch else None


# ---- writing a table from a GPU run's CSVs ------------------------------------------------------------
def _time_rows(results_dir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "*.csv"), recursive=True)):
        with open(path, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("metric") == "time_ms"]
    return rows


def choose(rows: list[dict], min_speedup: float = MIN_SPEEDUP) -> dict:
    """ops -> dtype -> {"order": [...], "speedup": {impl: {case: {mode: eager / impl}}}} from bench rows.

    A provider's implementation is its "backend" (mmfast-<backend>, or what `mmfast` = auto ran). An
    implementation qualifies for (op, dtype) when it passed the bench's correctness gate and was at least
    min_speedup x eager in every case and mode where eager was timed; a failed or missing measurement
    disqualifies it. The reference backend never qualifies: it is mmfast's oracle, not a kernel."""
    eager: dict = {}
    timed: dict = defaultdict(dict)  # (op, dtype, impl) -> {(case, mode): ms or None for a failure}
    cases: dict = defaultdict(set)  # (op, dtype) -> {(case, mode)} with an eager time
    for r in rows:
        extra = json.loads(r["extra"])
        op, dtype, case, mode = r["kernel"], extra.get("dtype"), extra.get("case"), r["mode"]
        if extra.get("dispatch"):  # a shape class the op dispatches apart (backend.resolve's shape_class)
            op = f"{op}:{extra['dispatch']}"
        median = float(r["median"]) if r["median"] not in ("", "nan") else math.nan
        ok = str(extra.get("status", "")).startswith("ok") and math.isfinite(median)
        if r["provider"] == "eager":
            if ok:
                eager[(op, dtype, case, mode)] = median
                cases[(op, dtype)].add((case, mode))
            continue
        impl = extra.get("backend")
        if not r["provider"].startswith("mmfast") or r["provider"].endswith("-graph") or impl in (None, "reference", UPSTREAM):
            continue
        timed[(op, dtype, impl)][(case, mode)] = median if ok else None
    table: dict = defaultdict(dict)
    for (op, dtype), measured in sorted(cases.items()):
        speedups = {}
        for (op2, dtype2, impl), times in timed.items():
            if (op2, dtype2) != (op, dtype):
                continue
            ratios = {cm: (eager[(op, dtype, *cm)] / times[cm]) if times.get(cm) else 0.0 for cm in measured}
            speedups[impl] = ratios
        per_case: dict = {}
        for impl, rs in sorted(speedups.items()):
            for (case, mode), x in sorted(rs.items()):
                per_case.setdefault(impl, {}).setdefault(case, {})[mode] = round(x, 3)
        entry = {"order": _ranked(speedups, min_speedup) + [UPSTREAM], "speedup": per_case}
        # Inference (the bench's forward mode, under no_grad) ranked on its own where a training mode was timed
        # too: on the H200 of 2026-12-04 the fp32 Perceiver's CUDA core was 1.93x upstream forward, 0.78x full.
        forward_only = {i: {cm: x for cm, x in rs.items() if cm[1] == "forward"} for i, rs in speedups.items()}
        if any(cm[1] != "forward" for cm in measured) and any(cm[1] == "forward" for cm in measured):
            entry["inference_order"] = _ranked(forward_only, min_speedup) + [UPSTREAM]
        table[op][dtype] = entry
    return {op: dict(v) for op, v in table.items()}


def _ranked(speedups: dict, min_speedup: float) -> list[str]:
    """The implementations at least min_speedup x eager in every measurement, fastest first (geometric mean)."""
    winners = [i for i, rs in speedups.items() if rs and min(rs.values()) >= min_speedup]
    return sorted(winners, key=lambda i: -math.exp(sum(math.log(x) for x in speedups[i].values()) / len(speedups[i])))


def write_table(results_dir: str, out_path: str, *, device: str, compute_capability: str, source: str,
                min_speedup: float = MIN_SPEEDUP) -> dict:
    rows = _time_rows(results_dir)
    if not rows:
        raise ValueError(f"mmfast tune: no time_ms rows in the CSVs under {results_dir}")
    ops = choose(rows, min_speedup)
    # A run that benchmarked some ops only (a GPU check cut short by its caps) keeps the earlier table's other
    # ops, and says so: each op's entry comes from one run.
    kept = {}
    if os.path.exists(out_path):
        earlier = load_table(out_path)
        if earlier.get("device") == device:
            kept = {op: entry for op, entry in earlier["ops"].items() if op not in ops}
    if kept:
        source += f"; kept from the earlier table ({earlier.get('source', 'no source')}): {', '.join(sorted(kept))}"
    table = {
        "device": device,
        "compute_capability": compute_capability,
        "source": source,
        "rule": f"order: implementations >= {min_speedup}x upstream eager in every case and mode of the op and "
                "dtype, fastest first (geometric mean), then upstream; speedup: eager / implementation per case",
        "ops": {**kept, **ops},
    }
    with open(out_path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    return table
