"""Drop-in Perceiver Resampler modules (flamingo-pytorch 0.1.2, open_flamingo 2.0.1) on mmfast's
cross-attention core (mmfast.ops.cross_attention).

Constructors, forward signatures and state_dict keys are the reference modules' (which mirror
upstream), so `load_state_dict(strict=True)` works both ways; the forward math differs only in order:
- the latents are attended as the core's second key/value segment: no torch.cat of media and latents;
- to_kv runs on the media and on the latents separately (the same GEMM FLOPs, no concatenated copy);
- the query scale dim_head**-0.5 is applied inside the core instead of as a pass over q;
- no [.., m, n+m] attention matrix is kept for backward (the core saves the row log-sum-exp);
- the first layer's latents (the parameter expanded over the batch) are normed and projected once;
- the residual adds are done by the GEMMs (addmm); GELU runs in place under no_grad.
Layers that are not the plain upstream ones (a LoRA-wrapped Linear, a module with hooks) are called
as modules, so they keep working. Under backend "auto" on a GPU whose dispatch table (mmfast/tuning)
measured no mmfast implementation faster than upstream in the input's dtype, the modules run upstream's
own forward (the reference modules', op for op): on the H200 of 2026-12-04 the fp32 drop-in was 0.79x
(reference core) to 0.96x (CUDA core) of upstream's forward.
Measured with benchmarks/perceiver.py's case (b=8, n=256, D=1024,
depth 2, fp32, 2 threads, load ~1.8) against the previous version of this file (no sharing, separate
adds), calls interleaved, medians of 20: forward 142 vs 151 ms, forward + backward 456 vs 474 ms
(upstream 152 / 469 ms, the GEMMs alone 126 / 404 ms). Leaving one fusion out (another run, forward /
full, 143 / 474 ms with all): no sharing 159 / 458 ms, no addmm 146 / 475 ms, no in-place GELU 152 ms
and +8 MB peak; each is kept for the work it removes, none measured slower beyond the noise (~5%).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfast import backend as _backend
from mmfast.ops._checks import check_tensor
from mmfast.ops.cross_attention import HEAD_DIMS, IMPLEMENTATIONS, cross_attention
from mmfast.reference import perceiver as _ref


def _module_backend(x: torch.Tensor, dim_head: int | None = None) -> str:
    """UPSTREAM (run the upstream forward) or the backend for the core at head dim `dim_head` (None: the
    layer loop, which only needs the upstream decision); see backend.module_backend."""
    fits = dim_head is None or HEAD_DIMS[0] <= dim_head <= HEAD_DIMS[1]
    return _backend.module_backend("perceiver_resampler", IMPLEMENTATIONS, x.device, x.dtype, kernel_shapes=fits)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., L, heads*d] -> [prod(...), heads, L, d] as a view (the core takes strided inputs)."""
    length, inner = x.shape[-2:]
    return x.reshape(-1, length, heads, inner // heads).transpose(1, 2)


def _shared_over_batch(latents: torch.Tensor) -> bool:
    """True for the resampler's first layer: latents = self.latents.expand(b, t, m, D) (stride 0)."""
    return all(latents.stride(i) == 0 or latents.shape[i] == 1 for i in (0, 1)) and latents.shape[:2].numel() > 1


def _plain(module: nn.Module, cls: type) -> bool:
    """module is exactly `cls` without hooks, so its parameters may be used directly; anything else (a
    LoRA-wrapped Linear, a hooked module) is called as a module."""
    return type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)


def _plain_linear(module: nn.Module) -> bool:
    return _plain(module, nn.Linear) and module.bias is None  # upstream's Linears have no bias


def _linear_residual(x: torch.Tensor, linear: nn.Module, residual: torch.Tensor | None) -> torch.Tensor:
    """linear(x) + residual, the add done by the GEMM (addmm, beta=1) when the residual is dense: no
    separate pass over the output (alone, min of 200 calls on a loaded machine: to_out [512, 512] x
    [512, 1024] 1.98 vs 2.13 ms for linear + add; fc2 [512, 4096] x [4096, 1024] 39.2 vs 44.3 ms)."""
    if residual is None:
        return linear(x)
    # Not under autocast: addmm would return the sum in the autocast dtype (a bf16 residual stream) where
    # upstream's add keeps the residual's fp32.
    if (_plain_linear(linear) and residual.is_contiguous() and residual.shape[:-1] == x.shape[:-1]
            and not torch.is_autocast_enabled(x.device.type)):
        weight = linear.weight
        return torch.addmm(residual.reshape(-1, weight.shape[0]), x.reshape(-1, x.shape[-1]),
                           weight.t()).view(residual.shape)
    return linear(x) + residual


