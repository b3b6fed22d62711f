"""Smoke test of the benchmark runner (`python -m mmfast bench`): a tiny op end to end with --quick.

Four cases of one tiny op, each with a different "mmfast" implementation: a correct one, a wrong
one, one whose forward is right but whose gradient is wrong, and one that raises. The runner must
time the correct one, refuse to time the wrong results (FAIL), report the exception (ERROR), go
on, and exit non-zero; the CSV must have the one schema. torch.compile is left out (--providers):
its first compile costs ~30 s here.
"""
import csv
import json

import pytest
import torch

from mmfast.__main__ import main
from mmfast.bench import Case, Target, registry, report
from mmfast.reference import similarity_softmax as ref

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
