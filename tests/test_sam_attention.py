"""SAM's mask-decoder attention: mmfast.ops.sam_attention (each arrangement) and the drop-in modules
(mmfast.nn.sam_attention) against the references (mmfast.reference.sam_attention, which mirror
segment-anything 1.0 and SAM2): outputs and every gradient (inputs and parameters) vs float64, fp32 and
the low-precision 2x rule, the shared-image path against the per-prompt path, state_dict keys, views,
torch.compile and bad input.
"""
import copy

import pytest
import torch

import mmfast

from conftest import DEVICES, assert_close_to_reference, backend_device_params, rel_err
from mmfast.nn import sam_attention as fused
from mmfast.ops import cross_attention as ca
from mmfast.ops import sam_attention as ops
from mmfast.reference import sam_attention as ref

LOW_PRECISION = (torch.float16, torch.bfloat16)


def randomized(module, seed):
    """Random biases and LayerNorm affines (the defaults 0 and 1 would hide a dropped or swapped term)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return module


def pair(cls_fused, cls_ref, *args, seed=0, **kwargs):
    model_ref = randomized(cls_ref(*args, **kwargs), seed)
    model = cls_fused(*args, **kwargs)
    model.load_state_dict(model_ref.state_dict(), strict=True)
    return model, model_ref


def run(model, inputs, dtype, *, requires_grad=True):
    """model(*inputs) in dtype, backward with seeded random output gradients (the same for every call):
    (outputs, input grads, parameter grads)."""
    model.zero_grad(set_to_none=True)  # before .to(): it would convert (in place) grads returned earlier
    model = model.to(dtype)
    leaves = [x.detach().to(dtype).requires_grad_(requires_grad) for x in inputs]
    outs = model(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if requires_grad:
        g = torch.Generator().manual_seed(7)
        grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in outs]
        torch.autograd.backward(outs, grads)
    return ([o.detach() for o in outs], [x.grad for x in leaves],
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def check(model, model_ref, inputs, dtype, *, requires_grad=True, rtol=1e-5):
    """Outputs and all gradients of `model` in dtype vs model_ref in float64 (mmfast.testing's rule).

    The reference also runs in dtype. For fp32 that sets the bound to max(rtol, 2x the fp32 reference's own
    error), for the parameter gradients 2x its worst one: the two-way transformer's image-to-token weight
    gradients sum over 4096 tokens through two layers, and there the fp32 reference itself is 2.5e-5 to
    4e-5 off float64 (measured over seeds), with mmfast's arrangement at 1.2x-2.2x of that per tensor."""
    out, gin, gpar = run(model, inputs, dtype, requires_grad=requires_grad)
    same = run(copy.deepcopy(model_ref), inputs, dtype, requires_grad=requires_grad)
    out64, gin64, gpar64 = run(model_ref, inputs, torch.float64, requires_grad=requires_grad)

    def close(x, x64, x_same, name, same_err=0.0):
        if dtype in LOW_PRECISION:
            assert_close_to_reference(x, x64, x_same, name=name)
        else:
            bound = max(rtol, 2 * rel_err(x_same, x64), 2 * same_err)
            assert_close_to_reference(x, x64, name=name, fp32_rtol=bound)

    for i, (o, o64) in enumerate(zip(out, out64)):
        close(o, o64, same[0][i], f"output {i}")
    if not requires_grad:
        return
    for i, (g_, g64) in enumerate(zip(gin, gin64)):
        close(g_, g64, same[1][i], f"grad input {i}")
    scale = max(g.norm().item() for g in gpar64.values())
    worst_same = max(rel_err(same[2][n], g) for n, g in gpar64.items() if g.norm() > 1e-12 * scale)
    for name, g64 in gpar64.items():
        if g64.norm() <= 1e-12 * scale:  # the key bias: softmax ignores a shift shared by a row, dL/dbk = 0
            floor = (4 * torch.finfo(dtype).eps if dtype in LOW_PRECISION else rtol) * scale  # testing.py's floor
            bound = max(2 * same[2][name].double().norm().item(), floor)
            assert gpar[name].double().norm() <= bound, f"grad {name}: not ~0"
            continue
        close(gpar[name], g64, same[2][name], f"grad {name}", worst_same)


# ---- the op, one arrangement at a time ------------------------------------------------------------------
# (batch q, batch k/v, Lq, Lk, embedding_dim, heads, downsample) and the arrangement sam_attention picks.
ARRANGEMENTS = {
    "token-to-image (few queries)": ((3, 3, 7, 300, 64, 4, 2), "few_queries"),
    "image-to-token (few keys)": ((3, 3, 300, 7, 64, 4, 2), "few_keys"),
    "shared image keys": ((3, 1, 7, 300, 64, 4, 2), "shared_kv"),
    "shared image queries": ((1, 3, 300, 7, 64, 4, 2), "shared_q_few_keys"),
    "self-attention (projected)": ((2, 2, 20, 20, 64, 2, 1), "projected"),
    "Nq=12 head dim 8 (projected)": ((2, 2, 12, 50, 64, 8, 1), "projected"),
    "Lq=1": ((2, 2, 1, 33, 64, 4, 1), "few_queries"),
    "Lk=1": ((2, 2, 33, 1, 64, 4, 1), "few_keys"),
}


class _Wrapped(torch.nn.Module):
    """ops.sam_attention with residual + LayerNorm, as a module for `check`."""

    def __init__(self, attention, norm):
        super().__init__()
        self.attention, self.norm = attention, norm

    def forward(self, q, k, v, residual):
        return ops.sam_attention(q, k, v, ops.Projections.of(self.attention), self.attention.num_heads,
                                 residual=residual, norm=(self.norm.weight, self.norm.bias, self.norm.eps))


class _WrappedRef(_Wrapped):
    def forward(self, q, k, v, residual):
        return self.norm(residual + self.attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(ARRANGEMENTS))
def test_sam_attention_arrangements(case, dtype):
    (bq, bkv, lq, lk, dim, heads, rate), expected = ARRANGEMENTS[case]
    assert ops.plan(bq, bkv, lq, lk, dim // rate // heads) == expected
    attention = randomized(ref.Attention(dim, heads, downsample_rate=rate), seed=1)
    norm = randomized(torch.nn.LayerNorm(dim), seed=2)
    g = torch.Generator().manual_seed(3)
    b = max(bq, bkv)
    inputs = [torch.randn(bq, lq, dim, generator=g), torch.randn(bkv, lk, dim, generator=g),
              torch.randn(bkv, lk, dim, generator=g), torch.randn(b, lq, dim, generator=g)]
    model, model_ref = _Wrapped(attention, norm), _WrappedRef(copy.deepcopy(attention), copy.deepcopy(norm))
    check(model, model_ref, inputs, dtype)


def test_sam_attention_without_residual_or_norm_and_views():
    """SAM passes permuted / flattened views; the inputs are read through their strides, never written."""
    attention = randomized(ref.Attention(64, 4, downsample_rate=2), seed=4).double()
    g = torch.Generator().manual_seed(5)
    image = torch.randn(2, 64, 10, 12, generator=g, dtype=torch.float64).flatten(2).permute(0, 2, 1)  # [2, 120, 64]
    tokens = torch.randn(2, 64, 7, generator=g, dtype=torch.float64).transpose(1, 2)                  # [2, 7, 64]
    before = (image.clone(), tokens.clone())
    p = ops.Projections.of(attention)
    for q, kv in ((tokens, image), (image, tokens)):
        out = ops.sam_attention(q, kv, kv, p, 4)
        torch.testing.assert_close(out, attention(q, kv, kv), rtol=1e-12, atol=1e-12)
    assert torch.equal(image, before[0]) and torch.equal(tokens, before[1])


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_sam_attention_core_backends(backend, device):
    """The arrangements that run the attention core (shared keys, projected), on every kernel backend."""
    if backend not in ca.IMPLEMENTATIONS:
        pytest.skip(f"mmfast::cross_attention has no {backend!r} kernel in this build ({ca.IMPLEMENTATIONS})")
    attention = randomized(ref.Attention(64, 4, downsample_rate=1), seed=6)  # head dim 16
    attention64 = copy.deepcopy(attention).double()
    attention.to(device)
    g = torch.Generator().manual_seed(7)
    for bq, bkv, lq, lk in ((3, 1, 7, 70), (2, 2, 20, 20)):
        q, kv = torch.randn(bq, lq, 64, generator=g), torch.randn(bkv, lk, 64, generator=g)
        out = ops.sam_attention(q.to(device), kv.to(device), kv.to(device), ops.Projections.of(attention), 4,
                                backend=backend)
        expected = attention64(q.double(), kv.double(), kv.double())
        assert_close_to_reference(out.cpu(), expected, name=f"out {bq, bkv, lq, lk}")


def test_sam_attention_bad_input():
    attention = ref.Attention(64, 4, downsample_rate=2)
    p = ops.Projections.of(attention)
    q, kv = torch.randn(2, 7, 64), torch.randn(2, 30, 64)
    with pytest.raises(ValueError, match="batch 2 and k/v have batch 3"):
        ops.sam_attention(q, torch.randn(3, 30, 64), torch.randn(3, 30, 64), p, 4)
    with pytest.raises(ValueError, match="q has 32 channels"):
        ops.sam_attention(torch.randn(2, 7, 32), kv, kv, p, 4)
    with pytest.raises(ValueError, match="num_heads"):
        ops.sam_attention(q, kv, kv, p, 5)
    with pytest.raises(ValueError, match="residual has shape"):
        ops.sam_attention(q, kv, kv, p, 4, residual=torch.randn(2, 8, 64))
    with pytest.raises(ValueError, match="k"):
        ops.sam_attention(q, kv, torch.randn(2, 31, 64), p, 4)
    with pytest.raises((TypeError, ValueError), match="dtype"):
        ops.sam_attention(q, kv.double(), kv.double(), p, 4)
    with pytest.raises(ValueError, match="num_heads"):
        fused.SamAttention(256, 3)  # channels not divisible by heads


# ---- the drop-in modules ---------------------------------------------------------------------------------
def transformer_inputs(b, dim, h, w, nq, *, seed, shared_image=False):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1 if shared_image else b, dim, h, w, generator=g)
    if shared_image:
        image = image.repeat_interleave(b, 0)  # SAM's mask decoder: one image, b prompts
    pe = torch.randn(1, dim, h, w, generator=g).repeat_interleave(b, 0)
    return [image, pe, torch.randn(b, nq, dim, generator=g)]


def test_state_dict_keys_match_reference_both_ways():
    for cls_fused, cls_ref in ((fused.TwoWayTransformer, ref.TwoWayTransformer),
                               (fused.Sam2TwoWayTransformer, ref.Sam2TwoWayTransformer)):
        model, model_ref = pair(cls_fused, cls_ref, 2, 64, 4, 128)
        assert list(model.state_dict()) == list(model_ref.state_dict())
        model_ref.load_state_dict(model.state_dict(), strict=True)
    sam2_keys = list(fused.Sam2TwoWayTransformer(1, 32, 2, 64).state_dict())
    assert "layers.0.mlp.layers.0.weight" in sam2_keys and "layers.0.mlp.layers.1.bias" in sam2_keys
    sam_keys = list(fused.TwoWayTransformer(1, 32, 2, 64).state_dict())
    assert "layers.0.mlp.lin1.weight" in sam_keys and "final_attn_token_to_image.out_proj.bias" in sam_keys


# (B prompts, grid h x w, Nq, embedding dim, heads, attention downsample rate)
TRANSFORMER_CASES = {
    "B=1 64x64 Nq=7": (1, 64, 64, 7, 64, 4, 2),
    "B=8 48x80 Nq=6": (8, 48, 80, 6, 64, 4, 2),
    "B=8 64x64 Nq=12 downsample 1": (8, 64, 64, 12, 64, 4, 1),
    "B=3 16x16 Nq=8 head dim 16": (3, 16, 16, 8, 128, 4, 2),
}


@pytest.mark.parametrize("case", list(TRANSFORMER_CASES))
@pytest.mark.parametrize("sam2", [False, True], ids=["sam", "sam2"])
def test_two_way_transformer_outputs_and_gradients(case, sam2):
    b, h, w, nq, dim, heads, rate = TRANSFORMER_CASES[case]
    classes = (fused.Sam2TwoWayTransformer, ref.Sam2TwoWayTransformer) if sam2 else (fused.TwoWayTransformer,
                                                                                      ref.TwoWayTransformer)
    model, model_ref = pair(*classes, 2, dim, heads, 2 * dim, attention_downsample_rate=rate, seed=b + nq)
    check(model, model_ref, transformer_inputs(b, dim, h, w, nq, seed=b), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_way_transformer_low_precision(dtype):
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 64, 4, 128, seed=3)
    check(model, model_ref, transformer_inputs(4, 64, 32, 32, 7, seed=4), dtype)


def test_two_way_transformer_real_sam_size():
    """segment-anything's mask decoder transformer: depth 2, C=256, 8 heads, mlp 2048, 64x64 image."""
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 256, 8, 2048, seed=5)
    check(model, model_ref, transformer_inputs(2, 256, 64, 64, 7, seed=6), torch.float32)


