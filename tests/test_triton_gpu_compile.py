"""The Triton kernels of cross_attention, the contrastive losses and similarity_softmax's dense backward compile
for an sm_90 GPU (H100/H200).

The interpreter (how CI runs Triton on the CPU) executes the kernels as numpy code and never lowers them,
so an error that only the GPU compiler sees (a type mismatch in tl.dot, an unsupported construct, a
constexpr branch that does not type-check) would pass CI and fail on the first GPU run. This compiles
each kernel ahead of time for sm_90 with Triton's bundled ptxas, no GPU needed: fp32 (IEEE dots), fp16
and bf16, each kernel's main variants. It runs in a subprocess because the test process imports Triton
in interpreter mode (tests/conftest.py), where @triton.jit gives interpreted functions.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import mmfast.triton.contrastive_loss as loss
    import mmfast.triton.cross_attention as attn
    import mmfast.triton.similarity_softmax as sim

    TARGET = GPUTarget("cuda", 90, 32)

    def compile_kernel(kern, consts, ptr_dtype, num_warps=4, num_stages=2):
        """ptr_dtype(name) -> the element type of pointer argument `name`; other arguments are i32."""
        sig = {}
        for i, name in enumerate(kern.arg_names):
            if kern.params[i].is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + ptr_dtype(name)
            else:
                sig[name] = "fp32" if name == "scale" else "i32"
        missing = [n for i, n in enumerate(kern.arg_names) if kern.params[i].is_constexpr and n not in consts]
        assert not missing, (kern.fn.__name__, missing)
        consts = {(kern.arg_names.index(k),): v for k, v in consts.items() if k in kern.arg_names}
        triton.compile(ASTSource(kern, sig, constexprs=consts), target=TARGET,
                       options={"num_warps": num_warps, "num_stages": num_stages})

    for dt, precision in (("fp32", "ieee"), ("fp16", "tf32"), ("bf16", "tf32")):
        # cross_attention: statistics (lse, delta, split partials) are fp32, everything else in dt
        stats = ("lse_ptr", "delta_ptr", "part_ptr", "part_lse_ptr")
        for has_k2 in (False, True):
            for split in (False, True):
                out = "fp32" if split else dt
                compile_kernel(attn._attn_fwd_kernel,
                               dict(HAS_K2=has_k2, SPLIT=split, BLOCK_M=16 if split else 64, BLOCK_N=64,
                                    BLOCK_N2=32, BLOCK_D=64, PRECISION=precision),
                               lambda n: "fp32" if n in stats else (out if n == "out_ptr" else dt))
            tiles = dict(HAS_K2=has_k2, BLOCK_M=64, BLOCK_N=64, BLOCK_N2=32, BLOCK_D=64, PRECISION=precision)
            for kern in (attn._bwd_kv_kernel, attn._bwd_q_kernel):
                compile_kernel(kern, tiles, lambda n: "fp32" if n in stats else dt)
        compile_kernel(attn._split_merge_kernel, dict(BLOCK_R=64, BLOCK_D=64),
                       lambda n: dt if n == "out_ptr" else "fp32")
        compile_kernel(attn._bwd_delta_kernel, dict(BLOCK_R=64, BLOCK_D=64),
                       lambda n: "fp32" if n == "delta_ptr" else dt)

        # contrastive losses: the features (and the gradient chunk buffer g_ptr) in dt, statistics and scalars fp32
        features = ("r_ptr", "c_ptr", "g_ptr")
        common = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, PRECISION=precision, UPCAST=False, HAS_BIAS=True,
                      HAS_POS=True)
        for siglip in (False, True):
            grads = dict(common, SIGLIP=siglip, HAS_GR=not siglip, HAS_GC=not siglip, HAS_GP=not siglip,
                         HAS_FACTOR=dt == "fp16")
            compile_kernel(loss._grad_tile_kernel, grads, lambda n: dt if n in features else "fp32")
        for kern in (loss._clip_fwd_kernel, loss._siglip_loss_kernel):
            compile_kernel(kern, common, lambda n: dt if n in features else "fp32")
        compile_kernel(loss._lse_combine_kernel, dict(HAS_BIAS=True, BLOCK=128), lambda n: "fp32")
        # similarity_softmax's dense backward: ds in dt from grad_out and out (dt), delta and partials fp32
        for act in range(3):
            compile_kernel(sim._ds_kernel, dict(ACT=act, BLOCK_M=32, BLOCK_C=128, ROUND_BF16=dt == "bf16",
                                                UPCAST=False),
                           lambda n: dt if n in ("g_ptr", "p_ptr", "ds_ptr") else "fp32")
    # The loss gradient kernel's GPU entries, as launched.
    for table, dts in (("half", ("fp16", "bf16")), ("fp32", ("fp32",))):
        bm, bn, bd, warps, stages = loss._BLOCKS[table]["backward"]
        for dt in dts:
            tuned = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION="ieee" if dt == "fp32" else "tf32",
                         UPCAST=False, HAS_BIAS=True, HAS_POS=True, HAS_FACTOR=dt == "fp16")
            for siglip in (False, True):
                grads = dict(tuned, SIGLIP=siglip, HAS_GR=not siglip, HAS_GC=not siglip, HAS_GP=not siglip)
                compile_kernel(loss._grad_tile_kernel, grads, lambda n: dt if n in features else "fp32", warps,
                               stages)
    print("all kernels compiled for sm_90")
''')


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"sm_90 compile failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "all kernels compiled for sm_90" in done.stdout
