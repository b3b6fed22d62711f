"""Smoke test of the benchmark runner (`python -m mmfast bench`): a tiny op end to end with --quick.

Four cases of one tiny op, each with a different "mmfast" implementation: a correct one, a wrong
one, one whose forward is right but whose gradient is wrong, and one that raises. The runner must
time the correct one, refuse to time the wrong results (FAIL), report the exception (ERROR), go
on, and exit non-zero; the CSV must have the one schema. torch.compile is left out (--providers):
its first compile costs ~30 s here.
"""
import csv
import dataclasses
import importlib.util
import json

import pytest
import torch

from mmfast.__main__ import main
from mmfast.bench import Case, Target, registry, report, runner
from mmfast.reference import similarity_softmax as ref
from mmfast.testing import rel_err

OP = "tiny_similarity_smoke"
SCALE = 10.0


def _reference(image, text):
    return ref.similarity_softmax(image, text, SCALE)


def _wrong_grad(image, text):
    out = _reference(image, text)
    return out + 0.5 * (out - out.detach())  # same values, gradient scaled by 1.5


def _raises(image, text):
    raise RuntimeError("kernel not built")


IMPLS = {"good": _reference, "wrong": lambda image, text: _reference(image, text) * 1.01,
         "wrong-grad": _wrong_grad, "raises": _raises}


def _case(name, impl) -> Case:
    def make_inputs(device):
        gen = torch.Generator().manual_seed(0)
        return {"image": torch.randn(8, 16, generator=gen).to(device),
                "text": torch.randn(12, 16, generator=gen).to(device)}

    return Case(op=OP, label=f"{name} N=8 C=12", dtype=torch.float32, x_name="C", x_value=12,
                params={"N": 8, "C": 12, "D": 16}, make_inputs=make_inputs, reference=_reference,
                mmfast=lambda image, text, backend: impl(image, text), backends=("reference",),
                grad_inputs=("image", "text"), floors={"gemm": lambda image, text: image @ text.T},
                targets=(Target("at most 100x slower than eager", "eager", 0.01),))


@pytest.fixture
def tiny_op():
    registry.register(OP)(lambda device, quick: [_case(name, impl) for name, impl in IMPLS.items()])
    yield OP
    registry.unregister(OP)