@pytest.mark.parametrize("b", [8, 64])
def test_shared_image_path_equals_per_prompt_path(b, monkeypatch):
    """A repeat_interleaved image (no gradient needed) takes the shared path: the first block's image-side
    projections once. Its outputs equal the per-prompt path's and the float64 reference's."""
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 64, 4, 128, seed=8)
    inputs = transformer_inputs(b, 64, 32, 32, 7, seed=9, shared_image=True)
    seen = []
    plan = ops.plan
    monkeypatch.setattr(ops, "plan", lambda *a: seen.append(plan(*a)) or seen[-1])
    with torch.no_grad():
        shared = model(*inputs)
        expected = model_ref.double()(*[x.double() for x in inputs])
    assert "shared_kv" in seen and "shared_q_few_keys" in seen
    seen.clear()
    per_prompt = [o.detach() for o in model(inputs[0].clone().requires_grad_(), *inputs[1:])]  # needs its grad
    assert "shared_kv" not in seen and "shared_q_few_keys" not in seen
    for s, p, e in zip(shared, per_prompt, expected):
        assert s.shape == e.shape
        torch.testing.assert_close(s, p, rtol=2e-5, atol=2e-5)
        assert_close_to_reference(s, e, name="shared output")


def test_image_batch_one_broadcasts_like_upstream():
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 1, 64, 4, 128, seed=10)
    image, pe, points = transformer_inputs(3, 64, 8, 8, 7, seed=11)
    check(model, model_ref, [image[:1], pe[:1], points], torch.float32)


