"""mmfast/mma.cuh's tensor-core wrappers (mma.m16n8k16 bf16/fp16 -> fp32, ldmatrix) without a GPU.

tests/native/cuda_emulation.h emulates both on CPU threads with the PTX ISA's fragment layouts. The probes
below build fragments and read results lane by lane with this file's own copy of the PTX tables (and closed
forms for index-coded matrices), so a layout mistake in the emulator fails here even where a kernel makes the
matching mistake; the tile GEMM of tests/native/mma_tile_gemm.cu then checks a kernel's fragment bookkeeping
(ldmatrix addressing, .trans for a row-major B, ragged edges) against a float64 GEMM. nvcc compiles the same
file for sm_80 and sm_90a, which assembles the real inline PTX.
"""
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from test_cuda_emulation import compile_driver

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "tests" / "native"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("mma_emulated", NATIVE / "mma_tile_gemm.cu", tmp_path_factory)  # test-only, beside the driver


# ---- the PTX tables, written out independently of the C++ (PTX ISA, "Matrix Fragments for mma.m16n8k16
# with floating point type"; g = lane >> 2, t = lane % 4; the lower 16 bits hold the lower column / k) ------
def bits16(x, dtype):
    """The 16-bit patterns of x rounded to dtype, as Python ints."""
    return [v & 0xFFFF for v in x.to(dtype).view(torch.int16).flatten().tolist()]


def pack(lo, hi):
    return lo | hi << 16


def a_fragment(A, lane, dtype):
    g, t = lane >> 2, lane % 4
    e = lambda r, c: bits16(A[r, c], dtype)[0]
    return [pack(e(g, 2 * t), e(g, 2 * t + 1)), pack(e(g + 8, 2 * t), e(g + 8, 2 * t + 1)),
            pack(e(g, 2 * t + 8), e(g, 2 * t + 9)), pack(e(g + 8, 2 * t + 8), e(g + 8, 2 * t + 9))]


def b_fragment(B, lane, dtype):
    g, t = lane >> 2, lane % 4
    e = lambda k, n: bits16(B[k, n], dtype)[0]
    return [pack(e(2 * t, g), e(2 * t + 1, g)), pack(e(2 * t + 8, g), e(2 * t + 9, g))]


def cd_positions(lane):
    g, t = lane >> 2, lane % 4
    return [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]


