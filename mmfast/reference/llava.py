"""LLaVA's vision-language projector as upstream builds it: the oracle for mmfast.nn.LlavaProjector.

- haotian-liu/LLaVA, llava/model/multimodal_projector/builder.py, `build_vision_projector(config)`:
  `mm_projector_type` "linear" -> nn.Linear(mm_hidden_size, hidden_size) (keys "weight", "bias");
  "mlp{N}x_gelu" -> nn.Sequential(Linear(mm_hidden_size, hidden_size), GELU(), Linear(hidden_size, hidden_size),
  GELU(), ...) with N Linears (keys "0.weight", "0.bias", "2.weight", ...); "identity" -> IdentityMap; anything
  else raises ValueError. nn.GELU() is the exact (erf) GELU.
- transformers, models/llava/modeling_llava.py, `LlavaMultiModalProjector(config)`: linear_1 =
  Linear(vision_config.hidden_size * number of vision feature layers, text_config.hidden_size,
  bias=config.multimodal_projector_bias), act = ACT2FN[config.projector_hidden_act], linear_2 =
  Linear(text_config.hidden_size, text_config.hidden_size, bias=...); forward = linear_2(act(linear_1(x))).
  Releases before `multimodal_projector_bias` existed always had biases (its default, True, here too).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# ---- haotian-liu/LLaVA ---------------------------------------------------------------------------------------


class IdentityMap(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, delay_load=False, **kwargs):
    projector_type = getattr(config, "mm_projector_type", "linear")

    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)

    mlp_gelu_match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if mlp_gelu_match:
        mlp_depth = int(mlp_gelu_match.group(1))
        modules = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(1, mlp_depth):
            modules.append(nn.GELU())
            modules.append(nn.Linear(config.hidden_size, config.hidden_size))
        return nn.Sequential(*modules)

    if projector_type == "identity":
        return IdentityMap()

    raise ValueError(f"Unknown projector type: {projector_type}")


# ---- transformers ------------------------------------------------------------------------------------------
# The ACT2FN entries a LLaVA config uses (transformers/activations.py), each the same computation as there.


class GELUActivation(nn.Module):
    """ACT2FN["gelu"]: the exact (erf) GELU."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input)


class PytorchGELUTanh(nn.Module):
    """ACT2FN["gelu_pytorch_tanh"]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, approximate="tanh")


class NewGELUActivation(nn.Module):
    """ACT2FN["gelu_new"]: the tanh approximation written out (Google BERT / GPT-2)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class QuickGELUActivation(nn.Module):
    """ACT2FN["quick_gelu"]."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * torch.sigmoid(1.702 * input)


ACT2FN = {"gelu": GELUActivation, "gelu_pytorch_tanh": PytorchGELUTanh, "gelu_new": NewGELUActivation,
          "quick_gelu": QuickGELUActivation, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}


def activation(name: str) -> nn.Module:
    """ACT2FN[name] (transformers' ClassInstantier builds a new instance per lookup)."""
    if name not in ACT2FN:
        raise ValueError(f"mmfast: projector_hidden_act must be one of {sorted(ACT2FN)}, got {name!r}")
    return ACT2FN[name]()


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, config):
        super().__init__()
        # We have hidden_size * the number of vision feature layers
        num_feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        bias = getattr(config, "multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size * num_feature_layers,
                                  config.text_config.hidden_size, bias=bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=bias)

    def forward(self, image_features):
        hidden_states = self.linear_1(image_features)
        hidden_states = self.act(hidden_states)
        hidden_states = self.linear_2(hidden_states)
        return hidden_states
