"""The dispatch tables behind `auto` (mmfast/tuning): the loader, the writer's rule, and the fall-back to
upstream's own computation, driven on the CPU by a fake table (on a GPU the committed table drives it)."""
import copy
import csv
import json

import pytest
import torch

from mmfast import backend, tuning
from mmfast.nn import perceiver as fused_perceiver
from mmfast.nn import sam_attention as fused_sam
from mmfast.reference import perceiver as ref_perceiver
from mmfast.reference import sam_attention as ref_sam
from test_perceiver import _pair as _perceiver_pair
from test_sam_attention import pair


def _table(**orders):
    """{"op": {"float32": [...order...]}} -> a table in mmfast.tuning's format."""
    return {"ops": {op: {dtype: {"order": order} for dtype, order in per_dtype.items()}
                    for op, per_dtype in orders.items()}}


@pytest.fixture
def cpu_table():
    """Install a dispatch table for the CPU for one test, removed afterwards."""
    def install(table):
        backend.set_dispatch_table("cpu", table)
    yield install
    backend.set_dispatch_table("cpu", None)


def test_committed_tables_load_and_end_with_upstream():
    tables = tuning.available_tables()
    assert "nvidia-h200" in tables
    h200 = tables["nvidia-h200"]
    assert h200["compute_capability"] == "9.0"
    for op, per_dtype in h200["ops"].items():
        for dtype, entry in per_dtype.items():
            assert entry["order"][-1] == tuning.UPSTREAM, (op, dtype)
            for impl in entry["order"][:-1]:  # a kernel is listed only where it beat eager everywhere
                assert min(entry["speedup"][impl][case][mode] for case in entry["speedup"][impl]
                           for mode in entry["speedup"][impl][case]) >= tuning.MIN_SPEEDUP, (op, dtype, impl)


def test_table_for_falls_back_to_the_same_compute_capability():
    assert tuning.table_for("nvidia-h100-80gb-hbm3", "9.0")["device"] == "nvidia-h200"
    assert tuning.table_for("nvidia-a100-sxm4-80gb", "8.0") is None


@pytest.mark.parametrize("bad", [{}, {"ops": {"clip_loss": {"float32": {"order": ["cuda"]}}}},
                                 {"ops": {"clip_loss": {"float64": {"order": ["upstream"]}}}}])
def test_malformed_table_is_an_error_naming_the_file(tmp_path, bad):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="broken.json"):
        tuning.load_table(str(path))


def _row(provider, case, mode, ms, backend_name=None, status="ok", dtype="float32", op="cross_attention"):
    extra = {"case": case, "dtype": dtype, "status": status}
    if backend_name:
        extra["backend"] = backend_name
    return {"kernel": op, "provider": provider, "mode": mode, "metric": "time_ms", "median": str(ms),
            "extra": json.dumps(extra)}


def test_choose_keeps_a_kernel_only_where_it_is_never_slower():
    rows = []
    for case in ("a", "b"):
        for mode in ("forward", "full"):
            rows.append(_row("eager", case, mode, 1.0))
            rows.append(_row("mmfast-cuda", case, mode, 0.5, "cuda"))  # 2x everywhere
            rows.append(_row("mmfast-triton", case, mode, 0.8 if case == "a" else 1.05, "triton"))  # slower in b
            rows.append(_row("mmfast", case, mode, 3.0, "reference"))  # the oracle never qualifies
    entry = tuning.choose(rows)["cross_attention"]["float32"]
    assert entry["order"] == ["cuda", "upstream"]
    assert entry["speedup"]["triton"]["b"]["full"] == pytest.approx(1 / 1.05, abs=1e-3)
    # A failed correctness gate disqualifies the kernel however fast it was.
    rows.append(_row("mmfast-cuda", "a", "forward", 0.1, "cuda", status="FAIL: rel err 1e-2"))
    rows[:] = [r for r in rows if not (r["provider"] == "mmfast-cuda" and "FAIL" not in r["extra"]
                                       and json.loads(r["extra"])["case"] == "a" and r["mode"] == "forward")]
    assert tuning.choose(rows)["cross_attention"]["float32"]["order"] == ["upstream"]


