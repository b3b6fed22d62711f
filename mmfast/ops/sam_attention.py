"""mmfast.ops.sam_attention: SAM's mask-decoder attention (segment-anything / SAM2 `Attention`), with
the work rearranged for its shapes.

    out = out_proj(attention(q_proj(q), k_proj(k), v_proj(v)))      [+ residual, then LayerNorm]

SAM's cross-attentions pair a few prompt tokens (Nq = 5 + prompts, 7 for one point) with 4096 image
tokens, 8 heads of dimension 16 (internal dim 128 for C = 256). Most of upstream's time goes to the
four 4096 x 256 x 128 projections of the image side and to head split/merge copies, not to attention
(DESIGN.md section 7: copies 30%, adds 18%, GEMMs 36% at B=16). Three exact rearrangements of the
same math, chosen per call by shape (`plan`):

* "few queries" (token -> image, Lq < head dim): the keys' projection is folded into the queries,
  scores_h = (q_h Wk_h) k_in^T + q_h . bk_h, and the values' projection is applied after the
  attention, out_h = (P_h v_in) Wv_h^T + bv_h (rows of P sum to 1). The image side costs two
  4096 x 256 x (H*Lq) GEMMs (H*Lq = 56 for SAM) instead of two 4096 x 256 x 128 projections plus
  attention, and no [B, H, 4096, d] key/value tensors exist.
* "few keys" (image -> token, Lk < head dim): the query projection is folded into the keys,
  scores = q_in @ M + c with M[:, h*Lk + j] = Wq_h^T k_hj (the weight absorption of MLA), and the
  output projection into the values, out = P @ N + bo with N[h*Lk + j] = Wo_h v_hj; bo is added to
  N's rows as bo / H (each head's probabilities sum to 1), and a residual is the GEMM's C input
  (baddbmm), so the image side is one 4096 x 256 x (H*Lk) GEMM, a softmax over groups of Lk, and one
  4096 x (H*Lk) x 256 GEMM writing residual + output.
* "shared" (SAM's many prompts on one image): an operand with batch 1 while the other has batch B is
  the same for every prompt: its projections run once. Shared keys/values go to the attention core
  expanded over B (stride 0, no copy); shared queries with few keys are projected once and the
  per-prompt scores are [4096, d] x [d, Lk] products.
* otherwise "projected": project, the attention core (mmfast.cross_attention on strided head views:
  no split/merge copies), out_proj (addmm with the residual).
All are differentiable (torch autograd through GEMMs/softmax and the core's fused backward).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from mmfast import backend as _backend
from mmfast.ops._checks import check_same_device_dtype, check_tensor
from mmfast.ops.cross_attention import cross_attention


class Projections(NamedTuple):
    """The four Linears of SAM's Attention as (weight, bias) tensors: weight [out, in], bias [out]."""
    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor

    @classmethod
    def of(cls, attention) -> "Projections":
        """From a module with q_proj, k_proj, v_proj, out_proj (segment-anything / SAM2 Attention)."""
        return cls(attention.q_proj.weight, attention.q_proj.bias, attention.k_proj.weight, attention.k_proj.bias,
                   attention.v_proj.weight, attention.v_proj.bias, attention.out_proj.weight, attention.out_proj.bias)


def plan(batch_q: int, batch_kv: int, lq: int, lk: int, head_dim: int) -> str:
    """Which arrangement sam_attention uses (see the module docstring). Folding the long side's projection
    into the short side replaces its L_long x C x (H*d) GEMM by an L_long x C x (H*L_short) one: cheaper
    while L_short < d < L_long (self-attention of the few tokens gains nothing: projected)."""
    if batch_kv == 1 and batch_q > 1:
        return "shared_kv"
    if batch_q == 1 and batch_kv > 1:
        return "shared_q_few_keys" if lk < head_dim else "projected"
    if lq < head_dim < lk:
        return "few_queries"
    if lk < head_dim < lq:
        return "few_keys"
    return "projected"


