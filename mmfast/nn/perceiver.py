"""Drop-in Perceiver Resampler modules (flamingo-pytorch 0.1.2, open_flamingo 2.0.1) on mmfast's
cross-attention core (mmfast.ops.cross_attention).

Constructors, forward signatures and state_dict keys are the reference modules' (which mirror
upstream), so `load_state_dict(strict=True)` works both ways; only PerceiverAttention.forward differs:
- the latents are attended as the core's second key/value segment: no torch.cat of media and latents;
- to_kv runs on the media and on the latents separately (the same GEMM FLOPs, no concatenated copy);
- the query scale dim_head**-0.5 is applied inside the core instead of as a pass over q;
- no [.., m, n+m] attention matrix is kept for backward (the core saves the row log-sum-exp).
"""
from __future__ import annotations

import torch

from mmfast.ops._checks import check_tensor
from mmfast.ops.cross_attention import cross_attention
from mmfast.reference import perceiver as _ref


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, t, L, heads*d] -> [b*t, heads, L, d] as a view (the core takes strided inputs)."""
    length, inner = x.shape[-2:]
    return x.reshape(-1, length, heads, inner // heads).transpose(1, 2)


class PerceiverAttention(_ref.PerceiverAttention):
    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [b, t, n, D] media, latents [b, t, m, D] -> [b, t, m, D]."""
        check_tensor("x", x, 4)
        check_tensor("latents", latents, 4)
        if x.shape[:2] != latents.shape[:2] or x.shape[-1] != latents.shape[-1]:
            raise ValueError(f"mmfast: x {tuple(x.shape)} and latents {tuple(latents.shape)} must share b, t and D")
        b, t, m, _ = latents.shape
        x = self.norm_media(x)
        lat = self.norm_latents(latents)
        k_media, v_media = self.to_kv(x).chunk(2, dim=-1)      # media tokens first ...
        k_lat, v_lat = self.to_kv(lat).chunk(2, dim=-1)        # ... then the latents, as segment 2
        h = self.heads
        out = cross_attention(_split_heads(self.to_q(lat), h), _split_heads(k_media, h), _split_heads(v_media, h),
                              k2=_split_heads(k_lat, h), v2=_split_heads(v_lat, h), scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, t, m, -1))  # heads: the outer factor of inner_dim


class PerceiverResampler(_ref.PerceiverResampler):
    """flamingo-pytorch 0.1.2's PerceiverResampler; checkpoints with the pre-0.1.0 parameter name
    `time_pos_emb` load into `media_pos_emb`."""

    attention_cls = PerceiverAttention

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "time_pos_emb"
        if old in state_dict and prefix + "media_pos_emb" not in state_dict:
            state_dict[prefix + "media_pos_emb"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, (3, 4))
        t = 1 if x.dim() == 3 else x.shape[1]
        if t > self.media_pos_emb.shape[0]:
            raise ValueError(f"mmfast: x has {t} media per sample but num_media_embeds is {self.media_pos_emb.shape[0]}")
        return super().forward(x)


class OpenFlamingoPerceiverResampler(_ref.OpenFlamingoPerceiverResampler):
    """open_flamingo's PerceiverResampler: x [b, T, F, v, D], optional frame_embs / media_time_embs."""

    attention_cls = PerceiverAttention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, 5)
        return super().forward(x)