def run_mma_probe(driver, tmp_path, dtype_name, problems):
    """One mma per warp on (A 16x16, B 16x8, C 16x8) float64 tensors, fragments built by the table above; returns
    each warp's D as the 32 lanes' 4 values, [warp][lane][i]."""
    dtype = DTYPES[dtype_name]
    payload = struct.pack("<i", len(problems))
    for A, B, C in problems:
        for lane in range(32):
            c = [C[r, col].item() for r, col in cd_positions(lane)]
            payload += struct.pack("<6I4f", *a_fragment(A, lane, dtype), *b_fragment(B, lane, dtype), *c)
    (tmp_path / "mma.in").write_bytes(payload)
    subprocess.run([str(driver), "mma", dtype_name, str(tmp_path / "mma.in"), str(tmp_path / "mma.out")], check=True,
                   timeout=120, capture_output=True)
    d = struct.unpack(f"<{128 * len(problems)}f", (tmp_path / "mma.out").read_bytes())
    return [[list(d[128 * w + 4 * lane:128 * w + 4 * lane + 4]) for lane in range(32)] for w in range(len(problems))]


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_mma_fragment_layout_closed_form(driver, tmp_path, dtype_name):
    """Index-coded matrices whose every D entry is known per lane in closed form (all values exact in bf16/fp16
    and in the fp32 sums): A[m, k] = 16 m + k times a selector B picks A's column n (or n + 8), so lane (g, t)
    must hold 16 g + 2 t, 16 g + 2 t + 1, 16 (g + 8) + 2 t, ... ; a selector A (identity) times B[k, n] = 8 k + n
    must give 8 g + 2 t, ...; C = 1000 * (lane + 1) + i is added in place. Four warps, one problem each (the
    warps must not see each other's fragments)."""
    coded_a = torch.arange(256, dtype=torch.float64).reshape(16, 16)
    coded_b = torch.arange(128, dtype=torch.float64).reshape(16, 8)
    select = lambda shift: torch.tensor([[1.0 if k == n + shift else 0.0 for n in range(8)] for k in range(16)])
    C = torch.zeros(16, 8, dtype=torch.float64)
    c_coded = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        for i, (r, col) in enumerate(cd_positions(lane)):
            c_coded[r, col] = 1000 * (lane + 1) + i
    problems = [(coded_a, select(0), C), (coded_a, select(8), C), (torch.eye(16, dtype=torch.float64), coded_b, C),
                (coded_a, select(0), c_coded)]
    d = run_mma_probe(driver, tmp_path, dtype_name, problems)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        assert d[0][lane] == [16 * g + 2 * t, 16 * g + 2 * t + 1, 16 * (g + 8) + 2 * t, 16 * (g + 8) + 2 * t + 1], lane
        assert d[1][lane] == [16 * g + 2 * t + 8, 16 * g + 2 * t + 9, 16 * (g + 8) + 2 * t + 8,
                              16 * (g + 8) + 2 * t + 9], lane
        assert d[2][lane] == [8 * g + 2 * t, 8 * g + 2 * t + 1, 8 * (g + 8) + 2 * t, 8 * (g + 8) + 2 * t + 1], lane
        assert d[3][lane] == [v + 1000 * (lane + 1) + i for i, v in enumerate(d[0][lane])], lane
    # Spot values straight from the PTX figure: lane 0 holds D[0][0:2], D[8][0:2]; lane 31 (g 7, t 3) D[7][6:8],
    # D[15][6:8].
    assert d[0][0] == [0, 1, 128, 129] and d[0][31] == [118, 119, 246, 247]


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_mma_random_fragments_match_float64(driver, tmp_path, dtype_name):
    """Random A, B, C (two warps): each lane's D equals C + A @ B at the table's positions, to the fixed-order fp32
    summation's bound (16 additions, exact products)."""
    g = torch.Generator().manual_seed(5)
    dtype = DTYPES[dtype_name]
    problems = [(torch.randn(16, 16, generator=g, dtype=torch.float64).to(dtype).double(),
                 torch.randn(16, 8, generator=g, dtype=torch.float64).to(dtype).double(),
                 torch.randn(16, 8, generator=g, dtype=torch.float64).float().double()) for _ in range(2)]
    d = run_mma_probe(driver, tmp_path, dtype_name, problems)
    for w, (A, B, C) in enumerate(problems):
        want = A @ B + C
        scale = A.abs() @ B.abs() + C.abs()
        for lane in range(32):
            for i, (r, col) in enumerate(cd_positions(lane)):
                err = abs(d[w][lane][i] - want[r, col].item())
                assert err <= 17 * 2.0 ** -24 * scale[r, col].item(), (w, lane, i, d[w][lane][i], want[r, col].item())


def test_ldmatrix_layouts(driver, tmp_path):
    """ldmatrix x4, x2, x1 and their .trans against the PTX table: lanes 8j..8j+7 address rows 0..7 of matrix j
    (here rows scattered through shared memory in random order, two warps with different rows), lane l receives
    (row l/4, cols 2(l%4), +1) of matrix j in r[j], or of its transpose; x2 and x1 ignore the addresses of lanes
    16-31 and 8-31. Every stored element is its own index, so a wrong row, column or half shows. A shuffle between
    the loads must still see its neighbour's value."""
    warps, n_rows, words = 2, 80, 15
    rows = list(range(8 * n_rows))  # element (row s, col c) of shared memory holds 8 s + c
    rng = random.Random(3)
    row_of_thread = rng.sample(range(n_rows), 32 * warps)
    payload = struct.pack(f"<2i{8 * n_rows}H{32 * warps}i", warps, n_rows, *rows, *row_of_thread)
    (tmp_path / "ld.in").write_bytes(payload)
    subprocess.run([str(driver), "ldmatrix", str(tmp_path / "ld.in"), str(tmp_path / "ld.out")], check=True,
                   timeout=120, capture_output=True)
    out = struct.unpack(f"<{words * 32 * warps}I", (tmp_path / "ld.out").read_bytes())
    for w in range(warps):
        def element(j, i, c):  # (row i, col c) of matrix j: the row lane 8j + i of warp w addressed
            return 8 * row_of_thread[32 * w + 8 * j + i] + c

        for lane in range(32):
            r, c = lane // 4, 2 * (lane % 4)
            plain = [pack(element(j, r, c), element(j, r, c + 1)) for j in range(4)]
            trans = [pack(element(j, c, r), element(j, c + 1, r)) for j in range(4)]
            got = list(out[words * (32 * w + lane):words * (32 * w + lane + 1)])
            assert got[0:4] == plain, (w, lane, "x4")
            assert got[4:6] == plain[:2], (w, lane, "x2")
            assert got[6:7] == plain[:1], (w, lane, "x1")
            assert got[7:11] == trans, (w, lane, "x4.trans")
            assert got[11:13] == trans[:2], (w, lane, "x2.trans")
            assert got[13:14] == trans[:1], (w, lane, "x1.trans")
            assert got[14] == (32 * w + lane) ^ 1, (w, lane, "shuffle")
    # Closed form for warp 0, lane 5 (row 1, cols 2-3; transposed: rows 2-3, col 1) of matrix 0.
    row = row_of_thread
    assert out[words * 5] == pack(8 * row[1] + 2, 8 * row[1] + 3)
    assert out[words * 5 + 7] == pack(8 * row[2] + 1, 8 * row[3] + 1)