def _check(q, k, v, p: Projections, num_heads: int, residual):
    q = check_tensor("q", q, 3)
    k = check_tensor("k", k, 3)
    v = check_tensor("v", v, 3)
    tensors = (("q", q), ("k", k), ("v", v)) + tuple(zip(Projections._fields, p))
    if residual is not None:
        tensors += (("residual", check_tensor("residual", residual, 3)),)
    # Under autocast the activations' dtypes legitimately differ (LayerNorm outputs fp32, Linears bf16/fp16,
    # as in upstream's module); every op below casts as upstream's do.
    check_same_device_dtype(tuple(n for n, _ in tensors), *(t for _, t in tensors),
                            same_dtype=not torch.is_autocast_enabled(q.device.type))
    internal, c_q = p.q_weight.shape
    if q.shape[-1] != c_q:
        raise ValueError(f"mmfast: q has {q.shape[-1]} channels but q_proj takes {c_q}")
    if k.shape[-1] != p.k_weight.shape[1] or v.shape[-1] != p.v_weight.shape[1]:
        raise ValueError(f"mmfast: k {tuple(k.shape)} / v {tuple(v.shape)} channels do not match k_proj/v_proj "
                         f"inputs ({p.k_weight.shape[1]}, {p.v_weight.shape[1]})")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"mmfast: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same batch and tokens")
    if num_heads <= 0 or internal % num_heads != 0:
        raise ValueError(f"mmfast: num_heads ({num_heads}) must divide the internal dim ({internal})")
    bq, bkv = q.shape[0], k.shape[0]
    if bq != bkv and 1 not in (bq, bkv):
        raise ValueError(f"mmfast: q has batch {bq} and k/v have batch {bkv}: they must match, or one of them is "
                         "1 (one image shared by all prompts)")
    if residual is not None:
        want = (max(bq, bkv), q.shape[1], p.out_weight.shape[0])
        if tuple(residual.shape) not in (want, (1,) + want[1:]):
            raise ValueError(f"mmfast: residual has shape {tuple(residual.shape)}, expected {want}")


def _merge_heads_out(out_heads: torch.Tensor, out_weight, out_bias, residual) -> torch.Tensor:
    """[B, L, H, d] (any strides) -> out_proj(...) [+ residual]."""
    out = F.linear(out_heads.reshape(*out_heads.shape[:2], -1), out_weight, out_bias)
    return out if residual is None else out + residual


def _fold_few_queries(q, p: Projections, heads: int):
    """The key projection folded into the few queries: (query_folded [B, H*Lq, C_kv] with row h*Lq + l,
    query_bias [B, H*Lq]), scores_h = scale * (query_folded_h k_in^T + query_bias_h)."""
    b, lq, _ = q.shape
    internal, c_kv = p.k_weight.shape
    d = internal // heads
    qp = F.linear(q, p.q_weight, p.q_bias).view(b, lq, heads, d)
    q_folded = torch.einsum("blhd,hdc->bhlc", qp, p.k_weight.view(heads, d, c_kv)).reshape(b, heads * lq, c_kv)
    q_bias = torch.einsum("blhd,hd->bhl", qp, p.k_bias.view(heads, d)).reshape(b, heads * lq)
    return q_folded, q_bias


def _attend_folded_queries(q_folded, q_bias, k, v, v_weight, v_bias, out_weight, out_bias, heads: int,
                           scale: float, residual):
    """out_proj(attention) [+ residual] from the folded queries; k/v [B or 1, Lk, C_kv] (the image)."""
    b, rows, c_kv = q_folded.shape
    lq, d = rows // heads, v_weight.shape[0] // heads
    k, v = k.expand(b, -1, -1), v.expand(b, -1, -1)  # a shared image: stride 0, no copy
    scores = torch.baddbmm(q_bias.unsqueeze(-1), q_folded, k.transpose(1, 2), beta=scale, alpha=scale)  # [B, G, Lk]
    attended = torch.bmm(torch.softmax(scores, dim=-1), v)                              # [B, H*Lq, C_kv]
    out = torch.einsum("bhlc,hdc->blhd", attended.view(b, heads, lq, c_kv), v_weight.view(heads, d, c_kv))
    return _merge_heads_out(out + v_bias.view(heads, d), out_weight, out_bias, residual)


