"""Plain-PyTorch oracle for SAM's mask-decoder two-way transformer.

Mirrors segment-anything 1.0 (`segment_anything/modeling/transformer.py` and `common.py`'s MLPBlock):
same constructors, state_dict keys and forward math. The attention core the kernels implement is
`sam_attention_core`: softmax(q @ k.T * scale) @ v per head.

SAM2 (`sam2/modeling/sam/transformer.py`, `sam2_utils.MLP`) has the same block and transformer math;
it differs in its Attention (`dropout`, `kv_in_dim`, F.scaled_dot_product_attention) and its MLP
(`layers.0/1` keys). The Sam2* classes below swap those two parts through the `attention_cls` /
`make_mlp` hooks, so the block and transformer forward exist once.
"""
from __future__ import annotations

import math
from typing import Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def sam_attention_core(q: Tensor, k: Tensor, v: Tensor, scale=None) -> Tensor:
    """softmax(q @ k.T * scale) @ v on [B, H, L, d]; scale defaults to d ** -0.5.

    With the default scale the logits are divided by sqrt(d), as upstream does, for identical rounding."""
    attn = q @ k.permute(0, 1, 3, 2)
    attn = attn / math.sqrt(q.shape[-1]) if scale is None else attn * scale
    return torch.softmax(attn, dim=-1) @ v


class MLPBlock(nn.Module):
    """segment_anything.modeling.common.MLPBlock: lin2(act(lin1(x))). Its default activation is GELU;
    the two-way transformer passes ReLU."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention whose projections may downscale the channels (internal_dim =
    embedding_dim // downsample_rate); all four Linears have biases."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"mmfast: num_heads ({num_heads}) must divide embedding_dim // downsample_rate "
                             f"({embedding_dim} // {downsample_rate} = {self.internal_dim})")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor, num_heads: int) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # [B, heads, N, C/heads]

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, n_heads, n_tokens, c_per_head = x.shape
        return x.transpose(1, 2).reshape(b, n_tokens, n_heads * c_per_head)  # [B, N, C]

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        return self.out_proj(self._recombine_heads(sam_attention_core(q, k, v)))


class TwoWayAttentionBlock(nn.Module):
    """(1) self-attention of the tokens, (2) tokens -> image cross-attention, (3) MLP on the tokens,
    (4) image -> tokens cross-attention; a LayerNorm after each. With skip_first_layer_pe (the first
    layer) step 1 gets no positional encoding and no residual."""

    attention_cls = Attention  # the parts SAM2 and mmfast.nn swap; the forward below is shared

    @staticmethod
    def make_mlp(embedding_dim: int, mlp_dim: int, activation: Type[nn.Module]) -> nn.Module:
        return MLPBlock(embedding_dim, mlp_dim, activation)

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        attention = self.attention_cls
        self.self_attn = attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = self.make_mlp(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = attention(embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """forward(image_embedding [B, C, H, W], image_pe [B, C, H, W], point_embedding [B, Nq, C])
    -> (queries [B, Nq, C], keys [B, H*W, C])."""

    block_cls = TwoWayAttentionBlock

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            self.block_cls(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 activation=activation, attention_downsample_rate=attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = self.block_cls.attention_cls(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)  # [B, C, H, W] -> [B, HW, C], a view
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)
        q = queries + point_embedding
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys


# ---- SAM2 (sam2/modeling/sam/transformer.py, sam2/modeling/sam2_utils.py) ------------------------------
class Sam2MLP(nn.Module):
    """sam2_utils.MLP: num_layers Linears in `layers` (keys layers.0, layers.1, ...), activation between
    them, optional sigmoid on the output."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 activation: Type[nn.Module] = nn.ReLU, sigmoid_output: bool = False) -> None:
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))
        self.sigmoid_output = sigmoid_output
        self.act = activation()

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = self.act(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class Sam2Attention(Attention):
    """SAM2's Attention: k_proj/v_proj read kv_in_dim channels (default embedding_dim); attention is
    F.scaled_dot_product_attention with dropout_p = dropout while training."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, dropout: float = 0.0,
                 kv_in_dim: int = None) -> None:
        super().__init__(embedding_dim, num_heads, downsample_rate)
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        if self.kv_in_dim != embedding_dim:
            self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
            self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.dropout_p = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_proj(self._recombine_heads(out))


class Sam2TwoWayAttentionBlock(TwoWayAttentionBlock):
    attention_cls = Sam2Attention

    @staticmethod
    def make_mlp(embedding_dim: int, mlp_dim: int, activation: Type[nn.Module]) -> nn.Module:
        return Sam2MLP(embedding_dim, mlp_dim, embedding_dim, num_layers=2, activation=activation)


class Sam2TwoWayTransformer(TwoWayTransformer):
    block_cls = Sam2TwoWayAttentionBlock
