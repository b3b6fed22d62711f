"""Backend selection: precedence, availability, errors that say why."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import backend

IMPLS = ("cuda", "triton", "cpu", "reference")


def test_names_and_default():
    assert backend.BACKEND_NAMES == ("auto", "cuda", "triton", "cpu", "reference")
    assert mmfast.get_backend() == os.environ.get("MMFAST_BACKEND", "auto")


def test_auto_on_cpu_picks_cpp_kernel_and_reference_for_float64():
    assert backend.resolve("op", IMPLS, torch.device("cpu"), torch.float32) == "cpu"
    assert backend.resolve("op", IMPLS, torch.device("cpu"), torch.bfloat16) == "cpu"
    assert backend.resolve("op", IMPLS, torch.device("cpu"), torch.float64) == "reference"
    assert backend.resolve("op", ("reference",), torch.device("cpu"), torch.float32) == "reference"


def test_auto_on_cuda_uses_only_gpu_validated_implementations(monkeypatch):
    monkeypatch.setattr(backend, "_why_unavailable", lambda name, device: None)
    monkeypatch.setattr(backend, "_table", lambda device: None)  # no dispatch table: the validated order
    monkeypatch.setattr(backend, "GPU_VALIDATED", {})
    assert backend.resolve("op", IMPLS, torch.device("cuda"), torch.float16) == backend.UPSTREAM
    monkeypatch.setattr(backend, "GPU_VALIDATED", {"op": ("triton", "cuda")})
    assert backend.resolve("op", IMPLS, torch.device("cuda"), torch.float16) == "triton"
    assert backend.resolve("op", ("cuda", "reference"), torch.device("cuda"), torch.float16) == "cuda"
    # With a table, its order decides among the validated ones; an unvalidated kernel is passed over.
    table = {"ops": {"op": {"float16": {"order": ["cpu", "cuda", "triton", "upstream"]},
                            "float32": {"order": ["upstream"]}}}}
    monkeypatch.setattr(backend, "_table", lambda device: table)
    assert backend.resolve("op", IMPLS, torch.device("cuda"), torch.float16) == "cuda"
    assert backend.resolve("op", IMPLS, torch.device("cuda"), torch.float32) == backend.UPSTREAM
    assert backend.resolve("op", IMPLS, torch.device("cuda"), torch.float32, "triton") == "triton"


def test_precedence_call_over_block_over_global():
    dev, dt = torch.device("cpu"), torch.float32
    try:
        mmfast.set_backend("reference")
        assert backend.resolve("op", IMPLS, dev, dt) == "reference"
        with mmfast.use_backend("cpu"):
            assert mmfast.get_backend() == "cpu"
            assert backend.resolve("op", IMPLS, dev, dt) == "cpu"
            with mmfast.use_backend("reference"):
                assert backend.resolve("op", IMPLS, dev, dt, requested="cpu") == "cpu"
            assert mmfast.get_backend() == "cpu"
        assert mmfast.get_backend() == "reference"
    finally:
        mmfast.set_backend("auto")


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        mmfast.set_backend("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        with mmfast.use_backend("gpu"):
            pass


def test_unavailable_backend_says_why():
    with pytest.raises(mmfast.BackendUnavailableError, match="runs CUDA tensors; these are on cpu"):
        backend.resolve("op", IMPLS, torch.device("cpu"), torch.float32, requested="cuda")
    with pytest.raises(mmfast.BackendUnavailableError, match="has no 'triton' implementation"):
        backend.resolve("op", ("cpu", "reference"), torch.device("cpu"), torch.float32, requested="triton")
    with pytest.raises(mmfast.BackendUnavailableError, match="use backend='reference'"):
        backend.resolve("op", IMPLS, torch.device("cpu"), torch.float64, requested="cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_INTERPRET", False)
    why = backend._why_unavailable("triton", torch.device("cpu"))
    assert why is not None and "TRITON_INTERPRET=1" in why
    assert "triton" not in mmfast.available_backends("cpu")


def test_available_backends_here():
    names = mmfast.available_backends("cpu")
    assert names[-1] == "reference" and "cpu" in names and "cuda" not in names


def test_environment_variable_sets_the_default():
    code = "import mmfast; print(mmfast.get_backend())"
    env = dict(os.environ, MMFAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["MMFAST_BACKEND"] = "nope"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MMFAST_BACKEND must be one of" in bad.stderr


def test_build_facts():
    from mmfast import _C

    assert _C.__version__ == mmfast.__version__
    assert isinstance(_C.cuda_compiled, bool) and _C.openmp_threads() >= 1
    nvcc = shutil.which("nvcc") or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    if torch.version.cuda is not None and nvcc and os.environ.get("MMFAST_SKIP_CUDA", "0") != "1":
        # CI builds and links every .cu file: this machine has nvcc and a CUDA build of torch.
        assert _C.cuda_compiled and "90a" in _C.cuda_archs