def test_two_way_transformer_channels_last_and_sliced_inputs():
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 64, 4, 128, seed=12)
    image, pe, points = transformer_inputs(2, 64, 16, 16, 7, seed=13)
    image = image.contiguous(memory_format=torch.channels_last)
    points = torch.cat([points, points], dim=-1)[..., ::2]  # a strided view of the same values
    check(model, model_ref, [image, pe, points], torch.float32)


def test_two_way_transformer_compiles_fullgraph():
    model, _ = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 128, 4, 128, seed=14)
    image, pe, points = transformer_inputs(2, 128, 8, 8, 7, seed=15)
    eager = model(image, pe, points)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(image, pe, points)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sam2_attention_dropout_and_kv_in_dim():
    model, model_ref = pair(fused.Sam2Attention, ref.Sam2Attention, 64, 4, 2, dropout=0.0, kv_in_dim=32, seed=16)
    g = torch.Generator().manual_seed(17)
    check(model, model_ref, [torch.randn(2, 7, 64, generator=g), torch.randn(2, 50, 32, generator=g),
                             torch.randn(2, 50, 32, generator=g)], torch.float32)
    dropping = fused.Sam2Attention(64, 4, dropout=0.5).train()
    q = torch.randn(2, 7, 64)
    torch.manual_seed(0)
    a = dropping(q, q, q)
    torch.manual_seed(0)
    b = ref.Sam2Attention.forward(dropping, q, q, q)  # training with dropout: the reference forward
    torch.testing.assert_close(a, b)


