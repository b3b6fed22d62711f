"""mmfast.nn.LlavaProjector against upstream's projectors (mmfast/reference/llava.py): outputs and every gradient,
state_dict keys and strict loads both ways, configs of both projects, class swap, bad input."""
import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_close_to_reference
import mmfast.nn.llava as llava_module
from mmfast.nn import LlavaProjector
from mmfast.reference import llava as ref

MM, HIDDEN = 24, 40


def llava_config(projector_type):
    return SimpleNamespace(mm_hidden_size=MM, hidden_size=HIDDEN, mm_projector_type=projector_type)


def hf_config(act="gelu", bias=True, feature_layer=-2, vision=MM):
    return SimpleNamespace(vision_config=SimpleNamespace(hidden_size=vision), text_config=SimpleNamespace(hidden_size=HIDDEN),
                           projector_hidden_act=act, multimodal_projector_bias=bias, vision_feature_layer=feature_layer)


LLAVA = ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu"]
HF = [dict(), dict(act="gelu_pytorch_tanh"), dict(act="gelu_new"), dict(act="quick_gelu"), dict(act="silu"),
      dict(bias=False), dict(feature_layer=[-2, -5], vision=MM // 2)]


def upstream_and_drop_in(config):
    torch.manual_seed(0)
    upstream = (ref.LlavaMultiModalProjector(config) if hasattr(config, "text_config")
                else ref.build_vision_projector(config))
    model = LlavaProjector.from_config(config)
    assert list(model.state_dict()) == list(upstream.state_dict())
    model.load_state_dict(upstream.state_dict(), strict=True)
    upstream.load_state_dict(model.state_dict(), strict=True)
    return upstream, model


def run(module, x, dtype):
    module = module.to(dtype)
    x = x.detach().to(dtype).requires_grad_()
    out = module(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return out, grads, [n for n, _ in module.named_parameters()]


def check_against_upstream(config, dtype, shape=(2, 7)):
    upstream, model = upstream_and_drop_in(config)
    x = torch.randn(*shape, model.in_features)
    out64, grads64, names = run(copy.deepcopy(upstream), x, torch.float64)
    out_lp, grads_lp = None, [None] * len(grads64)  # the low-precision reference, for fp16/bf16's 2x rule
    if dtype != torch.float32:
        out_lp, grads_lp, _ = run(copy.deepcopy(upstream), x, dtype)
    out, grads, names_model = run(model, x, dtype)
    assert names_model == names
    assert_close_to_reference(out, out64, out_lp, name="output")
    for name, g, g64, g_lp in zip(["image_features"] + names, grads, grads64, grads_lp):
        assert_close_to_reference(g, g64, g_lp, name=f"grad {name}")


@pytest.mark.parametrize("projector_type", LLAVA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llava_builder_types_match_upstream(projector_type, dtype):
    check_against_upstream(llava_config(projector_type), dtype)


@pytest.mark.parametrize("kwargs", HF, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_transformers_projector_matches_upstream(kwargs):
    check_against_upstream(hf_config(**kwargs), torch.float32)


def test_transformers_projector_bf16_and_odd_shapes():
    check_against_upstream(hf_config(), torch.bfloat16)
    check_against_upstream(hf_config(), torch.float32, shape=(5,))          # 2-D input
    check_against_upstream(hf_config(), torch.float32, shape=(1, 2, 3))    # 4-D input


@pytest.fixture
def gelu_calls(monkeypatch):
    """Counts the in-place GELU path's calls."""
    calls = []
    real = llava_module._gelu_inplace

    def counting(h, approximate):
        calls.append(approximate)
        return real(h, approximate)

    monkeypatch.setattr(llava_module, "_gelu_inplace", counting)
    return calls


@pytest.mark.parametrize("config", [llava_config("mlp3x_gelu"), hf_config(), hf_config(act="gelu_pytorch_tanh", bias=False),
                                    hf_config(act="quick_gelu")], ids=["llava-mlp3x", "hf-gelu", "hf-tanh-nobias", "hf-quick"])
def test_inference_path_equals_upstream_bitwise(config, gelu_calls):
    """fp32 without autograd: addmm + in-place GELU, the same kernels as upstream's F.linear + F.gelu."""
    upstream, model = upstream_and_drop_in(config)
    x = torch.randn(3, 11, MM)
    with torch.no_grad():
        expected, out = upstream(x), model(x)
    assert torch.equal(out, expected)
    fused = {"mlp3x_gelu": ["none", "none"]}.get(getattr(config, "mm_projector_type", None))
    act = getattr(config, "projector_hidden_act", None)
    assert gelu_calls == (fused or {"gelu": ["none"], "gelu_pytorch_tanh": ["tanh"], "quick_gelu": []}[act])
    # parameters that need no gradient: no graph to keep either
    model.requires_grad_(False)
    gelu_calls.clear()
    assert torch.equal(model(x), expected) and len(gelu_calls) == len(fused or [1] * (act != "quick_gelu"))


def test_upstream_path_where_the_fusion_does_not_apply(gelu_calls):
    upstream, model = upstream_and_drop_in(llava_config("mlp2x_gelu"))
    x = torch.randn(2, 5, MM)
    model(x).sum().backward()                 # autograd: GELU's backward needs its input
    with torch.no_grad():
        model.bfloat16()(x.bfloat16())        # bf16: measured no faster
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        handle = model[1].register_forward_hook(lambda *args: None)
        model(x)                              # a hooked GELU is called as a module
        handle.remove()
    assert gelu_calls == []
    with torch.no_grad():
        model(x)
    assert gelu_calls == ["none"]


def test_state_dict_keys():
    assert list(LlavaProjector(MM, HIDDEN, "linear").state_dict()) == ["weight", "bias"]
    assert list(LlavaProjector(MM, HIDDEN, "mlp3x_gelu").state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert list(LlavaProjector(MM, HIDDEN, layout="transformers").state_dict()) == [
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]
    assert list(LlavaProjector(MM, HIDDEN, layout="transformers", bias=False).state_dict()) == [
        "linear_1.weight", "linear_2.weight"]


def test_sequential_indexing():
    upstream, model = upstream_and_drop_in(llava_config("mlp2x_gelu"))
    assert len(model) == len(upstream) == 3
    assert [type(m) for m in model] == [type(m) for m in upstream]
    assert model[0] is model._modules["0"] and model[-1] is model._modules["2"]


def test_llava_default_type_is_linear():
    # LLaVA's builder reads getattr(config, "mm_projector_type", "linear")
    model = LlavaProjector.from_config(SimpleNamespace(mm_hidden_size=MM, hidden_size=HIDDEN))
    assert list(model.state_dict()) == ["weight", "bias"]


def test_upstream_instance_with_swapped_class_runs():
    """mmfast.patch swaps __class__ on upstream instances: the forward must use only their submodules."""
    for config in (hf_config(), llava_config("mlp2x_gelu")):
        upstream, _ = upstream_and_drop_in(config)
        x = torch.randn(3, MM)
        expected = upstream(x)
        swapped = ref.LlavaMultiModalProjector(config) if hasattr(config, "text_config") else ref.build_vision_projector(config)
        swapped.load_state_dict(upstream.state_dict())
        swapped.__class__ = LlavaProjector
        torch.testing.assert_close(swapped(x), expected, rtol=0, atol=0)


def test_bad_input():
    model = LlavaProjector(MM, HIDDEN)
    with pytest.raises(ValueError, match=rf"image_features must have shape \[\.\.\., {MM}\].*\(2, 7, 23\)"):
        model(torch.randn(2, 7, MM - 1))
    with pytest.raises(ValueError, match="image_features must have shape"):
        model(torch.tensor(1.0))
    with pytest.raises(TypeError, match="image_features must be a floating tensor"):
        model(torch.ones(2, MM, dtype=torch.int64))
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        model([[0.0] * MM])
    with pytest.raises(ValueError, match="projector_type must be .*'identity'.*IdentityMap"):
        LlavaProjector(MM, HIDDEN, "identity")
    for bad in ("mlp0x_gelu", "mlp2x_relu", "", None):
        with pytest.raises(ValueError, match="projector_type must be"):
            LlavaProjector(MM, HIDDEN, bad)
    with pytest.raises(ValueError, match="layout must be one of"):
        LlavaProjector(MM, HIDDEN, layout="hf")
    with pytest.raises(ValueError, match="layout='llava'.*act='relu'"):
        LlavaProjector(MM, HIDDEN, act="relu")
    with pytest.raises(ValueError, match="layout='llava'.*bias=False"):
        LlavaProjector(MM, HIDDEN, bias=False)
    with pytest.raises(ValueError, match="always two Linears.*'mlp3x_gelu'"):
        LlavaProjector(MM, HIDDEN, "mlp3x_gelu", layout="transformers")
    with pytest.raises(ValueError, match="projector_hidden_act must be one of"):
        LlavaProjector(MM, HIDDEN, layout="transformers", act="gelu_10")
    for name, args in (("mm_hidden_size", (0, HIDDEN)), ("hidden_size", (MM, 2.5))):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            LlavaProjector(*args)
    with pytest.raises(ValueError, match="it has no mm_hidden_size"):
        LlavaProjector.from_config(SimpleNamespace(hidden_size=HIDDEN))


@pytest.mark.parametrize("act,bias,layers", [("gelu", True, -2), ("gelu_pytorch_tanh", True, -2), ("gelu_new", False, -2),
                                             ("quick_gelu", True, [-2, -5]), ("silu", True, -1)])
def test_against_transformers_when_installed(act, bias, layers, gelu_calls):
    transformers = pytest.importorskip("transformers", reason="transformers is a test pin (requirements.txt)")
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=MM, num_attention_heads=4),
        text_config=dict(model_type="llama", hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=4),
        projector_hidden_act=act, multimodal_projector_bias=bias, vision_feature_layer=layers)
    torch.manual_seed(0)
    upstream = LlavaMultiModalProjector(config)
    model = LlavaProjector.from_config(config)
    assert list(model.state_dict()) == list(upstream.state_dict())
    model.load_state_dict(upstream.state_dict(), strict=True)
    x = torch.randn(2, 5, model.in_features)
    torch.testing.assert_close(model(x), upstream(x), rtol=0, atol=0)
    if act != "gelu":
        return
    # mmfast.patch swaps the class; the instance keeps transformers' GELUActivation and takes the in-place path
    import mmfast

    with torch.no_grad():
        expected = upstream(x)
        report = mmfast.patch(upstream)
        assert [r.drop_in for r in report.replaced] == ["LlavaProjector"] and isinstance(upstream, LlavaProjector)
        assert torch.equal(upstream(x), expected)
    assert gelu_calls == ["none"]
    mmfast.unpatch(upstream)
    assert type(upstream) is LlavaMultiModalProjector