def _few_queries(q, k, v, p: Projections, heads: int, scale: float, residual):
    q_folded, q_bias = _fold_few_queries(q, p, heads)
    return _attend_folded_queries(q_folded, q_bias, k, v, p.v_weight, p.v_bias, p.out_weight, p.out_bias, heads,
                                  scale, residual)


def _project_kv_heads(k, v, p: Projections, heads: int):
    """The projected keys and values as [B, Lk, H, d] views."""
    b, lk, _ = k.shape
    d = p.k_weight.shape[0] // heads
    return (F.linear(k, p.k_weight, p.k_bias).view(b, lk, heads, d),
            F.linear(v, p.v_weight, p.v_bias).view(b, lk, heads, d))


def _out_proj_into_values(vp: torch.Tensor, p: Projections, with_bias: bool = True) -> torch.Tensor:
    """N [B, H*Lk, C] with N[h*Lk + j] = Wo_h v_hj + bo / H, so P @ N = out_proj(attention) when each
    head's probabilities sum to 1 (without bo / H when not with_bias). vp: projected values [B, Lk, H, d]."""
    b, lk, heads, d = vp.shape
    c_out = p.out_weight.shape[0]
    n = torch.einsum("bjhd,ehd->bhje", vp, p.out_weight.view(c_out, heads, d)).reshape(b, heads * lk, c_out)
    return n + p.out_bias / heads if with_bias else n


def _attend_few_keys(scores_t: torch.Tensor, n: torch.Tensor, residual) -> torch.Tensor:
    """scores_t [B, H, Lk, Lq] (keys before queries: torch's softmax over a short last dim is ~13x slower,
    158 vs 12 ms at [16, 4096, 8, 7] on the 2-core CPU, than over a middle dim with Lq inner) ->
    softmax over the keys, then P @ N (+ residual as the GEMM's C input) [B, Lq, C]."""
    b, heads, lk, lq = scores_t.shape
    probs = torch.softmax(scores_t, dim=2).reshape(b, heads * lk, lq).transpose(1, 2)
    if residual is None:
        return torch.bmm(probs, n)
    return torch.baddbmm(residual.expand(b, -1, -1), probs, n)


def _fold_few_keys(k, v, p: Projections, heads: int):
    """The query projection folded into the few keys and the output projection into their values:
    (key_folded [B, H*Lk, C_q] = Wq_h^T k_hj, key_bias [B, H*Lk] = bq_h . k_hj, value_folded [B, H*Lk, C_out]
    = N of _out_proj_into_values without bo); scores = scale * (x key_folded^T + key_bias)."""
    kp, vp = _project_kv_heads(k, v, p, heads)
    b, lk, _, d = kp.shape
    c_q = p.q_weight.shape[1]
    key_folded = torch.einsum("hdc,bjhd->bhjc", p.q_weight.view(heads, d, c_q), kp).reshape(b, heads * lk, c_q)
    key_bias = torch.einsum("hd,bjhd->bhj", p.q_bias.view(heads, d), kp).reshape(b, heads * lk)
    return key_folded, key_bias, _out_proj_into_values(vp, p, with_bias=False)


