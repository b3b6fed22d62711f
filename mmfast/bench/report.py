"""The benchmark's outputs: one CSV schema for every op, a PNG per op, tables in RESULTS.md.

CSV (Liger-Kernel style), one row per (case, provider, mode, metric):
  kernel          the op, e.g. similarity_softmax
  provider        eager | compile | floor-<name> | mmfast (backend auto) | mmfast-<backend> |
                  eager-graph, mmfast-graph (CUDA, module cases: eager and mmfast captured in CUDA graphs)
  mode            forward | backward | full
  metric          time_ms | peak_mem_mb
  x_name, x_value the size the case is plotted against (e.g. C, 21843)
  extra           JSON: case label, dtype, shape, quick, status ("ok (rel err ..)", "FAIL: ..",
                  "ERROR: ..", "skipped: .." where the reference would not fit), backend (the one
                  auto resolved to), samples, targets {label: verdict}, load (the 1-minute load
                  average when the row was measured: other jobs on the CPU), series (cases plotted
                  and tabled together against x), oracle (what stood in for the float64 reference)
  median, p20, p80  of the samples (peak_mem_mb: one value thrice); empty when not timed
  device, torch_version, mmfast_version, timestamp
Everything else (speedups, PASS/MISS, tables, plots) is computed from these rows, so
`python -m mmfast report` can redo the tables and plots from CSVs copied from another machine.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re

COLUMNS = ["kernel", "provider", "mode", "metric", "x_name", "x_value", "extra", "median", "p20", "p80",
           "device", "torch_version", "mmfast_version", "timestamp"]
_NUMERIC = ("x_value", "median", "p20", "p80")


# ---- CSV -------------------------------------------------------------------------------------------
def write_csv(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(k, row[k]) for k in COLUMNS})
    os.replace(tmp, path)  # a reader (or a kill mid-write) never sees half a file


def _cell(key: str, value):
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if key == "x_value" and value.is_integer():
            return int(value)  # rows read back (kept by a --cases run) are written as they were: 8192, not 8192.0
    return value


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in _NUMERIC:
            row[key] = float(row[key]) if row[key] != "" else math.nan
    return rows


def extra(row: dict) -> dict:
    return json.loads(row["extra"])


def _is_mmfast(provider: str) -> bool:
    return provider == "mmfast" or provider.startswith("mmfast-")


def baseline_for(provider: str, baseline: str) -> str:
    """The baseline a target compares `provider` with: a CUDA-graph replay (mmfast-graph) against
    upstream replayed too (eager-graph), so that graphs' lack of launch overhead is on both sides."""
    return "eager-graph" if baseline == "eager" and provider.endswith("-graph") else baseline


def _lookup(rows: list[dict]) -> dict:
    """(case, provider, mode, metric) -> median."""
    return {(extra(r)["case"], r["provider"], r["mode"], r["metric"]): r["median"] for r in rows}


# ---- targets ---------------------------------------------------------------------------------------
def evaluate_targets(rows: list[dict], targets) -> None:
    """Write each target's verdict into the extra of the mmfast rows it applies to (time_ms)."""
    if not targets:
        return
    medians = _lookup(rows)
    for row in rows:
        if row["metric"] != "time_ms" or not _is_mmfast(row["provider"]) or math.isnan(row["median"]):
            continue
        info = extra(row)
        verdicts = {}
        for target in targets:
            if row["mode"] not in target.modes:
                continue
            baseline = baseline_for(row["provider"], target.baseline)
            base = medians.get((info["case"], baseline, row["mode"], target.metric), math.nan)
            mine = medians.get((info["case"], row["provider"], row["mode"], target.metric), math.nan)
            # a peak of 0 MB (whole pages: a call that fits in freed ones) beats any baseline
            speedup = base / mine if mine > 0 else (math.inf if base > 0 else math.nan)
            if math.isnan(speedup):
                verdicts[target.label] = f"n/a ({baseline} not timed)"
            else:
                verdicts[target.label] = f"{'PASS' if speedup >= target.min_speedup else 'MISS'} {speedup:.2f}x"
        if verdicts:
            info["targets"] = verdicts
            row["extra"] = json.dumps(info, sort_keys=True)