def test_ldmatrix_misaligned_row_aborts(driver, tmp_path):
    """A row address off 16-byte alignment (lane 3's, by one element) stops the emulated kernel with a message,
    where a GPU would fault."""
    payload = struct.pack("<2i256H32i", 1, 32, *range(256), *range(32))
    (tmp_path / "ld.in").write_bytes(payload)
    run = subprocess.run([str(driver), "ldmatrix", str(tmp_path / "ld.in"), str(tmp_path / "ld.out"), "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "lane 3 of warp 0 passes a row address" in run.stderr and "not 16-byte aligned" in run.stderr


# (M, N, K): whole tiles; every dimension ragged (K not a multiple of 16 either); single elements; K = 0.
GEMM_SHAPES = {"64x64x64": (64, 64, 64), "37x19x40": (37, 19, 40), "33x65x17": (33, 65, 17), "1x1x1": (1, 1, 1),
               "5x3x0": (5, 3, 0)}


@pytest.mark.parametrize("shape", GEMM_SHAPES.values(), ids=GEMM_SHAPES.keys())
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_mma_tile_gemm_emulated(driver, dtype_name, shape):
    """The tile GEMM (2x2 warps, 32x32x32 shared-memory tiles, ldmatrix x4 for A, x4.trans for the row-major B,
    zero-padded edges) against float64 of the same rounded inputs. Exact products summed in fp32: every entry
    within the recursive summation bound K 2^-24 sum_k |a_ik b_kj| (bound_ratio <= 1), the whole within 1e-6 in
    the Frobenius norm; no NaN (a missed write or a read past an input) and no write past C."""
    run = subprocess.run([str(driver), "gemm", dtype_name, *map(str, shape)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    values = run.stdout.split()
    got = {name: float(values[values.index(name) + 1]) for name in ("bound_ratio", "rel_fro", "bad")}
    assert got["bad"] == 0, run.stdout
    assert got["bound_ratio"] <= 1.0, run.stdout
    assert got["rel_fro"] <= 1e-6, run.stdout


def test_mma_kernels_compile_for_sm80_and_sm90a(tmp_path):
    """nvcc compiles tests/native/mma_tile_gemm.cu (host and device code) for sm_80 and sm_90a with the package's
    flags, so ptxas assembles mma.cuh's inline PTX for both; the sm_90a PTX must hold the tensor-core
    instructions themselves (not the __trap fallback). ~5 s."""
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not os.path.exists(nvcc):
        pytest.skip("needs nvcc")
    flags = ["-O3", "-std=c++20", "--use_fast_math", f"-I{ROOT / 'csrc' / 'include'}"]
    source = str(NATIVE / "mma_tile_gemm.cu")
    built = subprocess.run([nvcc, *flags, "-c", "-gencode=arch=compute_80,code=sm_80",
                            "-gencode=arch=compute_90a,code=sm_90a", source, "-o", str(tmp_path / "mma.o")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-6000:]
    ptx = subprocess.run([nvcc, *flags, "-ptx", "-arch=sm_90a", source, "-o", str(tmp_path / "mma.ptx")],
                         capture_output=True, text=True, timeout=300)
    assert ptx.returncode == 0, ptx.stderr[-6000:]
    text = (tmp_path / "mma.ptx").read_text()
    for instruction in ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x2.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x1.shared.b16", "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16"):
        assert instruction in text, instruction
    assert "trap;" not in text


def ptxas_report(source: Path, tmp_path) -> dict:
    """Compile `source` as the package builds it (torch's nvcc flags) for sm_90a with ptxas -v and return
    {mangled kernel name: {"registers": R, "spills": spill store + load bytes}}."""
    import re

    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not os.path.exists(nvcc):
        pytest.skip("needs nvcc")
    built = subprocess.run([nvcc, "-O3", "-std=c++20", "--use_fast_math", *COMMON_NVCC_FLAGS,
                            f"-I{ROOT / 'csrc' / 'include'}", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                            "-c", str(source), "-o", str(tmp_path / "kernels.o")],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-6000:]
    # ptxas -v: "Compiling entry function '<mangled>'", then "... N bytes spill stores, M bytes spill loads"
    # and "Used R registers".
    kernels, current = {}, None
    for line in built.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = m.group(1)
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            kernels.setdefault(current, {})["spills"] = int(m.group(1)) + int(m.group(2))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            kernels.setdefault(current, {})["registers"] = int(m.group(1))
    return kernels


def assert_compiled_without_spills(kernels: dict, mangled: str, readable: str):
    """The kernel whose Itanium-mangled name contains `mangled` is in the ptxas report and spills nothing (a spill
    puts local-memory traffic in the inner loop)."""
    import re

    pattern = re.compile(mangled)
    found = [k for k in kernels if pattern.search(k)]
    assert found, f"{readable} was not compiled"
    info = kernels[found[0]]
    print(f"{readable}: {info['registers']} registers, {info['spills']} bytes spilled")
    assert info["spills"] == 0, f"{readable} spills: {info}"


def test_cross_attention_kernels_compile_for_sm90a_without_spills(tmp_path):
    """csrc/cuda/cross_attention.cu for sm_90a: every tensor-core kernel (forward, dK/dV, dQ) for fp16 and bf16 at
    each padded head dim is there and keeps its fragments in registers. Prints the register table. ~20 s."""
    kernels = ptxas_report(ROOT / "csrc" / "cuda" / "cross_attention.cu", tmp_path)
    for name in ("forward", "dkdv", "dq"):
        for dtype in ("6__half", "13__nv_bfloat16"):
            for d in (16, 32, 64, 128):
                # Itanium mangling: <len>attention_<name>_mma_kernelI<dtype>Li<D>E
                assert_compiled_without_spills(kernels, rf"\d+attention_{name}_mma_kernelI{dtype}Li{d}E",
                                               f"attention_{name}_mma_kernel<{dtype.lstrip('0123456789')}, {d}>")


def test_contrastive_loss_fused_kernels_compile_for_sm90a_without_spills(tmp_path):
    """csrc/cuda/contrastive_loss.cu for sm_90a: the fused tensor-core tiles (CLIP forward and backward, SigLIP)
    for fp16 and bf16 keep their logit tile and row sums in registers. ~15 s."""
    kernels = ptxas_report(ROOT / "csrc" / "cuda" / "contrastive_loss.cu", tmp_path)
    for name in ("clip_forward_fused_kernel", "clip_backward_fused_kernel", "siglip_fused_kernel"):
        for dtype in ("6__half", "13__nv_bfloat16"):
            assert_compiled_without_spills(kernels, rf"\d+{name}I{dtype}E", f"{name}<{dtype.lstrip('0123456789')}>")


def test_similarity_tensor_core_kernels_compile_for_sm90a_without_spills(tmp_path):
    """csrc/cuda/similarity_softmax.cu for sm_90a: the tensor-core kernels (dot products, top-k forward and backward
    tiles; a 128 x 128 tile per block) for fp16 and bf16 keep their 16 x 128 accumulator per warp in registers.
    ~15 s."""
    kernels = ptxas_report(ROOT / "csrc" / "cuda" / "similarity_softmax.cu", tmp_path)
    for name in ("similarity_dots_kernel", "topk_tiles_kernel", "topk_backward_fused_kernel"):
        for dtype in ("6__half", "13__nv_bfloat16"):
            assert_compiled_without_spills(kernels, rf"\d+{name}I{dtype}E", f"{name}<{dtype.lstrip('0123456789')}>")


def test_sam_attention_kernels_compile_for_sm90a_without_spills(tmp_path):
    """csrc/cuda/sam_attention.cu for sm_90a: the fused SAM blocks (image -> token, token -> image) for every dtype
    keep their per-thread scores (<= 16 per head) and partial rows (<= 64 per channel) in registers. ~15 s."""
    kernels = ptxas_report(ROOT / "csrc" / "cuda" / "sam_attention.cu", tmp_path)
    for name in ("image_to_token_kernel", "token_to_image_kernel"):
        for dtype in ("f", "6__half", "13__nv_bfloat16"):
            assert_compiled_without_spills(kernels, rf"\d+{name}I{dtype}E", f"{name}<{dtype.lstrip('0123456789')}>")