class PerceiverAttention(_ref.PerceiverAttention):
    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [b, t, n, D] media, latents [b, t, m, D] -> [b, t, m, D]."""
        if _backend.in_upstream_forward() or _module_backend(latents) == _backend.UPSTREAM:
            return super().forward(x, latents)
        return self._attend(x, latents, None)

    def _attend(self, x: torch.Tensor, latents: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """forward(x, latents) + residual (None: nothing added)."""
        check_tensor("x", x, 4)
        check_tensor("latents", latents, 4)
        if x.shape[:2] != latents.shape[:2] or x.shape[-1] != latents.shape[-1]:
            raise ValueError(f"mmfast: x {tuple(x.shape)} and latents {tuple(latents.shape)} must share b, t and D")
        b, t, m, _ = latents.shape
        h = self.heads
        impl = _module_backend(latents, self.to_q.out_features // h)
        x = self.norm_media(x)
        shared = _shared_over_batch(latents)
        # Every sample's latents are the same in the first layer: their norm and projections are
        # computed once and expanded over the batch (stride 0; the core reads it as is). At b=8 this
        # removes 1.4 of the 30 GFLOP of the forward.
        lat = self.norm_latents(latents[:1, :1] if shared else latents)
        # K and V are views of the two halves of to_kv's output. Tried and not kept: a custom autograd
        # Function making them two dense GEMM outputs, so that backward needs no chunk concatenation and
        # no head-merging copies: forward + backward 450 / 466 ms with it vs 453 ms without (load 1.9).
        k_media, v_media = self.to_kv(x).chunk(2, dim=-1)   # media tokens first ...
        k_lat, v_lat = self.to_kv(lat).chunk(2, dim=-1)     # ... then the latents, as segment 2
        q = self.to_q(lat)
        if shared:
            q, k_lat, v_lat = (y.expand(b, t, *y.shape[2:]) for y in (q, k_lat, v_lat))
        out = cross_attention(_split_heads(q, h), _split_heads(k_media, h), _split_heads(v_media, h),
                              k2=_split_heads(k_lat, h), v2=_split_heads(v_lat, h), scale=self.scale,
                              backend=impl)
        out = out.transpose(1, 2).reshape(b, t, m, -1)  # a view: heads are the outer factor of inner_dim
        return _linear_residual(out, self.to_out, residual)


def _feed_forward(ff: torch.nn.Sequential, latents: torch.Tensor) -> torch.Tensor:
    """ff(latents) + latents for FeedForward = Sequential(LayerNorm, Linear, GELU, Linear)."""
    if not (_plain(ff, nn.Sequential) and len(ff) == 4 and _plain(ff[0], nn.LayerNorm) and _plain_linear(ff[1])
            and _plain(ff[2], nn.GELU) and ff[2].approximate == "none"):
        return ff(latents) + latents
    norm, fc1, _, fc2 = ff
    hidden = F.linear(F.layer_norm(latents, norm.normalized_shape, norm.weight, norm.bias, norm.eps), fc1.weight)
    if not hidden.requires_grad:  # inference: no second [.., 4*D] buffer (peak 8 MB lower at b=8;
        hidden = torch.ops.aten.gelu_(hidden)  # [512, 4096] alone: 0.87 vs 1.06 ms, min of 300 calls)
    else:
        hidden = F.gelu(hidden)
    return _linear_residual(hidden, fc2, latents)


def _run_layers(layers, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The reference's layer loop (mmfast.reference.perceiver._run_layers), each residual add done by
    the block's last GEMM; upstream's own loop where the dispatch table says upstream is faster."""
    if _module_backend(latents) == _backend.UPSTREAM:
        return _backend.run_upstream(_ref._run_layers, layers, x, latents)
    for attn, ff in layers:
        if isinstance(attn, PerceiverAttention) and not (attn._forward_hooks or attn._forward_pre_hooks):
            latents = attn._attend(x, latents, latents)
        else:
            latents = attn(x, latents) + latents
        latents = _feed_forward(ff, latents)
    return latents


class PerceiverResampler(_ref.PerceiverResampler):
    """flamingo-pytorch 0.1.2's PerceiverResampler; checkpoints with the pre-0.1.0 parameter name
    `time_pos_emb` load into `media_pos_emb`."""

    attention_cls = PerceiverAttention
    run_layers = staticmethod(_run_layers)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "time_pos_emb"
        if old in state_dict and prefix + "media_pos_emb" not in state_dict:
            state_dict[prefix + "media_pos_emb"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, (3, 4))
        times = 1 if x.ndim == 3 else x.shape[1]
        if times > self.media_pos_emb.shape[0]:
            raise ValueError(f"mmfast: x has {times} media per sample but num_media_embeds is "
                             f"{self.media_pos_emb.shape[0]}")
        return super().forward(x)


class OpenFlamingoPerceiverResampler(_ref.OpenFlamingoPerceiverResampler):
    """open_flamingo's PerceiverResampler: x [b, T, F, v, D], optional frame_embs / media_time_embs."""

    attention_cls = PerceiverAttention
    run_layers = staticmethod(_run_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, 5)
        return super().forward(x)