def test_bench_quick_end_to_end(tiny_op, tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["bench", "--op", tiny_op, "--quick", "--device", "cpu", "--out", str(out),
               "--providers", "mmfast,floor-gemm"])
    printed = capsys.readouterr().out
    assert rc == 1, "a FAILed or ERRORed implementation must make the run fail"

    csv_files = list(out.glob(f"*/{OP}.csv"))
    assert len(csv_files) == 1, list(out.rglob("*"))
    with open(csv_files[0], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.COLUMNS
        rows = list(reader)
    by_key = {(json.loads(r["extra"])["case"].split()[0], r["provider"], r["mode"], r["metric"]): r for r in rows}
    status = {k: json.loads(r["extra"])["status"] for k, r in by_key.items()}

    # The correct implementation and the baselines are timed in all three modes, with memory.
    for provider in ("eager", "floor-gemm", "mmfast"):
        for mode in ("forward", "backward", "full"):
            row = by_key[("good", provider, mode, "time_ms")]
            assert float(row["p20"]) <= float(row["median"]) <= float(row["p80"]) and float(row["median"]) > 0
            assert float(by_key[("good", provider, mode, "peak_mem_mb")]["median"]) >= 0
            assert row["device"] and row["torch_version"] == torch.__version__ and row["x_value"] == "12"
    assert status[("good", "mmfast", "forward", "time_ms")].startswith("ok (rel err")
    targets = json.loads(by_key[("good", "mmfast", "forward", "time_ms")]["extra"])["targets"]
    assert list(targets) == ["at most 100x slower than eager"]

    # Wrong results are refused (no time, no memory); a raising kernel is reported and the run goes on.
    for mode in ("forward", "backward", "full"):
        assert status[("wrong", "mmfast", mode, "time_ms")].startswith("FAIL: output[0]: rel err")
        assert by_key[("wrong", "mmfast", mode, "time_ms")]["median"] == ""
        assert ("wrong", "mmfast", mode, "peak_mem_mb") not in by_key
        assert status[("raises", "mmfast", mode, "time_ms")] == "ERROR: RuntimeError: kernel not built"
    # A wrong gradient blocks the backward and full timings only.
    assert status[("wrong-grad", "mmfast", "forward", "time_ms")].startswith("ok")
    for mode in ("backward", "full"):
        assert status[("wrong-grad", "mmfast", mode, "time_ms")].startswith("FAIL: grad[0]: rel err")
    assert "FAIL (not timed)" in printed and "ERROR (not timed)" in printed
    assert "FAILED or ERRORED implementations (8)" in printed

    results_md = (tmp_path / "RESULTS.md").read_text()
    device = csv_files[0].parent.name
    assert f"<!-- bench:{device}:{OP} start -->" in results_md and f"<!-- bench:{device}:{OP} end -->" in results_md
    assert "| forward | mmfast (reference) |" in results_md


def test_results_md_keeps_hand_written_text(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nhand-written intro\n\n"
                    "<!-- bench:dev:op start -->\nold\n<!-- bench:dev:op end -->\n\nnotes\n")
    report.update_results_md(str(path), "dev", "op", "new table")
    report.update_results_md(str(path), "dev2", "op", "other table")
    text = path.read_text()
    assert "hand-written intro" in text and "notes" in text and "old" not in text
    assert text.index("new table") < text.index("notes") < text.index("other table")


# ---- references too big for the machine: skipped baselines, a substitute oracle --------------------
BIG_OP = "tiny_similarity_too_big"
SUBSTITUTE = "the reference in float64 on the CPU (test stand-in)"
oracle_calls = []


def _substitute(image, text):
    oracle_calls.append((image.dtype, image.device.type))
    return _reference(image, text)


def _sized_case(columns: int, impl=_reference, name="good") -> Case:
    def make_inputs(device):
        gen = torch.Generator().manual_seed(columns)
        return {"image": torch.randn(8, 16, generator=gen).to(device),
                "text": torch.randn(columns, 16, generator=gen).to(device)}

    return Case(op=BIG_OP, label=f"{name} N=8 C={columns}", dtype=torch.float32, x_name="C", x_value=columns,
                params={"N": 8, "C": columns}, make_inputs=make_inputs, reference=_reference,
                mmfast=lambda image, text, backend: impl(image, text), backends=("cpu", "reference"),
                grad_inputs=("image", "text"), modes=("full",), series=f"{name} sweep",
                reference_bytes=lambda dtype: 8 * columns * dtype.itemsize,  # one N x C buffer
                substitute_oracle=_substitute, substitute_label=SUBSTITUTE)


@pytest.fixture
def big_op():
    # With a fake limit of 1000 bytes: C=12 fits in fp32 and fp64 (the float64 reference is the oracle),
    # C=20 fits in fp32 only (eager timed, substitute oracle), C=48 in neither (eager skipped too).
    cases = [_sized_case(c) for c in (12, 20, 48)] + [_sized_case(48, IMPLS["wrong"], "wrong")]
    registry.register(BIG_OP)(lambda device, quick: cases)
    yield BIG_OP
    registry.unregister(BIG_OP)


def _rows_by_case(csv_path):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {(json.loads(r["extra"])["case"], r["provider"], r["metric"]): r for r in rows}


def test_bench_skips_a_reference_that_does_not_fit(big_op, tmp_path, capsys):
    out, md = tmp_path / "results", tmp_path / "RESULTS.md"
    oracle_calls.clear()
    args = ["bench", "--op", big_op, "--device", "cpu", "--out", str(out), "--results-md", str(md),
            "--providers", "mmfast,mmfast-reference", "--backends", "reference", "--reference-max-gb", "1e-6",
            "--quick"]
    rc = main(args)
    printed = capsys.readouterr().out
    assert rc == 1 and "FAILED or ERRORED implementations (1)" in printed, "skips are no failures; wrong is one"
    (csv_path,) = out.glob(f"*/{big_op}.csv")
    rows = _rows_by_case(csv_path)
    status = {k: json.loads(r["extra"])["status"] for k, r in rows.items()}

    assert status[("good N=8 C=12", "mmfast", "time_ms")].startswith("ok (grad rel err")
    assert "vs" not in status[("good N=8 C=12", "mmfast", "time_ms")]  # the float64 reference
    for case in ("good N=8 C=20", "good N=8 C=48"):
        assert status[(case, "mmfast", "time_ms")].endswith(f"vs {SUBSTITUTE})")
        assert SUBSTITUTE in json.loads(rows[(case, "mmfast", "time_ms")]["extra"])["oracle"]
        assert float(rows[(case, "mmfast", "time_ms")]["median"]) > 0
    assert float(rows[("good N=8 C=20", "eager", "time_ms")]["median"]) > 0  # fits in fp32: still timed
    skipped = status[("good N=8 C=48", "eager", "time_ms")]
    assert skipped == "skipped: reference needs ~1.54e-06 GB in float32 > limit 1e-06 GB"
    assert rows[("good N=8 C=48", "eager", "time_ms")]["median"] == ""
    assert ("good N=8 C=48", "eager", "peak_mem_mb") not in rows
    assert status[("good N=8 C=48", "mmfast-reference", "time_ms")] == skipped  # mmfast's reference backend too
    assert status[("good N=8 C=20", "mmfast-reference", "time_ms")].endswith(f"vs {SUBSTITUTE})")
    assert status[("wrong N=8 C=48", "mmfast", "time_ms")].startswith("FAIL: output[0]: rel err")
    assert status[("wrong N=8 C=48", "mmfast", "time_ms")].endswith(f"vs {SUBSTITUTE}")
    # The substitute ran in float64 on the CPU: once per case that needed it (outputs and gradients).
    assert oracle_calls == [(torch.float64, "cpu")] * 3

    # A series is one table (rows by x) and one plot of time and memory vs x.
    text = md.read_text()
    assert "**good sweep (series)**" in text and "| full | 48 | eager |  |" in text
    assert text.index("| full | 12 | mmfast") < text.index("| full | 20 | mmfast") < text.index("| full | 48 | mmfast")
    if importlib.util.find_spec("matplotlib") is not None:  # plots need it
        assert (csv_path.parent / f"{big_op}-good-sweep.png").exists()

    # --cases reruns some cases and keeps the other cases' rows in the CSV (and so in the table).
    rc = main(args + ["--cases", "^good N=8 C=12$"])
    assert rc == 0
    again = _rows_by_case(csv_path)
    assert set(again) == set(rows)
    rerun = ("good N=8 C=12", "mmfast", "time_ms")
    assert again[rerun]["timestamp"] >= rows[rerun]["timestamp"]
    assert main(args + ["--cases", "no such case"]) == 2


def test_substitute_oracle_in_low_precision_needs_the_reference_in_that_dtype():
    """A bf16 case whose float64 reference does not fit: the substitute gives the float64 values, the bf16
    reference (if it fits) the 2x bound; if that does not fit either, the case cannot be gated."""
    case = _sized_case(48)
    case.dtype = torch.bfloat16
    fp32_inputs = case.make_inputs
    case.make_inputs = lambda device: {k: v.to(torch.bfloat16) for k, v in fp32_inputs(device).items()}
    with pytest.raises(RuntimeError, match="cannot give the torch.bfloat16 bound"):
        runner.prepare(case, torch.device("cpu"), limit=700)  # bf16 needs 768 bytes
    oracle_calls.clear()
    prep = runner.prepare(case, torch.device("cpu"), limit=1000)  # float64 needs 3072
    assert oracle_calls == [(torch.float64, "cpu")] and SUBSTITUTE in prep.oracle
    inputs = {k: v.detach().requires_grad_() for k, v in prep.inputs.items()}
    out = _reference(**inputs)
    assert inputs["image"].dtype == torch.bfloat16
    torch.testing.assert_close(prep.out_lowp[0], out.detach(), rtol=0, atol=0)
    grads = torch.autograd.grad(out, list(inputs.values()), prep.grad_outputs[0])
    for got, want in zip(prep.grads_lowp, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="substitute_oracle needs reference_bytes"):
        Case(op=BIG_OP, label="x", dtype=torch.float32, x_name="C", x_value=1, params={}, make_inputs=None,
             reference=_reference, mmfast=None, backends=(), substitute_oracle=_substitute)


def _substitute_oracle_cases():
    registry.load()
    sweeps = {op: next(c for c in registry.cases(op, "cpu", quick=False) if c.series)
              for op in ("clip_loss", "siglip_loss")}
    return [pytest.param(sweeps["clip_loss"], id="clip-sweep-cpu64"),
            pytest.param(sweeps["siglip_loss"], id="siglip-sweep-cpu64"),
            pytest.param(next(c for c in registry.cases("clip_loss", "cuda", quick=False) if c.substitute_on_device),
                         id="clip-gpu-chunked64")]


@pytest.mark.parametrize("case", _substitute_oracle_cases())
def test_contrastive_substitute_oracles_match_the_reference(case, monkeypatch):
    """The loss cases' substitute oracles against the float64 reference they replace at large B: value and
    both gradients. The sweep's (mmfast's CPU block operators in float64) with B over 3 x 3 of the kernel's
    512-row tiles; the GPU case's (open_clip's loss in float64 column chunks, hand-written backward), run
    here on the CPU with 256-column chunks: 5 chunks, the last one short."""
    monkeypatch.setitem(case.substitute_oracle.__globals__, "GPU_CHUNK", 256)  # the benchmark module's
    assert case.substitute_oracle is not None
    gen = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(1100, 24, generator=gen, dtype=torch.float64), dim=-1)
    noise = torch.randn(image.shape, generator=gen, dtype=image.dtype)
    text = torch.nn.functional.normalize(image + 0.5 * noise, dim=-1)
    results = []
    for fn in (case.substitute_oracle, case.reference):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_()]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for name, got, want in zip(("loss", "grad image", "grad text"), *results):
        assert got.dtype == torch.float64
        assert rel_err(got, want) < 1e-12, name


