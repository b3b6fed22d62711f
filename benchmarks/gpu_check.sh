#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR — the GPU check of mmfast, on an H100/H200 machine with no network.
#
# Expects python3 (3.12) with torch (CUDA build), triton, pybind11, ninja, pytest, pytest-xdist,
# pytest-timeout and pytest-benchmark already installed, and nvcc; installs only the wheels in .whl/, uses no venv
# (PYTHON=... to override python3). Run from anywhere; it works in the source tree it sits in. Stages, each
# bounded by `timeout`; a failing stage is logged and the next one runs; the whole stays inside
# GPU_CHECK_SECONDS (560: inside one 600 s call of the device runner; it counts from this script's start, so
# leave the runner's own limit room for what runs before it: on 2026-12-04 a wheel install plus 585 s overran
# the runner's 600 s and the unpacked CSVs were lost):
#   0. pip install of the wheels carried in .whl/ (if any) into a temporary --target on PYTHONPATH
#   1. nvidia-smi                                                 -> gpu_check.log
#   2. build mmfast._C in place for sm_90a                        -> gpu_check.log
#   3. python3 -m mmfast info                                     -> gpu_check.log
#   3b. benchmarks/_triton_sweep.py: the Triton block-size candidates timed and checked at the bench shapes
#      (TRITON_SWEEP_SECONDS: off by default; on an H200 54 s with a warm Triton cache, its compile phase alone 105 s
#      cold, so give it ~170 s; run it when
#      Triton kernels or their tables change); the winners are exported as MMFAST_TRITON_BLOCKS, so the
#      stages below run on them                        -> results/triton-sweep/ (sweep.txt, triton_blocks.json)
#   4. pytest -k "cuda and not emulated" -n 12, no -x, with the dtype coverage guard on
#      (MMFAST_COVERAGE_GUARD=1: a claimed backend/dtype that did not run and pass fails the stage)
#                                                                 -> pytest.log
#   5. compute-sanitizer memcheck of each CUDA op, tiny shapes    -> sanitizer.log
#   5b. benchmarks/_tensor_core_ab.py: the CUDA backend with MMFAST_CUDA_TENSOR_CORES=0 against =1 on the issues'
#      headline shapes, to decide whether the tensor-core kernels become the default (TENSOR_CORE_AB_SECONDS,
#      default 45; 0 skips it; estimated ~30 s: two processes' start-up and 7 cases, NOT run yet)
#                                                                 -> results/tensor_core_ab.md
#   6. the card's ceilings: copy bandwidth, GEMM TFLOP/s          -> ceilings.txt
#   7. python3 -m mmfast bench --quick --device cuda, one op at a time, each under its own cap so that one
#      slow op cannot starve the rest (BENCH_OPS, "op:seconds" pairs), then a torch.profiler pass over the
#      module cases (--profile)                                   -> bench.log, profile.txt
#   7b. benchmarks/contrastive_step.py with ViT-B-32 in bf16 (issue 17), where open_clip imports (carry the
#      open-clip-torch and ftfy wheels): gradcache at B=65536, both methods at B=2048 (the step-time ratio
#      where the plain step fits), then the largest plain step
#      (CONTRASTIVE_STEP_SECONDS, default 100)                    -> results/contrastive_step.txt
#   7c. benchmarks/_llava_projector_timing.py --device cuda      -> results/llava_projector.txt
#   8. python3 -m mmfast tune: the dispatch table of `auto` from the bench CSVs, written into
#      mmfast/tuning/<device>.json and copied out                  -> <device>.json
# The per-op CSVs and plots travel packed in one tarball, results.tar.gz (unpack it into benchmarks/): 8
# files in all, the most the device runner brings back. torch.compile baselines are not timed (their
# compile time does not fit a lease). The stage statuses end gpu_check.log and the output.
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # mmfast from this tree, also for scripts run from $TMP
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # torch's guess from a wrapper nvcc can be wrong (DESIGN.md 8)
export PATH="$CUDA_HOME/bin:$PATH"
unset TRITON_INTERPRET  # Triton runs for real here
# fp16/bf16 on the tensor-core kernels (cross-attention, the fused contrastive-loss tiles, similarity_softmax's dots;
# opt-in until this check has validated them on a card): the tests and benches below run them;
# MMFAST_CUDA_TENSOR_CORES=0 checks the CUDA-core kernels and cuBLAS paths instead.
export MMFAST_CUDA_TENSOR_CORES=${MMFAST_CUDA_TENSOR_CORES:-1}
LOG="$OUT/gpu_check.log"
: > "$LOG"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-560} ))
BENCH_RESERVE=230  # seconds kept for the benchmark stages, whatever came before
STATUS=()