def test_write_table_from_csvs_round_trips(tmp_path):
    rows = [_row("eager", "a", "forward", 1.0), _row("mmfast-cuda", "a", "forward", 0.9, "cuda")]
    with open(tmp_path / "cross_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "gpu.json"
    tuning.write_table(str(tmp_path), str(out), device="gpu", compute_capability="9.0", source="test")
    assert tuning.load_table(str(out))["ops"]["cross_attention"]["float32"]["order"] == ["cuda", "upstream"]


def test_write_table_keeps_the_ops_a_run_did_not_measure(tmp_path):
    def write(op, ms, source):
        rows = [_row("eager", "a", "forward", 1.0, op=op), _row("mmfast-cuda", "a", "forward", ms, "cuda", op=op)]
        with open(tmp_path / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return tuning.write_table(str(tmp_path), str(tmp_path / "gpu.json"), device="gpu", compute_capability="9.0",
                                  source=source)

    write("clip_loss", 0.5, "first run")
    table = write("cross_attention", 2.0, "second run")  # clip_loss not measured this time: its entry stays
    assert table["ops"]["clip_loss"]["float32"]["order"] == ["cuda", "upstream"]
    assert table["ops"]["cross_attention"]["float32"]["order"] == ["upstream"]
    assert "kept from the earlier table (first run): clip_loss" in table["source"]
    table = write("clip_loss", 2.0, "third run")  # a measured op replaces its earlier entry
    assert table["ops"]["clip_loss"]["float32"]["order"] == ["upstream"]


def test_resolve_follows_the_table_and_keeps_explicit_backends(cpu_table):
    impls = ("cpu", "reference")
    cpu = torch.device("cpu")
    assert backend.resolve("clip_loss", impls, cpu, torch.float32) == "cpu"  # no table: the C++ kernel
    cpu_table(_table(clip_loss={"float32": ["upstream"], "bfloat16": ["cpu", "upstream"]}))
    assert backend.resolve("clip_loss", impls, cpu, torch.float32) == backend.UPSTREAM
    assert backend.resolve("clip_loss", impls, cpu, torch.bfloat16) == "cpu"
    assert backend.resolve("clip_loss", impls, cpu, torch.float16) == "cpu"  # no entry for the dtype
    assert backend.resolve("clip_loss", impls, cpu, torch.float32, "cpu") == "cpu"  # asked for by name
    assert backend.resolve("clip_loss", impls, cpu, torch.float64) == "reference"


def _sam_pair(dim=32):
    """A drop-in SAM transformer and the reference with the same random weights (test_sam_attention.pair)."""
    model, reference = pair(fused_sam.TwoWayTransformer, ref_sam.TwoWayTransformer, depth=2, embedding_dim=dim,
                            num_heads=4, mlp_dim=64)
    gen = torch.Generator().manual_seed(1)
    inputs = tuple(torch.randn(*shape, generator=gen) for shape in ((3, dim, 4, 4), (3, dim, 4, 4), (3, 7, dim)))
    return model, reference, inputs


def _forbid(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran although the dispatch table says upstream")
    monkeypatch.setattr(module, name, fail)


def test_sam_modules_run_upstreams_forward_where_the_table_says_so(cpu_table, monkeypatch):
    model, reference, inputs = _sam_pair()
    grads = [torch.randn(3, 7, 32), torch.randn(3, 16, 32)]
    cpu_table(_table(sam_attention={"float32": ["upstream"]}))
    _forbid(monkeypatch, fused_sam, "sam_attention")
    inputs_ref = [x.clone().requires_grad_() for x in inputs]
    inputs_up = [x.clone().requires_grad_() for x in inputs]
    want = reference(*inputs_ref)
    got = model(*inputs_up)
    for g, w in zip(got, want):  # the same ops in the same order: bitwise equal
        assert torch.equal(g, w)
    torch.autograd.backward(want, grads)
    torch.autograd.backward(got, grads)
    for a, b in zip(inputs_up, inputs_ref):
        assert torch.equal(a.grad, b.grad)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_upstream_path_is_decided_once_per_forward(cpu_table, monkeypatch):
    """Under the top-level drop-in's upstream forward its drop-in blocks and attentions do not ask the table
    again (backend.run_upstream); used alone, an attention still asks; an error inside leaves no flag behind."""
    model, _, inputs = _sam_pair()
    cpu_table(_table(sam_attention={"float32": ["upstream"]}))
    asked = []
    real = fused_sam._module_backend
    monkeypatch.setattr(fused_sam, "_module_backend", lambda *a: asked.append(len(a)) or real(*a))
    model(*inputs)
    assert asked == [2]  # the transformer's own question (point_embedding, its final attention)
    attention = model.layers[0].cross_attn_token_to_image
    attention(inputs[2], inputs[2], inputs[2])
    assert asked == [2, 2] and not backend.in_upstream_forward()
    with pytest.raises(RuntimeError):
        backend.run_upstream(lambda: (_ for _ in ()).throw(RuntimeError("inside")))
    assert not backend.in_upstream_forward()


@pytest.mark.parametrize("dim, passed", [(128, "cpu"), (32, "auto")])
def test_sam_fused_path_runs_where_the_table_names_a_kernel(cpu_table, monkeypatch, dim, passed):
    """dim 128, 4 heads: head dims 32 and 16, which the kernels take, so the table's kernel is passed down to
    every attention; dim 32 (head dims 8 and 4): not forced on the core, which picks under auto."""
    model, reference, inputs = _sam_pair(dim)
    cpu_table(_table(sam_attention={"float32": ["cpu", "upstream"]}))
    calls = []
    real = fused_sam.sam_attention
    monkeypatch.setattr(fused_sam, "sam_attention", lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))
    out = model(*inputs)
    assert calls and set(calls) == {passed}
    torch.testing.assert_close(out[0], reference(*inputs)[0], rtol=1e-4, atol=1e-4)


def test_perceiver_runs_upstreams_forward_where_the_table_says_so(cpu_table, monkeypatch):
    model, reference = _perceiver_pair(fused_perceiver.PerceiverResampler, ref_perceiver.PerceiverResampler, dim=64,
                                       depth=2, dim_head=16, heads=4, num_latents=8)
    cpu_table(_table(perceiver_resampler={"float32": ["upstream"]}))
    _forbid(monkeypatch, fused_perceiver, "cross_attention")
    x = torch.randn(2, 1, 10, 64)
    want = reference(x)
    got = model(x.clone())
    assert torch.equal(got, want)
    attention = copy.deepcopy(model.layers[0][0])  # the attention module alone, too
    latents = torch.randn(2, 1, 8, 64)
    assert torch.equal(attention(x, latents), reference.layers[0][0](x, latents))


def test_a_shape_class_is_ranked_apart(cpu_table):
    """similarity_softmax's top-k calls have their own entry (bench cases with params["dispatch"])."""
    rows = []
    for case, dispatch, kernel_ms in (("plain", None, 0.5), ("top-5", "topk", 1.2)):
        for provider, ms, impl in (("eager", 1.0, None), ("mmfast-cpu", kernel_ms, "cpu")):
            row = _row(provider, case, "forward", ms, impl, op="similarity_softmax")
            if dispatch:
                row["extra"] = json.dumps(json.loads(row["extra"]) | {"dispatch": dispatch})
            rows.append(row)
    ops = tuning.choose(rows)
    assert ops["similarity_softmax"]["float32"]["order"] == ["cpu", "upstream"]
    assert ops["similarity_softmax:topk"]["float32"]["order"] == ["upstream"]
    cpu_table({"ops": {op: {d: {"order": e["order"]} for d, e in per.items()} for op, per in ops.items()}})
    cpu, impls = torch.device("cpu"), ("cpu", "reference")
    assert backend.resolve("similarity_softmax", impls, cpu, torch.float32) == "cpu"
    assert backend.resolve("similarity_softmax", impls, cpu, torch.float32, shape_class="topk") == "upstream"
    assert backend.resolve("similarity_softmax", impls, cpu, torch.float32, shape_class="other") == "cpu"


def test_ops_run_upstreams_computation_where_the_table_says_so(cpu_table, monkeypatch):
    """cross_attention: cat + SDPA, bit for bit (the bench's eager baseline); the other ops: their reference.
    similarity_softmax's top-k calls follow their own entry ("similarity_softmax:topk")."""
    import torch.nn.functional as F

    import mmfast
    from mmfast.reference import contrastive_loss as ref_loss
    from mmfast.reference import similarity_softmax as ref_sim

    gen = torch.Generator().manual_seed(0)
    q, k, v, k2, v2 = (torch.randn(2, 3, n, 16, generator=gen) for n in (5, 9, 9, 4, 4))
    cpu_table(_table(cross_attention={"float32": ["upstream"]}, clip_loss={"float32": ["upstream"]},
                     similarity_softmax={"float32": ["cpu", "upstream"]},
                     **{"similarity_softmax:topk": {"float32": ["upstream"]}}))
    want = F.scaled_dot_product_attention(q, torch.cat((k, k2), -2), torch.cat((v, v2), -2), scale=0.3)
    assert torch.equal(mmfast.cross_attention(q, k, v, k2=k2, v2=v2, scale=0.3), want)
    assert torch.equal(mmfast.cross_attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))

    image, text = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    assert torch.equal(mmfast.clip_loss(image, text, 10.0), ref_loss.clip_loss(image, text, 10.0))

    ran = []
    for name in ("similarity_softmax", "similarity_topk"):
        real = getattr(ref_sim, name)
        monkeypatch.setattr(ref_sim, name, lambda *a, _real=real, _name=name, **kw: ran.append(_name) or _real(*a, **kw))
    mmfast.similarity_softmax(image, text, 10.0)  # the C++ kernel: the reference is not called
    assert ran == []
    mmfast.similarity_softmax(image, text, 10.0, topk=2)
    assert ran[:1] == ["similarity_topk"]  # (the reference top-k builds on the reference softmax)


def test_inference_is_ranked_on_the_forward_measurements(cpu_table):
    """A kernel faster in the forward (no_grad) mode but slower forward+backward takes auto only with autograd
    off (H200 2026-12-04: the fp32 Perceiver on the CUDA core 1.93x forward, 0.78x full)."""
    rows = [_row("eager", "a", "forward", 1.0), _row("mmfast-cpu", "a", "forward", 0.5, "cpu"),
            _row("eager", "a", "full", 1.0), _row("mmfast-cpu", "a", "full", 1.3, "cpu")]
    entry = tuning.choose(rows)["cross_attention"]["float32"]
    assert entry["order"] == ["upstream"] and entry["inference_order"] == ["cpu", "upstream"]
    cpu_table({"ops": {"perceiver_resampler": {"float32": {"order": entry["order"],
                                                           "inference_order": entry["inference_order"]}}}})
    cpu, impls = torch.device("cpu"), ("cpu", "reference")
    assert backend.module_backend("perceiver_resampler", impls, cpu, torch.float32) == backend.UPSTREAM
    with torch.no_grad():
        assert backend.module_backend("perceiver_resampler", impls, cpu, torch.float32) == "cpu"


def test_triton_block_overrides_replace_table_entries(tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="the Triton backend's helpers need triton")
    from mmfast.triton._utils import apply_block_overrides

    path = tmp_path / "blocks.json"
    path.write_text(json.dumps({"fam": {"half": {"backward": [128, 64, 8, 2]}}, "other": {"half": {"x": [1]}}}))
    monkeypatch.setenv("MMFAST_TRITON_BLOCKS", str(path))
    blocks = {"half": {"forward": (1, 2, 3, 4), "backward": (64, 64, 4, 2)}}
    apply_block_overrides("fam", blocks)
    assert blocks == {"half": {"forward": (1, 2, 3, 4), "backward": (128, 64, 8, 2)}}  # only the named entry
    path.write_text(json.dumps({"fam": {"half": {"backward": [128, 64]}}}))  # a tuple of another length
    with pytest.raises(ValueError, match=r"fam\.half\.backward must replace an entry of 4 ints"):
        apply_block_overrides("fam", blocks)
    monkeypatch.delenv("MMFAST_TRITON_BLOCKS")
    assert apply_block_overrides("fam", {"half": {}}) == {"half": {}}  # unset: nothing read
