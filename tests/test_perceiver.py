"""Drop-in Perceiver Resampler modules (mmfast.nn.perceiver) against the reference modules
(mmfast.reference.perceiver, which mirror flamingo-pytorch 0.1.2 and open_flamingo 2.0.1)."""
import pytest
import torch

from conftest import assert_close_to_reference, rel_err
from mmfast.nn import perceiver as fused
from mmfast.reference import perceiver as ref


def _pair(cls_fused, cls_ref, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    model_ref = cls_ref(**kwargs)
    model = cls_fused(**kwargs)
    model.load_state_dict(model_ref.state_dict(), strict=True)
    return model.to(dtype), model_ref


def _check_model(cls_fused, cls_ref, x_shape, dtype=torch.float32, **kwargs):
    model, model_ref = _pair(cls_fused, cls_ref, dtype, **kwargs)
    """Output and every gradient (input and parameters) of the fused module vs the reference in fp64."""
    x = torch.randn(*x_shape)
    x_fused = x.to(dtype).clone().requires_grad_(True)
    out = model(x_fused)
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(dtype))
    x64 = x.detach().double().requires_grad_(True)
    ref64 = model_ref.double()
    out64 = ref64(x64)
    out64.backward(g)
    ref_lowp = None
    if dtype != torch.float32:
        model_lowp = cls_ref(**kwargs).to(dtype)
        model_lowp.load_state_dict(model_ref.state_dict())
        x_lowp = x.to(dtype).clone().requires_grad_(True)
        out_lowp = model_lowp(x_lowp)
        out_lowp.backward(g.to(dtype))
        ref_lowp = (out_lowp, x_lowp.grad, [p.grad for p in model_lowp.parameters()])
    assert_close_to_reference(out, out64, ref_lowp and ref_lowp[0], name="output", fp32_rtol=2e-5)
    assert_close_to_reference(x_fused.grad, x64.grad, ref_lowp and ref_lowp[1], name="grad x", fp32_rtol=2e-5)
    names = [n for n, _ in model.named_parameters()]
    for i, (name, p, p64) in enumerate(zip(names, model.parameters(), ref64.parameters())):
        assert_close_to_reference(p.grad, p64.grad, ref_lowp and ref_lowp[2][i], name=f"grad {name}", fp32_rtol=2e-5)


SMALL = dict(dim=64, depth=2, dim_head=16, heads=4, num_latents=8, num_media_embeds=3)


@pytest.mark.parametrize("x_shape", [(2, 33, 64), (2, 3, 17, 64), (1, 1, 1, 64)], ids=["3d", "4d", "n1"])
def test_resampler_matches_reference(x_shape):
    _check_model(fused.PerceiverResampler, ref.PerceiverResampler, x_shape, **SMALL)


def test_resampler_openflamingo_sizes():
    # OpenFlamingo's shapes at reduced depth: b=2, t=3, n=256, m=64, D=1024, 8 heads x 64.
    _check_model(fused.PerceiverResampler, ref.PerceiverResampler, (2, 3, 256, 1024),
                 dim=1024, depth=1, dim_head=64, heads=8, num_latents=64, num_media_embeds=3)


@pytest.mark.parametrize("kwargs,x_shape", [
    (dict(dim=96 * 2, depth=1, dim_head=96, heads=16, num_latents=1, num_media_embeds=2), (2, 2, 257, 192)),
    (dict(dim=32, depth=1, dim_head=16, heads=2, num_latents=1, num_media_embeds=1), (3, 1, 1, 32)),
], ids=["d96-h16-n257", "m1-n1"])
def test_resampler_edge_sizes(kwargs, x_shape):
    _check_model(fused.PerceiverResampler, ref.PerceiverResampler, x_shape, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resampler_low_precision_2x_rule(dtype):
    _check_model(fused.PerceiverResampler, ref.PerceiverResampler, (2, 2, 40, 64), dtype=dtype, **SMALL)


@pytest.mark.parametrize("opt", [dict(), dict(max_num_media=3, max_num_frames=2)], ids=["plain", "embs"])
def test_openflamingo_resampler(opt):
    _check_model(fused.OpenFlamingoPerceiverResampler, ref.OpenFlamingoPerceiverResampler, (2, 3, 2, 9, 32),
                 dim=32, depth=2, dim_head=8, heads=4, num_latents=5, **opt)


def test_state_dict_keys_and_strict_load_both_ways():
    model, model_ref = _pair(fused.PerceiverResampler, ref.PerceiverResampler, **SMALL)
    assert list(model.state_dict()) == list(model_ref.state_dict())
    model_ref.load_state_dict(model.state_dict(), strict=True)
    attn = fused.PerceiverAttention(dim=32, dim_head=8, heads=4)
    assert list(attn.state_dict()) == ["norm_media.weight", "norm_media.bias", "norm_latents.weight",
                                       "norm_latents.bias", "to_q.weight", "to_kv.weight", "to_out.weight"]


def test_old_checkpoint_time_pos_emb_loads_into_media_pos_emb():
    model, model_ref = _pair(fused.PerceiverResampler, ref.PerceiverResampler, **SMALL)
    old = model_ref.state_dict()
    old["time_pos_emb"] = old.pop("media_pos_emb")
    fresh = fused.PerceiverResampler(**SMALL)
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.media_pos_emb, model_ref.media_pos_emb)