# stage NAME CAP LOGFILE CMD...: run CMD under timeout (CAP, or less to keep BENCH_RESERVE), output teed to LOGFILE;
# a NAME listed in SKIP_STAGES (space-separated, e.g. "ceilings profile") is skipped.
stage() {
    local name=$1 cap=$2 log=$3 reserve=$BENCH_RESERVE
    shift 3
    case " ${SKIP_STAGES:-} " in *" $name "*)
        STATUS+=("$name: SKIPPED (SKIP_STAGES)")
        echo "=== $name: skipped (SKIP_STAGES)" | tee -a "$LOG"
        return ;;
    esac
    case $name in bench*|profile|tune) reserve=5 ;; esac
    local left=$(( DEADLINE - $(date +%s) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 5 ]; then
        STATUS+=("$name: SKIPPED (no time left)")
        echo "=== $name: skipped, no time left" | tee -a "$LOG"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]} verdict=OK
    [ "$rc" -ne 0 ] && verdict="FAILED (rc=$rc)"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    STATUS+=("$name: $verdict in $(( $(date +%s) - start ))s")
    echo "=== $name: $verdict" | tee -a "$LOG"
    pack_results
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Everything but the logs gathers in $RES, outside $OUT, and is packed into $OUT/results.tar.gz after every stage:
# one file back instead of two per op, and a check killed mid-way still returns what it had (the device runner
# brings back 8 files; on 2026-12-04 a killed check's loose CSVs were left behind).
RES="$TMP/results"
pack_results() {
    [ -d "$RES" ] && tar -czf "$OUT/results.tar.gz.part" -C "$TMP" results && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
    return 0
}

# A tiny call of each CUDA op (forward and backward), odd shapes so edge tiles are exercised.
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 (below): every tensor its own cudaMalloc, so an access past its
# end is caught instead of landing in the caching allocator's pool.
cat > "$TMP/sanitize.py" <<'EOF'
import torch
import mmfast

torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n, c, d in ((37, 101, 70), (3, 7, 8)):
        image = torch.randn(n, d, device=dev, dtype=dtype, requires_grad=True)
        text = torch.randn(c, d, device=dev, dtype=dtype, requires_grad=True)
        for act, bias in (("softmax", None), ("sigmoid", -10.0), ("none", None)):
            out = mmfast.similarity_softmax(image, text, 100.0, bias, activation=act, backend="cuda")
            out.backward(torch.randn_like(out))
            values, _ = mmfast.similarity_softmax(image, text, 100.0, bias, activation=act, topk=5, backend="cuda")
            values.backward(torch.randn_like(values))
        torch.cuda.synchronize()
        print(f"similarity_softmax (+topk, backward) {dtype} N={n} C={c} D={d}: ran", flush=True)
    for b, h, lq, lk, lk2, d in ((2, 3, 70, 130, 5, 40), (1, 2, 7, 300, 0, 16), (1, 1, 1, 1, 1, 128)):
        q = torch.randn(b, h, lq, d, device=dev, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, h, lk, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        k2, v2 = ((torch.randn(b, h, lk2, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
                  if lk2 else (None, None))
        out = mmfast.cross_attention(q, k, v, k2=k2, v2=v2, backend="cuda")
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"cross_attention (+backward) {dtype} B={b} H={h} Lq={lq} Lk={lk} Lk2={lk2} d={d}: ran", flush=True)
    for bi, bt, d in ((37, 37, 70), (1, 1, 8), (5, 4101, 16)):  # 4101 columns: two chunks in the CUDA kernels
        image = torch.randn(bi, d, device=dev, dtype=dtype, requires_grad=True)
        text = torch.randn(bt, d, device=dev, dtype=dtype, requires_grad=True)
        if bi == bt:
            mmfast.clip_loss(image, text, 100.0, backend="cuda").backward()
            mmfast.siglip_loss(image, text, 10.0, -10.0, backend="cuda").backward()
        scale = torch.tensor(30.0, device=dev)
        row_lse, col_lse, pos = torch.ops.mmfast.clip_loss_block(image.detach(), text.detach(), scale, None, 3)
        ones = torch.ones_like
        torch.ops.mmfast.clip_loss_block_backward(image.detach(), text.detach(), scale, None, 3, row_lse, col_lse,
                                                  ones(row_lse), ones(col_lse), ones(pos))
        torch.ops.mmfast.siglip_loss_block(image.detach(), text.detach(), scale, torch.tensor(-1.0, device=dev),
                                           False, True)
        torch.cuda.synchronize()
        print(f"clip_loss / siglip_loss blocks (+backward) {dtype} Bi={bi} Bt={bt} D={d}: ran", flush=True)
    # SAM's fused blocks (forward only): 70 image rows / 130 keys (ragged tiles and chunks), x / k shared (batch 1)
    for b_img, b_tok, heads, tokens, c, hd, c_out in ((1, 3, 4, 7, 40, 8, 24), (2, 2, 3, 1, 9, 3, 5)):
        def r(*shape):
            return torch.randn(*shape, device=dev, dtype=dtype)
        g = heads * tokens
        torch.ops.mmfast.sam_image_to_token(r(b_img, 70, c), r(b_tok, g, c), r(b_tok, g), r(b_tok, g, c_out),
                                            r(c_out), r(b_img, 70, c_out), r(c_out), r(c_out), 0.3, 1e-5, tokens)
        torch.ops.mmfast.sam_token_to_image(r(b_tok, g, c), r(b_tok, g), r(b_img, 130, c), r(b_img, 130, c),
                                            r(heads * hd, c), r(heads * hd), r(c_out, heads * hd), r(c_out),
                                            r(b_tok, tokens, c_out), r(c_out), r(c_out), 0.3, 1e-5, heads)
        torch.cuda.synchronize()
        print(f"sam_image_to_token / sam_token_to_image {dtype} heads={heads} tokens={tokens} C={c}: ran", flush=True)
print("all CUDA ops ran under the sanitizer")
EOF

cat > "$TMP/ceilings.py" <<'EOF'
import torch

dev = torch.device("cuda")


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)[reps // 2]


print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; CUDA {torch.version.cuda}")
src = torch.empty(2**30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
ms = median_ms(lambda: dst.copy_(src))
print(f"device-to-device copy 1 GiB: {ms:.3f} ms = {2 * 2**30 / ms / 1e6:.0f} GB/s (read + write)")
del src, dst
n = 8192
for dtype, tf32 in ((torch.bfloat16, False), (torch.float16, False), (torch.float32, True), (torch.float32, False)):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = median_ms(lambda: a @ b)
    name = f"{dtype}".replace("torch.", "") + (" (TF32)" if tf32 else "")
    print(f"GEMM {n}^3 {name}: {ms:.3f} ms = {2 * n**3 / ms / 1e9:.0f} TFLOP/s")
EOF

# Wheels carried with the tree in .whl/ (the GPU machine has no network; .git/info/exclude keeps them out of git):
# open-clip-torch + ftfy + wcwidth for the contrastive_step stage, inf-cl for clip_loss's Inf-CL provider.
if compgen -G ".whl/*.whl" > /dev/null; then
    stage wheels 60 "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$TMP/site" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$TMP/site"
fi
"$PY" -c "import inf_cl" 2>/dev/null || STATUS+=("inf-cl: not installed (carry inf_cl-1.2.1-py3-none-any.whl in .whl/): clip_loss runs without the Inf-CL provider")
stage nvidia-smi 15 "$LOG" nvidia-smi
stage build 240 "$LOG" env MMFAST_CUDA_ARCHS=90a MAX_JOBS=16 "$PY" setup.py build_ext --inplace
stage info 40 "$LOG" "$PY" -m mmfast info
mkdir -p "$RES"
if [ "${TRITON_SWEEP_SECONDS:-0}" -gt 0 ]; then
    stage triton-sweep "${TRITON_SWEEP_SECONDS}" "$LOG" "$PY" benchmarks/_triton_sweep.py "$RES/triton-sweep"
    if [ -s "$RES/triton-sweep/triton_blocks.json" ]; then
        export MMFAST_TRITON_BLOCKS="$RES/triton-sweep/triton_blocks.json"
        echo "MMFAST_TRITON_BLOCKS=$MMFAST_TRITON_BLOCKS: $(cat "$MMFAST_TRITON_BLOCKS" | tr -d '\n ')" | tee -a "$LOG"
    fi
fi
# "not emulated": tests/test_cuda_emulation.py runs the same kernels on CPU threads, for machines without a GPU.
# -n 12: the whole selection took 127 s on an H200 (2026-12-04); no -x, so every failure is listed.
# -v: each test's verdict is logged as it ends, so a stage cut short by its cap still says what failed
# (-o addopts=-ra: pyproject's -q would cancel it, as it did on 2026-12-04).
stage pytest 240 "$OUT/pytest.log" env MMFAST_COVERAGE_GUARD=1 "$PY" -m pytest tests -o addopts=-ra -v --tb=short \
    -k "cuda and not emulated" -n 12 --timeout 160 -p no:cacheprovider \
    --ignore=tests/test_patching.py  # it imports the upstream packages (test pins), which the GPU image lacks
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
    stage sanitizer 40 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" "$TMP/sanitize.py"
else
    STATUS+=("sanitizer: SKIPPED (compute-sanitizer not found)")
    echo "compute-sanitizer not found" | tee -a "$OUT/sanitizer.log"
fi
if [ "${TENSOR_CORE_AB_SECONDS:-45}" -gt 0 ]; then
    stage tensor-core-ab "${TENSOR_CORE_AB_SECONDS:-45}" "$LOG" "$PY" benchmarks/_tensor_core_ab.py --reps 10 \
        --out "$RES/tensor_core_ab.md"
fi
stage ceilings 20 "$OUT/ceilings.txt" "$PY" "$TMP/ceilings.py"
if "$PY" -c "import open_clip" 2>/dev/null; then
    # The plain step peaked at 68.6 GB at B=2048 and ran out of memory at 4096 (H200, 2026-12-04).
    # The target first (B=65536: ~18 s a step, so no separate warm-up), then the plain step's largest batch.
    stage bench-contrastive-step "${CONTRASTIVE_STEP_SECONDS:-100}" "$RES/contrastive_step.txt" bash -c "
        $PY benchmarks/contrastive_step.py --model ViT-B-32 --amp bf16 --chunk 2048 --steps 1 --no-warmup \
            --methods gradcache --batch-sizes 65536;
        $PY benchmarks/contrastive_step.py --model ViT-B-32 --amp bf16 --chunk 2048 --steps 1 --no-warmup \
            --methods plain gradcache --batch-sizes 2048;
        $PY benchmarks/contrastive_step.py --model ViT-B-32 --amp bf16 --chunk 2048 --steps 1 --no-warmup \
            --methods plain accum --find-max --batch-sizes 4096 --max-batch 8192"
else
    STATUS+=("bench-contrastive-step: SKIPPED (open_clip does not import: carry open-clip-torch and ftfy wheels)")
fi
# Issue 16: how much of LLaVA-1.5's projector time bias + GELU take on this GPU, [16, 576, 1024 -> 4096 -> 4096].
stage bench-llava-projector 25 "$RES/llava_projector.txt" "$PY" benchmarks/_llava_projector_timing.py \
    --device cuda --reps 20
# One op at a time, each under its own cap (seconds; the 2026-12-04 run's quick cases took 13-90 s each;
# clip_loss's B=65536 case alone needs ~60 s). A bench cut short still writes what it measured.
PROVIDERS=${BENCH_PROVIDERS:-mmfast,mmfast-cuda,mmfast-triton,floor-gemm,floor-gemm+attn,eager-graph,mmfast-graph,inf-cl}
for pair in ${BENCH_OPS:-sam_attention:60 perceiver_resampler:40 cross_attention:35 similarity_softmax:35 siglip_loss:20 clip_loss:50 owl_class_head:15}; do
    op=${pair%%:*}
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    stage "bench-$op" "${pair##*:}" "$OUT/bench.log" "$PY" -m mmfast bench --quick --device cuda --op "$op" \
        --providers "$PROVIDERS" --out "$RES" ${BENCH_ARGS:-}
done
stage profile 25 "$OUT/profile.txt" "$PY" -m mmfast bench --quick --device cuda --op sam_attention \
    --op perceiver_resampler --providers mmfast --profile --out "$RES"  # details: <op>-profile.txt in the tarball
DEVICE_CLASS=$("$PY" -c "import torch; from mmfast import backend; print(backend._cuda_device_class(0)[0])" 2>/dev/null)
stage tune 15 "$LOG" "$PY" -m mmfast tune "$RES" \
    --source "benchmarks/gpu_check.sh on $(date -u +%F): $("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, Triton {triton.__version__}")' 2>/dev/null)"
[ -n "$DEVICE_CLASS" ] && [ -f "mmfast/tuning/$DEVICE_CLASS.json" ] && cp "mmfast/tuning/$DEVICE_CLASS.json" "$OUT/"
[ -f "$TMP/RESULTS.md" ] && mv "$TMP/RESULTS.md" "$RES/"  # the runner's, written beside --out
pack_results

{
    echo "=== summary"
    printf '%s\n' "${STATUS[@]}"
} | tee -a "$LOG"