def missed_targets(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        info = extra(row)
        for label, verdict in info.get("targets", {}).items():
            if verdict.startswith("MISS"):  # "n/a": the baseline failed, listed among the broken
                out.append(f"{row['kernel']} {info['case']} {row['mode']} {row['provider']}: {label}: {verdict}")
    return out


def broken(rows: list[dict]) -> list[str]:
    """Checked providers that were wrong (FAIL) or raised (ERROR)."""
    out = []
    for row in rows:
        status = extra(row)["status"]
        if row["metric"] == "time_ms" and status.startswith(("FAIL", "ERROR")):
            out.append(f"{row['kernel']} {extra(row)['case']} {row['mode']} {row['provider']}: {status}")
    return out


# ---- tables ----------------------------------------------------------------------------------------
def _cases(rows: list[dict]) -> list[str]:
    seen = []
    for row in rows:
        case = extra(row)["case"]
        if case not in seen:
            seen.append(case)
    return seen


def fmt(v: float) -> str:
    """3 significant digits without exponents: 0.0123, 4.56, 45.6, 456, 4560."""
    if math.isnan(v):
        return ""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _series(row: dict) -> str | None:
    return extra(row).get("series")


def _table(title: str, mine: list[dict], medians: dict, x_name: str | None = None) -> str:
    """Markdown table of time_ms rows; x_name: a column with each row's x_value (a series' table)."""
    floors = sorted({r["provider"] for r in mine if r["provider"].startswith("floor-")})
    floors = (["eager-graph"] if any(r["provider"] == "eager-graph" for r in mine) else []) + floors
    head = ["mode"] + ([x_name] if x_name else []) + ["provider", "median ms", "p20-p80 ms", "vs eager"] + \
           [f"vs {f}" for f in floors] + ["peak MB", "check / targets"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in mine:
        info, mode, case = extra(r), r["mode"], extra(r)["case"]
        provider = r["provider"] + (f" ({info['backend']})" if r["provider"] in ("mmfast", "mmfast-graph") else "")
        ratios = [medians.get((case, base, mode, "time_ms"), math.nan) / r["median"] for base in ["eager"] + floors]
        baseline = r["provider"] == "eager" or r["provider"].startswith("floor-")  # not checked
        notes = [] if baseline and info["status"] == "ok" else [info["status"]]  # a baseline's: skipped/ERROR
        notes += [f"{label}: {verdict}" for label, verdict in info.get("targets", {}).items()]
        spread = "" if math.isnan(r["p20"]) else f"{fmt(r['p20'])}-{fmt(r['p80'])}"
        cells = [mode] + ([f"{r['x_value']:g}"] if x_name else []) + [provider, fmt(r["median"]), spread]
        cells += ["" if math.isnan(x) else f"{x:.2f}x" for x in ratios]
        cells += [fmt(medians.get((case, r["provider"], mode, "peak_mem_mb"), math.nan)),
                  "; ".join(notes).replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(rows: list[dict]) -> str:
    """Markdown: one table per case, or per series (its cases' rows by mode, then x); speedups are
    median(baseline) / median(provider)."""
    medians = _lookup(rows)
    parts, tabled = [], set()
    for case in _cases(rows):
        mine = [r for r in rows if extra(r)["case"] == case and r["metric"] == "time_ms"]
        series = _series(mine[0]) if mine else None
        if series is None:
            parts.append(_table(case, mine, medians))
        elif series not in tabled:
            tabled.add(series)
            mine = [r for r in rows if _series(r) == series and r["metric"] == "time_ms"]
            providers = list(dict.fromkeys(r["provider"] for r in mine))
            mine.sort(key=lambda r: (_MODE_ORDER.get(r["mode"], 9), r["x_value"], providers.index(r["provider"])))
            parts.append(_table(f"{series} (series)", mine, medians, x_name=mine[0]["x_name"]))
    return "\n\n".join(parts)


_MODE_ORDER = {"forward": 0, "backward": 1, "full": 2}


def update_results_md(path: str, device: str, op: str, table: str, stamp: str = "") -> None:
    """Replace the text between `<!-- bench:<device>:<op> start -->` and `... end -->`, or append
    a new section; everything outside the markers is left as it is."""
    start, end = f"<!-- bench:{device}:{op} start -->", f"<!-- bench:{device}:{op} end -->"
    text = open(path).read() if os.path.exists(path) else "# mmfast benchmark results\n"
    block = f"{start}\n{stamp}{table}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + f"\n\n### {op} on {device}\n\n{block}\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def stamp(rows: list[dict]) -> str:
    """The line above a generated table: when, with what, how."""
    r = rows[0]
    quick = " --quick" if extra(r).get("quick") else ""
    loads = [extra(row)["load"] for row in rows if "load" in extra(row)]
    load = f", load average {min(loads)}-{max(loads)} during the run" if loads else ""
    return (f"Generated by `python -m mmfast bench --op {r['kernel']}{quick}` on {r['timestamp']} "
            f"(torch {r['torch_version']}, mmfast {r['mmfast_version']}{load}).\n\n")


# ---- --profile -------------------------------------------------------------------------------------
PROFILE_TOP = 15  # kernels and host events listed per provider and mode
PROFILE_COLUMNS = ("host ms/call: the call's span on the CPU (Python, dispatch, launches, any wait for the GPU; "
                   "profiler overhead included). GPU ms/call: kernels, copies and memsets, summed. wall ms/call: "
                   "the calls and a final synchronize, over the calls. ops/call: top-level ops (ATen/mmfast ops "
                   "and Python-level launches directly inside the call, autograd nodes of the backward). "
                   "kernels/call: GPU kernels. syncs/call: runtime calls inside the call that wait for the GPU.")


def _profile_name(entry: dict) -> str:
    backend = entry.get("backend")
    return entry["provider"] + (f" ({backend})" if backend and entry["provider"] in ("mmfast", "mmfast-graph") else "")


def profile_line(entry: dict) -> str:
    """One printed line per profiled (case, mode, provider)."""
    head = f"{entry['mode']:8} {_profile_name(entry):22}"
    if entry.get("error"):
        return f"{head} {entry['error']}"
    gpu = "" if entry.get("gpu_ms") is None else (f", GPU {fmt(entry['gpu_ms'])} ms, {entry['kernels']:g} kernels, "
                                                  f"{entry['syncs']:g} syncs")
    return f"{head} host {fmt(entry['host_ms'])} ms{gpu}, {entry['ops']:g} ops per call"


def _short_name(name: str, width: int = 110) -> str:
    """Kernel names can be whole template instantiations: the start says which kernel."""
    name = name.replace("|", "/")
    return name if len(name) <= width else name[:width - 3] + "..."


def profile_text(op: str, header: str, entries: list[dict]) -> str:
    """The --profile report of one op: per case and mode a summary table of the providers, then each
    provider's top CUDA kernels by GPU time (CUDA) and top host events by self CPU time."""
    lines = [f"# {op}: torch.profiler", "", header, "", PROFILE_COLUMNS, ""]
    for case in dict.fromkeys(e["case"] for e in entries):
        lines += [f"## {case}", ""]
        mine = [e for e in entries if e["case"] == case]
        for mode in dict.fromkeys(e["mode"] for e in mine):
            rows = [e for e in mine if e["mode"] == mode]
            gpu = any(e.get("gpu_ms") is not None for e in rows)
            head = ["provider", "host ms/call"] + (["GPU ms/call"] if gpu else []) + ["wall ms/call", "ops/call"] + \
                   (["kernels/call", "syncs/call"] if gpu else [])
            lines += [f"### {mode}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for e in rows:
                if e.get("error"):
                    cells = [e["error"].replace("|", "/")] + [""] * (len(head) - 2)
                else:
                    cells = [fmt(e["host_ms"])] + ([fmt(e["gpu_ms"])] if gpu else []) + \
                            [fmt(e["wall_ms"]), f"{e['ops']:g}"] + ([f"{e['kernels']:g}", f"{e['syncs']:g}"] if gpu else [])
                lines.append("| " + " | ".join([_profile_name(e)] + cells) + " |")
            lines.append("")
            for e in rows:
                if e.get("error"):
                    continue
                if gpu:
                    lines += _profile_top(f"{_profile_name(e)}: top {PROFILE_TOP} CUDA kernels by GPU time",
                                          "kernel", "us/call", e["top_kernels"], e["gpu_ms"] * 1e3)
                lines += _profile_top(f"{_profile_name(e)}: top {PROFILE_TOP} host events by self CPU time",
                                      "op or runtime call", "self us/call", e["top_host"], e["host_ms"] * 1e3)
    return "\n".join(lines)


def _profile_top(title: str, what: str, unit: str, top, total_us: float) -> list[str]:
    lines = [f"#### {title}", "", f"| {what} | calls/call | {unit} | % |", "|---|---|---|---|"]
    for name, count, us in top:
        share = f"{100 * us / total_us:.1f}" if total_us > 0 else ""
        lines.append(f"| {_short_name(name)} | {count:g} | {fmt(us)} | {share} |")
    return lines + [""]


# ---- plot ------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: str) -> str:
    """Speedup vs eager (above 1: faster) per case (x, ordered by x_value) and provider, a panel per mode,
    at `path`; each series' cases instead get lines of time and peak memory vs x at <path>-<series>.png.
    Returns the paths written, or notes saying why not (matplotlib missing, nothing timed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"skipped ({e}; install matplotlib for plots)"
    notes = []
    single = [r for r in rows if _series(r) is None]
    if single:
        notes.append(_speedup_bars(single, path, plt))
    for series in dict.fromkeys(_series(r) for r in rows if _series(r) is not None):
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", series).strip("-")
        notes.append(_series_lines([r for r in rows if _series(r) == series], series,
                                   f"{os.path.splitext(path)[0]}-{slug}.png", plt))
    return "; ".join(notes)


def _series_lines(rows: list[dict], series: str, path: str, plt) -> str:
    """Median time (p20-p80 band) and peak memory vs x, log-log, a line per provider, a row per mode.
    A provider skipped at some sizes (its reference would not fit) says from where in its legend."""
    from matplotlib.ticker import NullLocator
    times = [r for r in rows if r["metric"] == "time_ms"]
    if not any(not math.isnan(r["median"]) for r in times):
        return f"skipped {series} (nothing was timed)"
    medians = _lookup(rows)
    modes = [m for m in _MODE_ORDER if any(r["mode"] == m for r in times)]
    providers = list(dict.fromkeys(r["provider"] for r in times))
    xs_all = sorted({r["x_value"] for r in times})
    fig, axes = plt.subplots(len(modes), 2, figsize=(11.0, 3.6 * len(modes)), squeeze=False)
    for (ax_t, ax_m), mode in zip(axes, modes):
        for provider in providers:
            mine = sorted((r for r in times if r["provider"] == provider and r["mode"] == mode),
                          key=lambda r: r["x_value"])
            done = [r for r in mine if not math.isnan(r["median"])]
            skipped = [r["x_value"] for r in mine if extra(r)["status"].startswith("skipped")]
            backends = {extra(r).get("backend") for r in done}
            label = provider + (f" ({backends.pop()})" if provider == "mmfast" and len(backends) == 1 else "")
            label += f" (skipped from {mine[0]['x_name']}={min(skipped):g})" if skipped else ""
            if not done:
                ax_t.plot([], [], marker="o", label=label)  # still in the legend, saying why
                continue
            x = [r["x_value"] for r in done]
            line, = ax_t.plot(x, [r["median"] for r in done], marker="o", label=label)
            ax_t.fill_between(x, [r["p20"] for r in done], [r["p80"] for r in done], alpha=0.2,
                              color=line.get_color())
            mem = [medians.get((extra(r)["case"], provider, mode, "peak_mem_mb"), math.nan) for r in done]
            ax_m.plot(x, mem, marker="o", color=line.get_color(), label=provider)
        ax_t.set_yscale("log")
        ax_m.set_yscale("symlog", linthresh=1.0)  # mmfast's peak can be 0 MB (whole pages)
        for ax, what in ((ax_t, "time ms (median, p20-p80)"), (ax_m, "peak memory MB")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all)
            ax.set_xticklabels([f"{x:g}" for x in xs_all], fontsize=7)
            ax.xaxis.set_minor_locator(NullLocator())  # only the measured sizes
            ax.set_xlabel(times[0]["x_name"], fontsize=8)
            ax.set_ylabel(what, fontsize=8)
            ax.set_title(mode, fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.suptitle(f"{rows[0]['kernel']} {series} on {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _speedup_bars(rows: list[dict], path: str, plt) -> str:
    medians = _lookup(rows)
    timed = [r for r in rows if r["metric"] == "time_ms" and not math.isnan(r["median"]) and r["provider"] != "eager"]
    if not timed:
        return "skipped (nothing was timed)"
    cases = sorted(_cases(timed), key=lambda c: next(r["x_value"] for r in timed if extra(r)["case"] == c))
    modes = [m for m in ("forward", "backward", "full") if any(r["mode"] == m for r in timed)]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    labels = {}
    for provider in providers:  # "mmfast (cpu)": the backend auto resolved to, when it is one
        backends = {extra(r).get("backend") for r in timed if r["provider"] == provider}
        labels[provider] = provider + (f" ({backends.pop()})" if provider == "mmfast" and len(backends) == 1 else "")
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6.0, 1.3 * len(cases)), 3.2 * len(modes)), squeeze=False)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes[:, 0], modes):
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, case in enumerate(cases):
                t = medians.get((case, provider, mode, "time_ms"), math.nan)
                base = medians.get((case, "eager", mode, "time_ms"), math.nan)
                if not math.isnan(t / base):
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(base / t)
            ax.bar(xs, ys, width, label=labels[provider])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace(" ", "\n") for c in cases], fontsize=7)
        ax.set_title(mode, fontsize=9)
        ax.set_ylabel("speedup vs eager", fontsize=8)
    axes[0][0].legend(fontsize=7, ncol=min(len(providers), 3))
    fig.suptitle(f"{rows[0]['kernel']} on {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def regenerate(out_dir: str, results_md: str | None) -> list[str]:
    """Redo plots and RESULTS.md tables from every <out_dir>/<device>/<op>.csv; returns what it wrote."""
    written = []
    for device in sorted(os.listdir(out_dir)):
        folder = os.path.join(out_dir, device)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".csv"):
                rows = read_csv(os.path.join(folder, name))
                if not rows:
                    continue
                written.append(plot(rows, os.path.join(folder, name[:-4] + ".png")))
                if results_md:
                    update_results_md(results_md, device, name[:-4], results_table(rows), stamp(rows))
                    written.append(f"{results_md} ({device}, {name[:-4]})")
    return written
