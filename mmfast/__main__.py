"""`python -m mmfast bench|info|report`.

  bench   check every implementation against the float64 reference, then time it (mmfast.bench.runner)
  info    what this installation can run: build facts, versions, backends per device, GPU_VALIDATED
  report  redo the plots and RESULTS.md tables from the CSVs under benchmarks/results (e.g. after
          copying a GPU machine's CSV there)
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys


def info() -> int:
    import torch

    import mmfast
    from mmfast import backend

    print(f"mmfast {mmfast.__version__}")
    if backend._C is None:
        print(f"  extension mmfast._C: not loaded ({backend._C_error}); build it with `make build`")
    else:
        c = backend._C
        cuda = f"yes, archs {c.cuda_archs}" if c.cuda_compiled else "no"
        print(f"  extension mmfast._C {c.__version__}: CUDA compiled: {cuda}; OpenMP threads: {c.openmp_threads()}")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}; GPUs: {', '.join(gpus) or 'none'}); "
          f"torch threads {torch.get_num_threads()}")
    if backend._triton_error is None:
        import triton
        print(f"triton {triton.__version__} (TRITON_INTERPRET={'1' if backend.TRITON_INTERPRET else '0'})")
    else:
        print(f"triton: not importable ({backend._triton_error})")
    devices = ["cpu"] + (["cuda"] if gpus else [])
    for device in devices:
        print(f"available backends on {device}: {', '.join(backend.available_backends(device))}")
    print("ops (backend auto picks, fp32):")
    import mmfast.ops
    for mod in pkgutil.iter_modules(mmfast.ops.__path__):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"mmfast.ops.{mod.name}")
        if not hasattr(module, "IMPLEMENTATIONS"):
            continue
        # the op names a module dispatches on: OP, or CLIP_OP / SIGLIP_OP ... when it holds several
        for op in [v for k, v in vars(module).items() if (k == "OP" or k.endswith("_OP")) and isinstance(v, str)]:
            picks = ", ".join(
                f"{d} -> {backend.resolve(op, module.IMPLEMENTATIONS, torch.device(d), torch.float32, 'auto')}"
                for d in devices)
            print(f"  {op}: implementations {', '.join(module.IMPLEMENTATIONS)}; auto: {picks}")
    print("GPU_VALIDATED (mmfast/backend.py; auto on CUDA uses only these):")
    if backend.GPU_VALIDATED:
        for op, names in backend.GPU_VALIDATED.items():
            print(f"  {op}: {', '.join(names)}")
    else:
        print("  (empty: on CUDA, auto runs upstream's computation until a kernel is validated by benchmarks/gpu_check.sh)")
    from mmfast import tuning
    for device in devices:
        if device == "cuda":
            table = backend._table(torch.device("cuda"))
            print(f"dispatch table on cuda: {table['device'] + ' (' + table['source'] + ')' if table else 'none'}")
    print(f"dispatch tables committed (mmfast/tuning): {', '.join(tuning.available_tables()) or 'none'}")
    return 0


def _tune(args) -> int:
    import torch

    from mmfast import backend, tuning

    device, capability = args.device, args.compute_capability
    if device is None or capability is None:
        if not torch.cuda.is_available():
            print("mmfast tune: no CUDA device here: pass --device and --compute-capability", file=sys.stderr)
            return 2
        found = backend._cuda_device_class(torch.cuda.current_device())
        device, capability = device or found[0], capability or found[1]
    out = args.out or tuning.table_path(device)
    table = tuning.write_table(args.results, out, device=device, compute_capability=capability, source=args.source)
    print(f"dispatch table for {device} (sm {capability}): {out}")
    for op, per_dtype in sorted(table["ops"].items()):
        for dtype, entry in sorted(per_dtype.items()):
            print(f"  {op:20} {dtype:9} auto -> {' > '.join(entry['order'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from mmfast.bench import runner
    runner.add_arguments(sub.add_parser("bench", help="check, then time, every implementation"))
    sub.add_parser("info", help="build facts, versions, backends")
    rep = sub.add_parser("report", help="redo plots and RESULTS.md tables from the CSVs")
    rep.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    rep.add_argument("--results-md", default=None, help="default: OUT/../RESULTS.md")
    tune = sub.add_parser("tune", help="write the dispatch table of `auto` from a GPU run's bench CSVs")
    tune.add_argument("results", help="folder of the run's CSVs (searched recursively)")
    tune.add_argument("--device", default=None, help="device class (default: this machine's CUDA device)")
    tune.add_argument("--compute-capability", default=None, help="e.g. 9.0 (default: this machine's)")
    tune.add_argument("--source", default="", help="what the run was (date, versions), kept in the table")
    tune.add_argument("--out", default=None, help="default: mmfast/tuning/<device>.json")
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "tune":
        return _tune(args)
    if args.command == "bench":
        return runner.main(args)
    from mmfast.bench import registry, report
    out = os.path.abspath(args.out or os.path.join(registry.default_bench_dir(), "results"))
    for line in report.regenerate(out, args.results_md or os.path.join(os.path.dirname(out), "RESULTS.md")):
        print(line)
    return 0


if __name__ == "__main__":
    import signal
    # `timeout` sends SIGTERM: leave through the runner's finally blocks, so a bench cut short
    # still writes the CSV, plot and table of what it measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