def test_two_way_transformer_bad_input():
    model = fused.TwoWayTransformer(1, 64, 4, 128)
    image, pe, points = transformer_inputs(2, 64, 8, 8, 7, seed=18)
    with pytest.raises(ValueError, match="image_embedding has shape"):
        model(torch.randn(3, 64, 8, 8), torch.randn(3, 64, 8, 8), points)  # 3 images for 2 prompts
    with pytest.raises(ValueError, match="image_pe has shape"):
        model(image, torch.randn(2, 64, 8, 9), points)
    with pytest.raises(ValueError, match="channels"):
        model(image, pe, torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match="image_embedding"):
        model(image.flatten(2), pe, points)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device here"))])
def test_two_way_transformer_on_gpu(device, dtype):
    """The drop-in on a GPU (auto backend) vs the float64 reference on the CPU: SAM's real size, 4 prompts
    on one image (the shared path) and 4 different images."""
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 256, 8, 2048, seed=19)
    model.to(device, dtype)
    model_lowp = copy.deepcopy(model_ref).to(device, dtype)
    model_ref.double()
    for shared in (True, False):
        inputs = transformer_inputs(4, 256, 64, 64, 7, seed=20, shared_image=shared)
        with torch.no_grad():
            out = model(*[x.to(device, dtype) for x in inputs])
            out_lowp = model_lowp(*[x.to(device, dtype) for x in inputs])
            out64 = model_ref(*[x.double() for x in inputs])
        for i, (o, o_lp, o64) in enumerate(zip(out, out_lowp, out64)):
            assert_close_to_reference(o.cpu(), o64, o_lp.cpu() if dtype in LOW_PRECISION else None,
                                      name=f"output {i} (shared image: {shared})")


