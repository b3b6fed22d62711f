"""Drop-in for LLaVA's vision-language projector (`mm_projector`): haotian-liu/LLaVA's `build_vision_projector`
(types "linear" and "mlp{N}x_gelu", nn.Sequential / nn.Linear state_dict keys) and transformers'
`LlavaMultiModalProjector` (keys linear_1 / linear_2); upstream's code is in mmfast/reference/llava.py.

Fusing bias and GELU into the first GEMM (issue 16) was measured before it was built, on the 2-core dev CPU
(AMD EPYC), torch 2.14.1, at LLaVA-1.5's [16, 576, 1024 -> 4096 -> 4096] (benchmarks/_llava_projector_timing.py;
the table and the decision in benchmarks/RESULTS.md, "LLaVA projector"). The bias is already inside the GEMM
upstream (F.linear on a contiguous input is one addmm); what is left is the GELU pass and its second
[N, 4096] buffer. torch._addmm_activation on the CPU is addmm then an in-place (exact) GELU and has no
backward; on CUDA its cuBLASLt epilogue is the tanh GELU (pytorch#104061), not LLaVA's exact one.
- Inference (no gradient needed), CPU, fp32: addmm, then GELU in place (no second buffer): medians of 6,
  order rotated, 2258 vs 2430 ms upstream (0.93x the time; a second run 0.91x). That path is below.
  bf16: 1057 vs 1045 ms (the bare GEMMs 1021 ms): nothing to gain, upstream's modules run.
- Training: the bias and GELU passes are ~3.5% of forward + backward (the bare GEMMs 5916 vs 6136 ms),
  within this machine's noise; nothing left to fuse without a kernel, so upstream's modules run.
- CUDA: not measured (no GPU lent to this task): upstream's modules run.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from mmfast.reference import llava as _ref

_MLP = re.compile(r"^mlp(\d+)x_gelu$")
LAYOUTS = ("llava", "transformers")


def _depth(projector_type) -> int:
    """The number of Linears of a LLaVA projector type ("linear": 1, "mlp{N}x_gelu": N >= 1)."""
    if projector_type == "linear":
        return 1
    match = _MLP.match(projector_type) if isinstance(projector_type, str) else None
    if match is None or int(match.group(1)) < 1:
        why = " (nothing to run: use upstream's IdentityMap)" if projector_type == "identity" else ""
        raise ValueError(f"mmfast: projector_type must be 'linear' or 'mlp{{N}}x_gelu' with N >= 1, "
                         f"got {projector_type!r}{why}")
    return int(match.group(1))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mmfast: {name} must be a positive int, got {value!r}")
    return value


class LlavaProjector(nn.Module):
    """LLaVA's projector from vision features [..., mm_hidden_size] to language-model embeddings [..., hidden_size].

    layout="llava": haotian-liu/LLaVA's module: projector_type "linear" is one Linear (keys "weight", "bias"),
    "mlp{N}x_gelu" is Sequential(Linear, GELU, Linear, ..., N Linears) (keys "0.weight", "0.bias", "2.weight", ...).
    layout="transformers": transformers' LlavaMultiModalProjector (keys "linear_1.*", "linear_2.*"): two Linears
    with `act` (an ACT2FN name: "gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "relu", "silu") between them,
    `bias` = config.multimodal_projector_bias; mm_hidden_size is the vision hidden size times the number of
    vision feature layers. `LlavaProjector.from_config(config)` reads either project's config.
    """

    def __init__(self, mm_hidden_size: int, hidden_size: int, projector_type: str = "mlp2x_gelu", *,
                 layout: str = "llava", act: str = "gelu", bias: bool = True):
        super().__init__()
        mm_hidden_size = _positive_int("mm_hidden_size", mm_hidden_size)
        hidden_size = _positive_int("hidden_size", hidden_size)
        depth = _depth(projector_type)
        if layout == "llava":
            if act != "gelu" or bias is not True:
                raise ValueError("mmfast: layout='llava' is LLaVA's builder, which has exact GELU and biases only "
                                 f"(got act={act!r}, bias={bias!r}); use layout='transformers' for other choices")
            if projector_type == "linear":  # upstream returns the bare nn.Linear: its parameters are the module's own
                # ("mlp1x_gelu" is a Sequential of that one Linear: keys "0.weight", "0.bias")
                linear = nn.Linear(mm_hidden_size, hidden_size)
                self.weight, self.bias = linear.weight, linear.bias
                return
            self.add_module("0", nn.Linear(mm_hidden_size, hidden_size))
            for i in range(1, depth):
                self.add_module(str(2 * i - 1), nn.GELU())
                self.add_module(str(2 * i), nn.Linear(hidden_size, hidden_size))
        elif layout == "transformers":
            if depth != 2:
                raise ValueError("mmfast: layout='transformers' is LlavaMultiModalProjector, always two Linears: "
                                 f"projector_type must be 'mlp2x_gelu' (the activation is `act`), got {projector_type!r}")
            self.linear_1 = nn.Linear(mm_hidden_size, hidden_size, bias=bias)
            self.act = _ref.activation(act)
            self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)
        else:
            raise ValueError(f"mmfast: layout must be one of {LAYOUTS}, got {layout!r}")

    @classmethod
    def from_config(cls, config) -> "LlavaProjector":
        """From a transformers LlavaConfig (it has vision_config and text_config) or a LLaVA model config
        (mm_hidden_size, hidden_size, mm_projector_type; LLaVA's default type is "linear")."""
        if hasattr(config, "vision_config") and hasattr(config, "text_config"):
            layers = config.vision_feature_layer
            n_layers = 1 if isinstance(layers, int) else len(layers)
            return cls(config.vision_config.hidden_size * n_layers, config.text_config.hidden_size, layout="transformers",
                       act=config.projector_hidden_act, bias=getattr(config, "multimodal_projector_bias", True))
        for name in ("mm_hidden_size", "hidden_size"):
            if not hasattr(config, name):
                raise ValueError(f"mmfast: config must be a transformers LlavaConfig (vision_config, text_config) or a "
                                 f"LLaVA config with mm_hidden_size and hidden_size; it has no {name}")
        return cls(config.mm_hidden_size, config.hidden_size, getattr(config, "mm_projector_type", "linear"))

    @property
    def in_features(self) -> int:
        first = self.weight if "weight" in self._parameters else self._layers()[0].weight
        return first.shape[1]

    def _layers(self) -> list[nn.Module]:
        # From the submodules alone (no attribute set in __init__), so an upstream instance whose class is
        # swapped for this one (mmfast.patch) runs too.
        return list(self._modules.values())

    # nn.Sequential's indexing, as on upstream's mm_projector (e.g. mm_projector[0].weight)
    def __getitem__(self, idx: int) -> nn.Module:
        return self._layers()[idx]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._layers())

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        _check_features(image_features, self.in_features)
        if "weight" in self._parameters:  # type "linear"
            return F.linear(image_features, self.weight, self.bias)
        x = image_features
        layers = self._layers()
        fuse = _inference_fusion(x, self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            approximate = _gelu_kind(layers[i + 1]) if fuse and i + 1 < len(layers) and _plain_linear(layer) else None
            if approximate is None:
                x = layer(x)
                i += 1
                continue
            # addmm then GELU in place over its output: one [N, hidden] buffer instead of two (measured above)
            x2 = x.reshape(-1, x.shape[-1])
            h = (torch.mm(x2, layer.weight.t()) if layer.bias is None
                 else torch.addmm(layer.bias, x2, layer.weight.t()))
            x = _gelu_inplace(h, approximate)
            x = x.view(*image_features.shape[:-1], x.shape[-1])
            i += 2
        return x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, 'linear'" if "weight" in self._parameters else ""


def _inference_fusion(x: torch.Tensor, module: nn.Module) -> bool:
    """The in-place GELU path applies: CPU, fp32 (where it measured faster), no autograd graph to keep
    (upstream's GELU backward needs the pre-activation that the in-place pass overwrites), no autocast."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    return all(p.dtype == x.dtype and p.device == x.device for p in module.parameters())


def _plain_linear(module: nn.Module) -> bool:
    """Exactly nn.Linear without hooks: its parameters may be used directly (a LoRA-wrapped or hooked Linear
    is called as a module)."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


_GELU_KINDS = {_ref.GELUActivation: "none", _ref.PytorchGELUTanh: "tanh"}


def _gelu_kind(module: nn.Module) -> str | None:
    """F.gelu's `approximate` for a plain GELU module (nn.GELU, ACT2FN's "gelu" / "gelu_pytorch_tanh"), else None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    if type(module) is nn.GELU:
        return module.approximate
    cls = type(module)
    if (cls.__module__, cls.__name__) == ("transformers.activations", "GELUActivation"):
        # transformers' ACT2FN["gelu"] on a patched upstream instance: self.act is F.gelu unless use_gelu_python
        return "none" if module.__dict__.get("act") is F.gelu else None
    return _GELU_KINDS.get(cls)


def _gelu_inplace(h: torch.Tensor, approximate: str) -> torch.Tensor:
    return torch.ops.aten.gelu_(h, approximate=approximate)


def _check_features(x, in_features: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mmfast: image_features must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"mmfast: image_features must have shape [..., {in_features}] (the projector's "
                         f"mm_hidden_size), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"mmfast: image_features must be a floating tensor, got {x.dtype}")