def _attend_folded_keys(x, key_folded, key_bias, value_folded, keys_per_head: int, scale: float, residual):
    """P @ value_folded [+ residual] from the folded keys; x [B or 1, Lq, C_q] (the image side)."""
    b, rows, _ = key_folded.shape
    scores_t = torch.baddbmm(key_bias.unsqueeze(-1), key_folded, x.expand(b, -1, -1).transpose(1, 2), beta=scale,
                             alpha=scale)  # [B, G, Lq]
    return _attend_few_keys(scores_t.view(b, rows // keys_per_head, keys_per_head, -1), value_folded, residual)


def _few_keys(q, k, v, p: Projections, heads: int, scale: float, residual):
    key_folded, key_bias, value_folded = _fold_few_keys(k, v, p, heads)
    return _attend_folded_keys(q, key_folded, key_bias, value_folded + p.out_bias / heads, k.shape[1], scale,
                               residual)


def _shared_q_few_keys(q, k, v, p: Projections, heads: int, scale: float, residual):
    """q (the image) has batch 1: project it once; per prompt only the [Lk, d] x [d, Lq] head products."""
    kp, vp = _project_kv_heads(k, v, p, heads)
    d = kp.shape[-1]
    qp = F.linear(q[0], p.q_weight, p.q_bias).view(q.shape[1], heads, d) * scale          # [Lq, H, d]
    scores_t = torch.einsum("bjhd,nhd->bhjn", kp, qp)                                     # [B, H, Lk, Lq]
    return _attend_few_keys(scores_t, _out_proj_into_values(vp, p), residual)


def _projected(q, k, v, p: Projections, heads: int, scale: float, residual, backend):
    b = max(q.shape[0], k.shape[0])
    lq = q.shape[1]
    d = p.q_weight.shape[0] // heads
    qh = F.linear(q, p.q_weight, p.q_bias).view(q.shape[0], lq, heads, d).expand(b, -1, -1, -1)
    kh, vh = _project_kv_heads(k, v, p, heads)
    kh, vh = kh.expand(b, -1, -1, -1), vh.expand(b, -1, -1, -1)   # shared keys: stride 0, no copy
    out = cross_attention(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), scale=scale, backend=backend)
    return _merge_heads_out(out.transpose(1, 2), p.out_weight, p.out_bias, residual)


def sam_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projections: Projections, num_heads: int, *,
                  residual: Optional[torch.Tensor] = None, norm: Optional[tuple] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """segment-anything's Attention(q, k, v) with its weights in `projections`, then optionally
    `+ residual` and `LayerNorm(norm_weight, norm_bias, eps)` given as norm=(weight, bias, eps).

    q [B, Lq, C], k/v [B, Lk, C_kv]; q or k/v may have batch 1 while the other has B (one image shared
    by B prompts: its projections run once, results as if it were repeated). Any strides. The scale is
    head_dim ** -0.5 as upstream. `backend` selects the attention core's backend where the core runs.
    """
    _check(q, k, v, projections, num_heads, residual)
    head_dim = projections.q_weight.shape[0] // num_heads
    scale = head_dim ** -0.5
    fused = _fused_block(q, k, v, projections, num_heads, residual, norm, backend)
    if fused is not None:
        return fused(q, k, v, projections, num_heads, scale, residual, norm)
    arrangement = plan(q.shape[0], k.shape[0], q.shape[1], k.shape[1], head_dim)
    # Under autocast the residual is added after, as upstream adds it: the GEMM would return the sum in the
    # autocast dtype (a bf16 residual stream), the add keeps the residual's precision (fp32 upstream).
    separate_residual = residual is not None and torch.is_autocast_enabled(q.device.type)
    gemm_residual = None if separate_residual else residual
    if backend == "reference" or arrangement == "projected" or arrangement == "shared_kv":
        out = _projected(q, k, v, projections, num_heads, scale, gemm_residual, backend)
    elif arrangement == "few_queries":
        out = _few_queries(q, k, v, projections, num_heads, scale, gemm_residual)
    elif arrangement == "few_keys":
        out = _few_keys(q, k, v, projections, num_heads, scale, gemm_residual)
    else:
        out = _shared_q_few_keys(q, k, v, projections, num_heads, scale, gemm_residual)
    if separate_residual:
        out = out + residual
    if norm is not None:
        weight, bias, eps = norm
        out = F.layer_norm(out, out.shape[-1:], weight, bias, eps)
    return out


# ---- the fused CUDA blocks (one kernel per cross-attention, forward only) -----------------------------------
# mmfast::sam_image_to_token / sam_token_to_image (csrc/cuda/sam_attention.cu): LayerNorm(residual + attention +
# out_proj) on the folded operands above, in one launch where the composition takes ~10. They have no autograd:
# sam_attention runs them only where no gradient is needed (SAM's inference), and under backend "auto" only once
# a GPU run has validated them (GPU_VALIDATED["sam_blocks"]); backend="cuda" asks for them.
_FUSED_OPS = ("sam_image_to_token", "sam_token_to_image")
_fused_defined = _backend._C is not None and all(hasattr(torch.ops.mmfast, n) for n in _FUSED_OPS)
_fused_cuda = _fused_defined and _backend.has_native_kernel(_FUSED_OPS[0], "CUDA")


def _check_folded(groups_name: str, groups: torch.Tensor, per_group: int, per_group_name: str, shapes: dict):
    """The fused ops' operand checks off the GPU (csrc/cuda/sam_attention_api.cpp makes the same on CUDA):
    `groups` rows divide into `per_group`; each named tensor has the shape given (None: any size there)."""
    if per_group < 1 or groups.shape[1] % per_group != 0:
        raise ValueError(f"mmfast: {per_group_name} ({per_group}) must divide {groups_name}'s {groups.shape[1]} rows")
    for name, (t, want) in shapes.items():
        if t.dim() != len(want) or any(w is not None and n != w for n, w in zip(t.shape, want)):
            raise ValueError(f"mmfast: {name} has shape {tuple(t.shape)}, expected {want} (None: any)")


def _image_to_token(x, key_folded, key_bias, value_folded, out_bias, residual, norm_weight, norm_bias, scale, eps,
                    keys_per_head):
    """mmfast::sam_image_to_token off the GPU (and its meaning): the composition's ops on the folded operands."""
    b, g, c = key_folded.shape
    c_out = value_folded.shape[-1]
    _check_folded("key_folded", key_folded, keys_per_head, "keys_per_head", {
        "x": (x, (None, None, c)), "key_bias": (key_bias, (b, g)), "value_folded": (value_folded, (b, g, c_out)),
        "out_bias": (out_bias, (c_out,)), "residual": (residual, (None, x.shape[1], c_out)),
        "norm_weight": (norm_weight, (c_out,)), "norm_bias": (norm_bias, (c_out,))})
    out = _attend_folded_keys(x, key_folded, key_bias, value_folded, keys_per_head, scale, residual) + out_bias
    return F.layer_norm(out, out.shape[-1:], norm_weight, norm_bias, eps)


def _token_to_image(query_folded, query_bias, k, v, v_weight, v_bias, out_weight, out_bias, residual, norm_weight,
                    norm_bias, scale, eps, heads):
    """mmfast::sam_token_to_image off the GPU (and its meaning)."""
    b, g, c = query_folded.shape
    inner, c_out = v_weight.shape[0], out_weight.shape[0]
    _check_folded("query_folded", query_folded, heads, "heads", {
        "query_bias": (query_bias, (b, g)), "k": (k, (None, None, c)), "v": (v, k.shape),
        "v_weight": (v_weight, (inner, c)), "v_bias": (v_bias, (inner,)), "out_weight": (out_weight, (c_out, inner)),
        "out_bias": (out_bias, (c_out,)), "residual": (residual, (b, g // max(heads, 1), c_out)),
        "norm_weight": (norm_weight, (c_out,)), "norm_bias": (norm_bias, (c_out,))})
    out = _attend_folded_queries(query_folded, query_bias, k, v, v_weight, v_bias, out_weight, out_bias, heads,
                                 scale, residual)
    return F.layer_norm(out, out.shape[-1:], norm_weight, norm_bias, eps)


if _fused_defined:
    torch.library.register_kernel("mmfast::sam_image_to_token", "cpu")(_image_to_token)
    torch.library.register_kernel("mmfast::sam_token_to_image", "cpu")(_token_to_image)

    @torch.library.register_fake("mmfast::sam_image_to_token")
    def _(x, key_folded, key_bias, value_folded, out_bias, residual, norm_weight, norm_bias, scale, eps, keys_per_head):
        return x.new_empty((key_folded.shape[0], x.shape[1], value_folded.shape[2]))

    @torch.library.register_fake("mmfast::sam_token_to_image")
    def _(query_folded, query_bias, k, v, v_weight, v_bias, out_weight, out_bias, residual, norm_weight, norm_bias,
          scale, eps, heads):
        return query_folded.new_empty(residual.shape)


def _fused_image_to_token(q, k, v, p: Projections, heads: int, scale: float, residual, norm):
    key_folded, key_bias, value_folded = _fold_few_keys(k, v, p, heads)
    return torch.ops.mmfast.sam_image_to_token(q, key_folded, key_bias, value_folded, p.out_bias, residual, norm[0],
                                               norm[1], scale, float(norm[2]), k.shape[1])


def _fused_token_to_image(q, k, v, p: Projections, heads: int, scale: float, residual, norm):
    query_folded, query_bias = _fold_few_queries(q, p, heads)
    return torch.ops.mmfast.sam_token_to_image(query_folded, query_bias, k, v, p.v_weight, p.v_bias, p.out_weight,
                                               p.out_bias, residual, norm[0], norm[1], scale, float(norm[2]), heads)


def fused_block_kind(batch_q: int, batch_kv: int, batch_residual: int, lq: int, lk: int, heads: int,
                     head_dim: int) -> Optional[str]:
    """Which fused block computes a call of these shapes: "image_to_token" (few keys: <= 16 per head, the
    image side's x and residual may be shared), "token_to_image" (few queries: heads x queries <= 64, the
    image's k/v may be shared), or None (the rearrangements above run)."""
    b = max(batch_q, batch_kv)
    if lk < head_dim < lq and lk <= 16 and batch_kv == b and batch_residual in (1, b):
        return "image_to_token"
    if lq < head_dim < lk and heads * lq <= 64 and batch_q == b and batch_residual == b:
        return "token_to_image"
    return None


def _fused_block(q, k, v, p: Projections, heads: int, residual, norm, backend):
    """The fused CUDA block that computes this call (_fused_image_to_token / _fused_token_to_image), or None:
    a CUDA call with residual and norm, no gradient, no autocast, one kernel dtype, fused_block_kind's shapes
    and a shared-memory footprint the device grants."""
    if not (_fused_cuda and q.is_cuda and residual is not None and norm is not None):
        return None
    requested = backend if backend is not None else _backend.get_backend()
    if not (requested == "cuda" or (requested == "auto" and "cuda" in _backend.GPU_VALIDATED.get("sam_blocks", ()))):
        return None
    tensors = (q, k, v, residual, norm[0], norm[1], *p)
    if q.dtype not in _backend.KERNEL_DTYPES or any(t.dtype != q.dtype for t in tensors):
        return None
    if torch.is_autocast_enabled("cuda") or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    d = p.q_weight.shape[0] // heads
    kind = fused_block_kind(q.shape[0], k.shape[0], residual.shape[0], q.shape[1], k.shape[1], heads, d)
    if kind is None:
        return None
    tokens = k.shape[1] if kind == "image_to_token" else q.shape[1]
    channels = q.shape[2] if kind == "image_to_token" else k.shape[2]
    if not _fused_smem_fits(kind, q.device.index, heads, tokens, channels, d, p.out_weight.shape[0]):
        return None
    return _fused_image_to_token if kind == "image_to_token" else _fused_token_to_image


_smem_fits: dict = {}


@torch._dynamo.assume_constant_result  # under torch.compile: evaluated while tracing, not a graph break
def _fused_smem_fits(kind: str, device_index, heads: int, tokens: int, channels: int, head_dim: int,
                     out_channels: int) -> bool:
    """Whether the device grants the fused kernel's shared memory (the kernel's own layout, from _C), cached."""
    key = (kind, device_index, heads, tokens, channels, head_dim, out_channels)
    if key not in _smem_fits:
        if kind == "image_to_token":
            need = _backend._C.sam_image_to_token_smem_bytes(heads, tokens, channels, out_channels)
        else:
            need = _backend._C.sam_token_to_image_smem_bytes(heads, tokens, channels, head_dim, out_channels)
        _smem_fits[key] = need <= torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    return _smem_fits[key]