@pytest.mark.parametrize("shared", [True, False], ids=["shared-image", "per-prompt"])
def test_two_way_transformer_under_autocast(shared):
    """torch.autocast (bf16 on the CPU): the same output dtypes as upstream (the residual stream stays fp32)
    and an error at most 2x upstream's own under autocast, both against float64."""
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 64, 4, 128, seed=21)
    inputs = transformer_inputs(3, 64, 16, 16, 7, seed=22, shared_image=shared)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_ref = model(*inputs), model_ref(*inputs)
        out64 = copy.deepcopy(model_ref).double()(*[x.double() for x in inputs])
    for i, (o, o_ref, o64) in enumerate(zip(out, out_ref, out64)):
        assert o.dtype == o_ref.dtype, f"output {i}: {o.dtype} under autocast, upstream gives {o_ref.dtype}"
        assert rel_err(o, o64) <= max(2 * rel_err(o_ref, o64), 1e-3), f"output {i}"


# ---- the fused CUDA blocks (mmfast::sam_image_to_token / sam_token_to_image) ---------------------------------
# Their CUDA kernels run under the emulator in tests/test_cuda_emulation.py (against float64); here: the folded
# operands and the ops' argument order (through the ops' CPU kernels, which compute the same math with torch ops),
# the schemas and fake impls, which calls take them, and on a GPU the kernels inside sam_attention and the drop-in.
def _block_case(kind, b_image, b_tokens, dtype=torch.float32, seed=11, dim=64, heads=4, lq_tokens=7, l_image=150):
    """(q, k, v, residual, attention, norm) of one cross-attention block of SAM's (downsample 2): token -> image
    (queries are the tokens) or image -> token; b_image 1 shares the image over the b_tokens prompts."""
    attention = randomized(ref.Attention(dim, heads, downsample_rate=2), seed=seed).to(dtype)
    norm = randomized(torch.nn.LayerNorm(dim), seed=seed + 1).to(dtype)
    g = torch.Generator().manual_seed(seed + 2)
    image = torch.randn(b_image, l_image, dim, generator=g).to(dtype)
    tokens = torch.randn(b_tokens, lq_tokens, dim, generator=g).to(dtype)
    if kind == "token_to_image":
        return tokens, image, image * 0.5, tokens * 0.25, attention, norm
    return image, tokens, tokens * 0.5, image * 0.25, attention, norm


