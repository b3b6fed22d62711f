"""The dtype coverage guard of tests/conftest.py (MMFAST_COVERAGE_GUARD=1): its rule on made-up outcomes, and
the plugin itself in a pytest subprocess, serial and under pytest-xdist, on a tiny stand-in test file."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import DEVICES, backend_device_params, claimed_combinations, dtypes_for, missing_combinations

F32, F16, BF16 = "torch.float32", "torch.float16", "torch.bfloat16"
CLAIMS = {f: [("cuda", "cuda", F32), ("cuda", "cuda", F16), ("triton", "cuda", BF16), ("cpu", "cpu", F32)]
          for f in ("test_a.py", "test_b.py")}


def test_a_combination_without_a_passing_test_is_missing():
    outcomes = [("test_a.py", "cuda", "cuda", F32, True), ("test_a.py", "cuda", "cuda", F16, False),  # skipped
                ("test_a.py", "triton", "cuda", BF16, False), ("test_a.py", "triton", "cuda", BF16, True)]
    # cpu: no test on it ran (-k "cuda"); test_b.py: not selected. Neither is in scope.
    assert missing_combinations(CLAIMS, outcomes) == ([("test_a.py", "cuda", "cuda", F16)], 3)
    outcomes.append(("test_a.py", "cuda", "cuda", F16, True))
    assert missing_combinations(CLAIMS, outcomes) == ([], 3)


def test_a_selected_file_is_held_to_every_device_the_run_tested():
    """test_b.py ran on cuda only, but the run tested the CPU too (test_a.py): its cpu combination is missing,
    as are the CUDA combinations that test_b.py never generated."""
    outcomes = [("test_a.py", *c, True) for c in CLAIMS["test_a.py"]] + [("test_b.py", "cuda", "cuda", F32, True)]
    missing, in_scope = missing_combinations(CLAIMS, outcomes)
    assert in_scope == 8
    assert missing == [("test_b.py", "cpu", "cpu", F32), ("test_b.py", "cuda", "cuda", F16),
                       ("test_b.py", "triton", "cuda", BF16)]


def test_nothing_ran_means_nothing_in_scope():
    assert missing_combinations(CLAIMS, []) == ([], 0)


def test_the_claims_are_the_backend_and_dtype_parameters_here():
    claims = claimed_combinations(["test_x.py"])["test_x.py"]
    assert claims == [(*p.values, str(dt)) for p in backend_device_params() for dt in dtypes_for(*p.values)]
    assert ("cpu", "cpu", BF16) in claims  # the C++ kernels are built and tested in bf16 on this CPU


# ---- the plugin, in a subprocess ----------------------------------------------------------------------------
# A stand-in op test file, named as one of the guarded ones, with one trivial test per claimed combination;
# SKIP_COMBINATION skips one, as a kernel missing from the build would.
STAND_IN = textwrap.dedent("""
    import os

    import pytest
    from conftest import backend_device_params, dtypes_for

    PARAMS = [pytest.param(*p.values, dt, id=f"{p.id}-{str(dt)[6:]}")
              for p in backend_device_params() for dt in dtypes_for(*p.values)]


    @pytest.mark.parametrize("backend, device, dtype", PARAMS)
    def test_combination(backend, device, dtype):
        if f"{backend}-{device}-{dtype}" == os.environ.get("SKIP_COMBINATION"):
            pytest.skip("no kernel in this build")
""")


@pytest.fixture
def run_stand_in(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_similarity_softmax.py").write_text(STAND_IN)
    root = str(Path(__file__).resolve().parents[1])

    def run(*args, **env):
        # Without this run's PYTEST_* (its xdist worker's, PYTEST_ADDOPTS): a plain run of the stand-in.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        environ.update(env, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                              cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=240)
    return run


def test_the_plugin_fails_a_run_that_skips_a_claimed_combination_under_xdist(run_stand_in):
    pytest.importorskip("xdist", reason="pytest-xdist (requirements.txt) is not installed in this environment")
    claimed = len(claimed_combinations()["test_similarity_softmax.py"])
    result = run_stand_in("-n", "2", MMFAST_COVERAGE_GUARD="1", SKIP_COMBINATION="cpu-cpu-torch.bfloat16")
    out = result.stdout
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out + result.stderr
    assert f"{claimed - 1} passed, 1 skipped" in out, out  # the guard is the only failure
    assert f"FAILED: 1 of {claimed} claimed" in out and "test_similarity_softmax.py: cpu-cpu-torch.bfloat16" in out


def test_the_plugin_passes_a_complete_run(run_stand_in):
    claimed = len(claimed_combinations()["test_similarity_softmax.py"])
    result = run_stand_in(MMFAST_COVERAGE_GUARD="1")
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert f"all {claimed} claimed combinations on {', '.join(DEVICES)} passed" in result.stdout, result.stdout