# ---- --profile and the CUDA-graph providers (the parts a CPU can check) ------------------------------
PROFILE_OP = "tiny_similarity_profile"


@pytest.fixture
def profile_op():
    cases = [dataclasses.replace(_case("good", IMPLS["good"]), op=PROFILE_OP, module=True),  # --profile's default
             dataclasses.replace(_case("raises", IMPLS["raises"]), op=PROFILE_OP)]
    registry.register(PROFILE_OP)(lambda device, quick: cases)
    yield PROFILE_OP
    registry.unregister(PROFILE_OP)


def test_profile_writes_the_summary_per_case_and_mode(profile_op, tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["bench", "--op", profile_op, "--profile", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1, "a provider that raised is an error of the run"
    (path,) = out.glob(f"*/{profile_op}-profile.txt")
    text = path.read_text()
    assert text.startswith(f"# {profile_op}: torch.profiler")
    assert f"{runner.PROFILE_CALLS} calls per provider after {runner.PROFILE_WARMUP} warm-up calls" in text
    for label in ("good N=8 C=12", "raises N=8 C=12"):
        section = text.split(f"## {label}\n")[1].split("\n## ")[0]
        for mode in ("forward", "backward", "full"):
            assert f"### {mode}\n" in section
        assert "| provider | host ms/call | wall ms/call | ops/call |" in section
        assert "GPU" not in section and "kernels/call" not in section, "no CUDA columns on the CPU"
        assert "| eager | skipped: the full mode is profiled instead |" in section  # backward
        assert "#### eager: top 15 host events by self CPU time" in section
        assert "compile" not in section and "floor-gemm" not in section  # eager and mmfast only
    good = text.split("## good N=8 C=12\n")[1].split("\n## ")[0]
    assert "#### mmfast (reference): top 15 host events by self CPU time" in good
    forward = good.split("### forward\n")[1].split("### backward")[0]
    eager_row = next(ln for ln in forward.splitlines() if ln.startswith("| eager |")).split("|")
    assert float(eager_row[2]) > 0 and float(eager_row[4]) >= 3  # host ms; ops: normalize x2, mm, softmax...
    assert "| aten::" in forward
    raises = text.split("## raises N=8 C=12\n")[1]
    assert "| mmfast (reference) | ERROR: RuntimeError: kernel not built |" in raises
    assert "profile tiny_similarity_profile good N=8 C=12 forward  eager" in printed
    assert not list(out.glob("*/*.csv")), "--profile neither checks nor times"


def test_profile_counts_ops_per_call_exactly():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    step = runner.Step(lambda _: torch.softmax(a @ b, dim=-1))  # matmul (mm inside) and softmax: 2 top-level
    found = runner.profile_step(step, torch.device("cpu"), calls=3)
    assert found["calls"] == 3 and found["ops"] == 2
    assert found["host_ms"] > 0 and found["wall_ms"] >= found["host_ms"] * 0.5
    names = {name: count for name, count, _ in found["top_host"]}
    assert names["aten::mm"] == 1 and names["aten::softmax"] == 1 and runner.PROFILE_MARK not in names
    assert "gpu_ms" not in found and "top_kernels" not in found


def test_profile_defaults_to_the_module_cases(profile_op):
    opts = runner.Options(ops=[], device=torch.device("cpu"), quick=False, out="", results_md=None, backends=None,
                          providers=None, bench_dir=None, profile=True)
    assert [c.label for c in runner.plan_cases(opts, [profile_op])[profile_op]] == ["good N=8 C=12"]
    opts.ops = [profile_op]  # named: every case of the op
    assert len(runner.plan_cases(opts, [profile_op])[profile_op]) == 2
    opts.ops, opts.profile = [], False  # the bench itself runs every case
    assert len(runner.plan_cases(opts, [profile_op])[profile_op]) == 2


def test_other_libraries_are_checked_and_timed_under_their_own_name(tmp_path, capsys):
    """Case.others (Inf-CL for clip_loss): checked against the oracle like mmfast, a wrong one is refused,
    and the dispatch table never reads them (their rows have no mmfast provider name)."""
    case = dataclasses.replace(_case("good", IMPLS["good"]), others={"otherlib": IMPLS["good"],
                                                                     "badlib": IMPLS["wrong"]})
    assert [(p.name, p.checked) for p in runner.providers_for(case, torch.device("cpu"), only=["otherlib"])] == [
        ("eager", False), ("otherlib", True)]
    registry.register(OP)(lambda device, quick: [case])
    try:
        rc = main(["bench", "--op", OP, "--quick", "--device", "cpu", "--out", str(tmp_path),
                   "--providers", "otherlib,badlib"])
    finally:
        registry.unregister(OP)
    capsys.readouterr()
    assert rc == 1  # badlib FAILed
    with open(next(tmp_path.glob(f"*/{OP}.csv")), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "time_ms"]
    status = {r["provider"]: json.loads(r["extra"])["status"] for r in rows if r["mode"] == "full"}
    assert status["otherlib"].startswith("ok (grad rel err") and status["badlib"].startswith("FAIL: output[0]")
    from mmfast import tuning
    assert "otherlib" not in json.dumps(tuning.choose(rows))


def test_graph_providers_only_for_module_cases_on_cuda():
    module, plain = _case("good", IMPLS["good"]), _case("good", IMPLS["good"])
    module.module = True
    names = lambda case, device, only=None: [p.name for p in runner.providers_for(case, torch.device(device), only=only)]
    assert not any(n.endswith("-graph") for n in names(module, "cpu") + names(plain, "cuda"))
    # providers_for makes no CUDA call: the CUDA provider list can be checked without a GPU
    graph = [p for p in runner.providers_for(module, torch.device("cuda")) if p.graph]
    assert [(p.name, p.checked) for p in graph] == [("eager-graph", True), ("mmfast-graph", True)]
    assert graph[0].fn is module.reference and graph[1].backend is not None
    # --providers mmfast-graph brings its baseline eager-graph (and eager, as always)
    assert names(module, "cuda", ["mmfast-graph"]) == ["eager", "eager-graph", "mmfast-graph"]


def test_graph_rows_are_compared_with_upstream_captured():
    """A target against eager is read against eager-graph for mmfast-graph, and the table has that column."""
    def row(provider, median):
        info = {"case": "c", "status": "ok", "backend": "cuda"}
        return dict(kernel="k", provider=provider, mode="forward", metric="time_ms", x_name="B", x_value=1.0,
                    extra=json.dumps(info), median=median, p20=median, p80=median)
    rows = [row("eager", 10.0), row("mmfast", 8.0), row("eager-graph", 4.0), row("mmfast-graph", 5.0)]
    report.evaluate_targets(rows, [Target("faster than upstream", "eager", 1.0)])
    verdicts = {r["provider"]: report.extra(r).get("targets") for r in rows}
    assert verdicts["mmfast"] == {"faster than upstream": "PASS 1.25x"}
    assert verdicts["mmfast-graph"] == {"faster than upstream": "MISS 0.80x"}  # 4 / 5, not 10 / 5
    table = report.results_table(rows)
    assert "| vs eager | vs eager-graph |" in table and "| mmfast-graph (cuda) | 5 |" in table
    assert report.missed_targets(rows) == ["k c forward mmfast-graph: faster than upstream: MISS 0.80x"]


def _stand_in_capture(replay_recomputes: bool, fails: str | None = None):
    """runner.capture_graph without a GPU: the "graph" reruns the call into the captured outputs on replay,
    or (replay_recomputes=False) keeps the capture's values, as a graph that baked them in would."""
    def capture(call, device, warmup=runner.GRAPH_WARMUP):
        if fails:
            raise runner.NotCapturable(f"not capturable in a CUDA graph: {fails}")
        outputs = call()

        class Graph:
            def replay(self):
                if replay_recomputes:
                    new = call()
                    with torch.no_grad():
                        for old, value in zip(runner._as_list(outputs), runner._as_list(new)):
                            old.copy_(value)
        return Graph(), outputs, 1.5
    return capture


def test_a_graph_provider_is_checked_by_a_replay_on_other_values(monkeypatch):
    """The bench's graph plumbing with a stand-in for the CUDA graph: the check captures on halved inputs,
    copies the case's in and replays, so a replay that keeps the capture's values FAILs; the backward mode is
    skipped; a capture failure is the provider's ERROR; a captured step's peak is the capture's."""
    case = _case("good", IMPLS["good"])
    prep = runner.prepare(case, torch.device("cpu"))
    provider = runner.Provider("mmfast-graph", lambda **kw: case.mmfast(**kw, backend="auto"), checked=True, graph=True)
    monkeypatch.setattr(runner, "capture_graph", _stand_in_capture(True))
    status = runner.check(provider, prep)
    assert status["forward"].startswith("ok (rel err") and status["full"].startswith("ok (grad rel err")
    assert status["backward"] == runner.GRAPH_NO_BACKWARD and runner.GRAPH_NO_BACKWARD.startswith("skipped:")
    step = runner.step_for(provider, prep, "full")
    assert runner.peak_memory_mb(step, torch.device("cpu"), 2) == 1.5
    with pytest.raises(ValueError, match="forward and full modes"):
        runner.step_for(provider, prep, "backward")

    monkeypatch.setattr(runner, "capture_graph", _stand_in_capture(False))
    status = runner.check(provider, prep)
    assert status["forward"].startswith("FAIL: output[0]: rel err") and status["full"].startswith("FAIL: grad[0]: rel err")

    monkeypatch.setattr(runner, "capture_graph", _stand_in_capture(True, fails="RuntimeError: a sync"))
    status = runner.check(provider, prep)
    assert status["forward"] == status["full"] == \
        "ERROR: NotCapturable: not capturable in a CUDA graph: RuntimeError: a sync"


def test_cuda_timing_interleaves_blocks_of_the_providers():
    """The CUDA timer's schedule (interleaved_blocks, no GPU needed): every step gets its calls, in CUDA_ROUNDS
    blocks taken in turns with the first step rotating, and a step that raises drops out alone."""
    log = []

    def time_block(i, k):
        log.append((i, k))
        if i == 2 and len([e for e in log if e[0] == 2]) == 3:
            raise RuntimeError("out of memory")
        return [float(i)] * k

    found = runner.interleaved_blocks([25, 10, 40, ValueError("not run")], time_block, rounds=5)
    assert found[0] == [0.0] * 25 and found[1] == [1.0] * 10
    assert isinstance(found[3], ValueError) and all(i != 3 for i, _ in log)
    assert isinstance(found[2], RuntimeError)  # raised in its third block; the others went on
    assert [i for i, _ in log[:4]] == [0, 1, 2, 1]  # round 0 from step 0, round 1 from step 1 (3 is skipped)
    assert [k for i, k in log if i == 0] == [5] * 5 and sum(k for i, k in log if i == 1) == 10
    assert runner.interleaved_blocks([3], lambda i, k: [1.0] * k, rounds=5) == [[1.0] * 3]  # fewer calls than rounds


def test_tensor_core_ab_script_runs_both_settings(tmp_path):
    """benchmarks/_tensor_core_ab.py (a gpu_check.sh stage) on the CPU with tiny shapes: each setting of
    MMFAST_CUDA_TENSOR_CORES in its own process, one table row per case; the CPU kernels ignore the switch, so both
    settings' results must agree exactly (~15 s)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "_tensor_core_ab.py"
    table = tmp_path / "ab.md"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--small", "--reps", "1", "--out",
                           str(table)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table.read_text().splitlines()[2:]
    assert len(rows) == 5, rows
    for row in rows:
        assert row.rstrip(" |").endswith("0.00e+00"), row