@pytest.mark.parametrize("b_image,b_tokens", [(3, 3), (1, 3)], ids=["per-prompt", "shared-image"])
@pytest.mark.parametrize("kind", ["image_to_token", "token_to_image"])
def test_fused_block_ops_match_reference(kind, b_image, b_tokens):
    """The fused blocks' folded operands through torch.ops.mmfast.sam_* (their CPU kernels) equal SAM's
    Attention + residual + LayerNorm in float64: the fold and the op's argument order are right."""
    q, k, v, residual, attention, norm = (x.double() for x in _block_case(kind, b_image, b_tokens))
    if kind == "image_to_token" and b_image == 1:
        residual = residual[:1]  # the shared image's residual stream
    head_dim = attention.internal_dim // attention.num_heads
    assert ops.fused_block_kind(q.shape[0], k.shape[0], residual.shape[0], q.shape[1], k.shape[1],
                                attention.num_heads, head_dim) == kind
    block = ops._fused_image_to_token if kind == "image_to_token" else ops._fused_token_to_image
    with torch.no_grad():
        out = block(q, k, v, ops.Projections.of(attention), attention.num_heads, head_dim ** -0.5, residual,
                    (norm.weight, norm.bias, norm.eps))
        want = norm(residual + attention(q, k, v))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def _op_samples(dtype=torch.float32):
    """(op, args) samples of both ops, shared (batch-1) operands included."""
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    samples = []
    for b_x in (2, 1):
        samples.append((torch.ops.mmfast.sam_image_to_token,
                        (rnd(b_x, 33, 12), rnd(2, 3 * 5, 12), rnd(2, 15), rnd(2, 15, 10), rnd(10), rnd(b_x, 33, 10),
                         rnd(10), rnd(10), 0.3, 1e-5, 5)))
        samples.append((torch.ops.mmfast.sam_token_to_image,
                        (rnd(2, 2 * 3, 12), rnd(2, 6), rnd(b_x, 70, 12), rnd(b_x, 70, 12), rnd(8, 12), rnd(8),
                         rnd(10, 8), rnd(10), rnd(2, 3, 10), rnd(10), rnd(10), 0.3, 1e-6, 2)))
    return samples


def test_fused_block_ops_opcheck_and_compile():
    """Schemas, fake impls and the CPU kernels (torch.library.opcheck), and torch.compile(fullgraph=True) over
    both ops."""
    from torch.library import opcheck
    for op, args in _op_samples():
        opcheck(op, args)
        compiled = torch.compile(lambda *a, op=op: op(*a), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(*args), op(*args))


def test_fused_block_kind_takes_sam_shapes_only():
    """The few-token cross-attentions of SAM take the fused blocks; self-attention, too many keys per head or
    heads x queries, and a residual the kernels cannot broadcast do not."""
    # (batch q, batch kv, batch residual, Lq, Lk, heads, head dim)
    assert ops.fused_block_kind(16, 16, 16, 4096, 7, 8, 16) == "image_to_token"
    assert ops.fused_block_kind(1, 64, 1, 4096, 7, 8, 16) == "image_to_token"   # shared image and residual
    assert ops.fused_block_kind(16, 16, 16, 7, 4096, 8, 16) == "token_to_image"
    assert ops.fused_block_kind(64, 1, 64, 7, 4096, 8, 16) == "token_to_image"   # shared image keys
    assert ops.fused_block_kind(16, 16, 16, 7, 7, 8, 32) is None                  # self-attention
    assert ops.fused_block_kind(2, 2, 2, 4096, 20, 2, 64) is None                  # 20 keys per head
    assert ops.fused_block_kind(2, 2, 2, 9, 4096, 8, 16) is None                   # 72 rows of heads x queries
    assert ops.fused_block_kind(64, 1, 1, 7, 4096, 8, 16) is None                  # residual [1, ...] of 64 queries


