"""Plain-PyTorch oracle for the Flamingo Perceiver Resampler.

Mirrors flamingo-pytorch 0.1.2 (`flamingo_pytorch/flamingo_pytorch.py`) and open_flamingo 2.0.1
(`open_flamingo/src/helpers.py`): same constructors, parameter names (so state_dicts load both ways)
and forward math. No Linear has a bias; LayerNorms use eps 1e-5; GELU is the exact (erf) one.

The attention core the kernels implement is `perceiver_cross_attention`: the latents (queries) attend
to the media tokens followed by the latents themselves, softmax over the n + m keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def perceiver_cross_attention(q, k, v, k2=None, v2=None, scale=None) -> torch.Tensor:
    """softmax(q @ cat(k, k2).T * scale) @ cat(v, v2), keys concatenated along the token axis.

    q [B, H, Lq, d]; k, v [B, H, Lk, d]; k2, v2 [B, H, Lk2, d] or None (any leading dims broadcast as in
    matmul). scale defaults to d ** -0.5. As upstream: q is scaled before the product and the detached
    row max is subtracted before the softmax (no-ops in exact arithmetic, kept for identical rounding).
    """
    if (k2 is None) != (v2 is None):
        raise ValueError("mmfast: pass k2 and v2 together (the latents' keys and values) or neither")
    if k2 is not None:
        k = torch.cat((k, k2), dim=-2)
        v = torch.cat((v, v2), dim=-2)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    sim = (q * scale) @ k.transpose(-1, -2)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return sim.softmax(dim=-1) @ v


def FeedForward(dim, mult=4):  # noqa: N802 (upstream builds it with a function of this name)
    """Sequential(LayerNorm, Linear(dim, dim*mult), GELU, Linear(dim*mult, dim)), no biases: keys 0..3."""
    inner_dim = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """forward(x [b, t, n, D], latents [b, t, m, D]) -> [b, t, m, D]."""

    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)  # rows [0, inner): K, [inner, 2*inner): V
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x):  # [b, t, n, h*d] -> [b, h, t, n, d] (heads are the outer factor)
        b, t, n, _ = x.shape
        return x.reshape(b, t, n, self.heads, -1).permute(0, 3, 1, 2, 4)

    def forward(self, x, latents):
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        # Flamingo (unlike Perceiver) also lets the latents attend to themselves: media tokens first.
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        out = perceiver_cross_attention(q, k, v, scale=self.scale)
        b, h, t, m, d = out.shape
        return self.to_out(out.permute(0, 2, 3, 1, 4).reshape(b, t, m, h * d))


def _run_layers(layers, x, latents):
    """x is not updated between layers: only the latents flow through attention and feed-forward."""
    for attn, ff in layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return latents


def _perceiver_layers(depth, dim, dim_head, heads, ff_mult, attention_cls):
    return nn.ModuleList(
        nn.ModuleList([attention_cls(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim, mult=ff_mult)])
        for _ in range(depth))


class PerceiverResampler(nn.Module):
    """flamingo-pytorch 0.1.2. forward(x [b, n, D] or [b, t, n, D]) -> [b, t, num_latents, D]
    (t = 1 for a 3-D x). Parameters: latents [m, D], media_pos_emb [num_media_embeds, 1, D]."""
    attention_cls = PerceiverAttention  # mmfast.nn swaps in its fused attention ...
    run_layers = staticmethod(_run_layers)  # ... and its layer loop (residuals in the GEMMs); the rest is shared

    def __init__(self, *, dim, depth, dim_head=64, heads=8, num_latents=64, num_media_embeds=4, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_pos_emb = nn.Parameter(torch.randn(num_media_embeds, 1, dim))
        self.layers = _perceiver_layers(depth, dim, dim_head, heads, ff_mult, self.attention_cls)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        if x.ndim == 3:
            x = x.unsqueeze(1)
        b, times = x.shape[:2]
        x = x + self.media_pos_emb[:times]
        latents = self.latents.expand(b, times, *self.latents.shape)
        return self.norm(self.run_layers(self.layers, x, latents))


class OpenFlamingoPerceiverResampler(nn.Module):
    """open_flamingo 2.0.1 `PerceiverResampler`. forward(x [b, T, F, v, D]) -> [b, T, num_latents, D]:
    frame_embs[:F] (if max_num_frames) is added per frame, frames and patches are flattened into
    F*v media tokens, media_time_embs[:T] (if max_num_media) is added per media item."""
    attention_cls = PerceiverAttention
    run_layers = staticmethod(_run_layers)

    def __init__(self, *, dim, depth=6, dim_head=64, heads=8, num_latents=64, max_num_media=None,
                 max_num_frames=None, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames is not None else None
        self.media_time_embs = (nn.Parameter(torch.randn(max_num_media, 1, dim))
                                if max_num_media is not None else None)
        self.layers = _perceiver_layers(depth, dim, dim_head, heads, ff_mult, self.attention_cls)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, T, F, v = x.shape[:4]
        if self.frame_embs is not None:
            x = x + self.frame_embs[:F].unsqueeze(1)  # [F, 1, D] broadcasts over b, T and the v patches
        x = x.reshape(b, T, F * v, x.shape[-1])
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:T]
        latents = self.latents.expand(b, T, *self.latents.shape)
        return self.norm(self.run_layers(self.layers, x, latents))