def test_attention_module_uses_the_core_in_media_then_latents_order():
    torch.manual_seed(1)
    attn_ref = ref.PerceiverAttention(dim=32, dim_head=8, heads=4)
    attn = fused.PerceiverAttention(dim=32, dim_head=8, heads=4)
    attn.load_state_dict(attn_ref.state_dict())
    x, lat = torch.randn(2, 3, 11, 32), torch.randn(2, 3, 5, 32)
    torch.testing.assert_close(attn(x, lat), attn_ref(x, lat), rtol=1e-5, atol=1e-5)


def test_bad_input():
    model = fused.PerceiverResampler(**SMALL)
    with pytest.raises(ValueError, match="x must have 3 or 4 dimensions"):
        model(torch.randn(64))
    with pytest.raises(ValueError, match="num_media_embeds is 3"):
        model(torch.randn(1, 4, 5, 64))
    attn = fused.PerceiverAttention(dim=32, dim_head=8, heads=4)
    with pytest.raises(ValueError, match="must share b, t and D"):
        attn(torch.randn(2, 1, 5, 32), torch.randn(3, 1, 4, 32))
    with pytest.raises(ValueError, match="x must have 5 dimensions"):
        fused.OpenFlamingoPerceiverResampler(dim=32, depth=1)(torch.randn(2, 3, 4, 32))


def test_modules_that_are_not_plain_are_called_as_modules():
    """The fused paths use a Linear's weight directly only when it is a plain nn.Linear without hooks;
    a hooked or wrapped layer (LoRA-style) must still run, and its effect must show in the output."""
    model, model_ref = _pair(fused.PerceiverResampler, ref.PerceiverResampler, **SMALL)
    x = torch.randn(2, 1, 9, 64)

    def double_output(module, inputs, output):
        return output * 2

    for m in (model, model_ref):
        m.layers[0][0].to_out.register_forward_hook(double_output)   # attention output projection
        m.layers[1][1][3].register_forward_hook(double_output)       # second feed-forward Linear
        m.layers[1][0].register_forward_pre_hook(lambda module, args: (args[0], args[1] * 0.5))
    out, expected = model(x), model_ref(x)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), model_ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=2e-5, atol=2e-5, msg=name)


def test_resampler_under_autocast_keeps_upstream_dtypes():
    """torch.autocast (bf16 on the CPU): output dtype as upstream's (fp32 residual stream) and an error at
    most 2x upstream's own under autocast, both against float64."""
    model, model_ref = _pair(fused.PerceiverResampler, ref.PerceiverResampler, **SMALL)
    x = torch.randn(2, 1, 20, 64)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_ref = model(x), model_ref(x)
        out64 = model_ref.double()(x.double())
    assert out.dtype == out_ref.dtype
    assert rel_err(out, out64) <= max(2 * rel_err(out_ref, out64), 1e-3)


def test_resampler_compiles_fullgraph_forward_and_backward():
    model, _ = _pair(fused.PerceiverResampler, ref.PerceiverResampler, **SMALL)
    x = torch.randn(2, 2, 17, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, out_c = model(x), compiled(x)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_c,) = torch.autograd.grad(out_c.square().sum(), x)
    torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the inference path (in-place GELU, shared first-layer latents)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