def test_fused_block_ops_reject_bad_input():
    """Direct calls get a clear error naming the argument (the CPU kernels through torch; the CUDA glue's own
    checks name the same arguments)."""
    samples = _op_samples()
    for index, change, message in ((1, lambda t: t[:, :7], "keys_per_head"),  # 7 rows: not 5 keys per head
                                   (4, lambda t: t[:9], "out_bias"),
                                   (5, lambda t: t[..., :9], "residual"),
                                   (7, lambda t: t[:3], "norm_bias")):
        op, args = samples[0]
        bad = list(args)
        bad[index] = change(bad[index])
        with pytest.raises(ValueError, match=message):
            op(*bad)
    op, args = samples[1]
    for index, change, message in ((0, lambda t: t[:, :5], "heads"), (3, lambda t: t[:, :60], "v has shape"),
                                   (6, lambda t: t[:, :7], "out_weight")):
        bad = list(args)
        bad[index] = change(bad[index])
        with pytest.raises(ValueError, match=message):
            op(*bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"] or
                         [pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device here"))])
def test_fused_blocks_on_gpu(device, dtype, monkeypatch):
    """On a GPU with backend='cuda' and no gradient: sam_attention runs the fused kernels (counted) at SAM's size,
    shared image and per prompt, within 2x the error of upstream's module in the same dtype (float64 reference);
    the TwoWayTransformer drop-in too. With a gradient the differentiable arrangements run instead."""
    calls = {"image_to_token": 0, "token_to_image": 0}
    for name in calls:
        original = getattr(ops, f"_fused_{name}")

        def counted(*a, _name=name, _original=original):
            calls[_name] += 1
            return _original(*a)

        monkeypatch.setattr(ops, f"_fused_{name}", counted)
    for kind in ("image_to_token", "token_to_image"):
        for b_image, b_tokens in ((4, 4), (1, 16)):
            case = _block_case(kind, b_image, b_tokens, dim=256, heads=8, l_image=4096)
            q, k, v, residual, attention, norm = case
            if kind == "image_to_token" and b_image == 1:
                residual = residual[:1]
            with torch.no_grad():
                want = norm.double()(residual.double() + copy.deepcopy(attention).double()(q.double(), k.double(),
                                                                                          v.double()))
                lowp = copy.deepcopy(attention).to(device, dtype)
                norm_lowp = copy.deepcopy(norm).to(device, dtype)
                qd, kd, vd, rd = (x.to(device, dtype) for x in (q, k, v, residual))
                same = norm_lowp(rd + lowp(qd, kd, vd))
                before = calls[kind]
                out = ops.sam_attention(qd, kd, vd, ops.Projections.of(lowp), lowp.num_heads, residual=rd,
                                        norm=(norm_lowp.weight, norm_lowp.bias, norm_lowp.eps), backend="cuda")
                assert calls[kind] == before + 1, f"{kind} did not run the fused kernel"
                if dtype == torch.bfloat16:  # and under torch.compile (no graph break)
                    compiled = torch.compile(ops.sam_attention, fullgraph=True)
                    again = compiled(qd, kd, vd, ops.Projections.of(lowp), lowp.num_heads, residual=rd,
                                     norm=(norm_lowp.weight, norm_lowp.bias, norm_lowp.eps), backend="cuda")
                    assert_close_to_reference(again.cpu(), want, same.cpu(), name=f"compiled {kind}")
            assert_close_to_reference(out.cpu(), want, same.cpu() if dtype in LOW_PRECISION else None,
                                      name=f"{kind} b_image={b_image} b_tokens={b_tokens}")
    model, model_ref = pair(fused.TwoWayTransformer, ref.TwoWayTransformer, 2, 256, 8, 2048, seed=19)
    model.to(device, dtype)
    model_lowp = copy.deepcopy(model_ref).to(device, dtype)
    model_ref.double()
    inputs = transformer_inputs(4, 256, 64, 64, 7, seed=20, shared_image=True)
    with torch.no_grad(), mmfast.use_backend("cuda"):
        before = dict(calls)
        out = model(*[x.to(device, dtype) for x in inputs])
        assert calls["image_to_token"] - before["image_to_token"] == 2
        assert calls["token_to_image"] - before["token_to_image"] == 3
        out_lowp = model_lowp(*[x.to(device, dtype) for x in inputs])
        out64 = model_ref(*[x.double() for x in inputs])
    for i, (o, o_lp, o64) in enumerate(zip(out, out_lowp, out64)):
        assert_close_to_reference(o.cpu(), o64, o_lp.cpu() if dtype in LOW_PRECISION else None, name=f"output {i}")
    q, k, v, residual, attention, norm = (x.to(device, dtype) for x in _block_case("token_to_image", 2, 2))
    before = dict(calls)
    ops.sam_attention(q.requires_grad_(), k, v, ops.Projections.of(attention), attention.num_heads,
                      residual=residual, norm=(norm.weight, norm.bias, norm.eps), backend="cuda").sum().backward()
    assert calls == before and q.grad is not None
