"""The plain-PyTorch references (contrastive losses, Perceiver Resampler, SAM two-way transformer)
against hand-written float64 formulas that do not call them: explicit loops over rows and heads, an
explicit log-sum-exp, LayerNorm/GELU/softplus spelled out. Plus the upstream state_dict keys written
out literally, and the distributed loss paths on 2- and 3-process gloo groups (spawned, file:// rendezvous
in tmp_path, bounded by a 90 s deadline).
"""
import math
from itertools import product

import pytest
import torch
import torch.nn as nn

from conftest import save_results_per_world, spawn_and_wait
from mmfast.reference import contrastive_loss as cl
from mmfast.reference import perceiver as pr
from mmfast.reference import sam_attention as sam

F64 = torch.float64


def close(a, b, tol=1e-10):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs err {err:.3e}"


def randomize_(module, std=0.3, seed=0):
    """Random values in every parameter (LayerNorm weights and biases included), so that swapping two
    norms or two projections changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


# ---- hand-written float64 building blocks ------------------------------------------------------
def hand_logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(x - m) for x in values))


def hand_softplus(x):  # log(1 + e^x), stable for both signs
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def hand_attention_head(q, k, v, scale):
    """One head: q [Lq, d], k/v [Lk, d]; explicit log-sum-exp per query row."""
    s = torch.einsum("id,jd->ij", q, k) * scale
    row_max = s.max(dim=1, keepdim=True).values
    lse = row_max + (s - row_max).exp().sum(dim=1, keepdim=True).log()
    return torch.einsum("ij,jd->id", (s - lse).exp(), v)


def hand_layer_norm(x, ln, eps=1e-5):
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + eps) * ln.weight + ln.bias


def hand_linear(x, lin, weight=None):
    weight = lin.weight if weight is None else weight
    out = torch.einsum("...i,oi->...o", x, weight)
    return out if lin.bias is None else out + lin.bias


def hand_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def unit_rows(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.norm(dim=1, keepdim=True)


# ---- CLIP / SigLIP -----------------------------------------------------------------------------
def hand_clip_loss(image, text, scale, bias=0.0, labels=None):
    b = image.shape[0]
    labels = list(range(b)) if labels is None else [int(y) for y in labels]
    s = [[scale * float(image[i] @ text[j]) + bias for j in range(b)] for i in range(b)]
    per_image = [hand_logsumexp(s[i]) - s[i][labels[i]] for i in range(b)]
    per_text = [hand_logsumexp([s[i][j] for i in range(b)]) - s[labels[j]][j] for j in range(b)]
    return (sum(per_image) / b + sum(per_text) / b) / 2


def hand_siglip_loss(image, text, scale, bias=0.0, negative_only=False):
    b = image.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            label = 1.0 if (i == j and not negative_only) else -1.0
            total += hand_softplus(-label * (scale * float(image[i] @ text[j]) + bias))
    return total / b


def test_clip_loss_matches_per_row_log_softmax():
    image, text = unit_rows(6, 8, 1), unit_rows(6, 8, 2)
    close(cl.clip_loss(image, text, 10.0), hand_clip_loss(image, text, 10.0))
    # A bias shifts whole rows: same value.
    close(cl.clip_loss(image, text, 10.0, torch.tensor(-3.0, dtype=F64)), hand_clip_loss(image, text, 10.0))
    labels = torch.tensor([2, 0, 1, 5, 3, 4])
    close(cl.clip_loss(image, text, 10.0, labels=labels), hand_clip_loss(image, text, 10.0, labels=labels))


def test_clip_loss_is_exactly_zero_for_one_pair():
    image, text = torch.randn(1, 16), torch.randn(1, 16)
    assert cl.clip_loss(image, text, 100.0).item() == 0.0
    assert cl.ClipLoss()(image, text, torch.tensor(100.0), torch.tensor(-5.0)).item() == 0.0


def test_siglip_loss_matches_softplus_sums():
    image, text = unit_rows(5, 8, 3), unit_rows(5, 8, 4)
    close(cl.siglip_loss(image, text, 10.0, None), hand_siglip_loss(image, text, 10.0))
    bias = torch.tensor(-10.0, dtype=F64)
    close(cl.siglip_loss(image, text, 10.0, bias), hand_siglip_loss(image, text, 10.0, -10.0))
    close(cl.siglip_loss(image, text, 10.0, bias, negative_only=True),
          hand_siglip_loss(image, text, 10.0, -10.0, negative_only=True))


def test_loss_modules_single_process():
    image, text = unit_rows(6, 8, 5), unit_rows(6, 8, 6)
    scale, bias = torch.tensor(10.0, dtype=F64), torch.tensor(-2.0, dtype=F64)

    clip = cl.ClipLoss(cache_labels=True)
    close(clip(image, text, scale), hand_clip_loss(image, text, 10.0))
    out = clip(image, text, scale, bias, output_dict=True)  # second call reuses the cached labels
    assert list(out) == ["contrastive_loss"] and out["contrastive_loss"].dim() == 0
    close(out["contrastive_loss"], hand_clip_loss(image, text, 10.0))
    close(clip(image[:4], text[:4], scale), hand_clip_loss(image[:4], text[:4], 10.0))  # new size: new labels

    siglip = cl.SigLipLoss()
    assert siglip.dist_impl == "bidir"
    close(siglip(image, text, scale, bias), hand_siglip_loss(image, text, 10.0, -2.0))
    close(siglip(image, text, scale, None, output_dict=True)["contrastive_loss"], hand_siglip_loss(image, text, 10.0))
    with pytest.raises(TypeError):
        siglip(image, text, scale)  # the bias is a required positional argument upstream


def test_loss_argument_errors():
    with pytest.raises(ValueError, match="text_features"):
        cl.ClipLoss()(torch.randn(4, 8), torch.randn(3, 8), 1.0)
    with pytest.raises(ValueError, match="text_features"):
        cl.siglip_loss(torch.randn(4, 8), torch.randn(3, 8), 1.0, None)
    with pytest.raises(ValueError, match="dist_impl"):
        cl.SigLipLoss(dist_impl="ring")


# ---- Perceiver ---------------------------------------------------------------------------------
def test_perceiver_cross_attention_over_concatenated_keys():
    gen = torch.Generator().manual_seed(7)
    b, h, n, m, d = 2, 3, 5, 4, 8
    q = torch.randn(b, h, m, d, generator=gen, dtype=F64)
    k, v = (torch.randn(b, h, n, d, generator=gen, dtype=F64) for _ in range(2))
    k2, v2 = (torch.randn(b, h, m, d, generator=gen, dtype=F64) for _ in range(2))
    out = pr.perceiver_cross_attention(q, k, v, k2, v2)
    for bi, hi in product(range(b), range(h)):
        keys, values = torch.cat((k[bi, hi], k2[bi, hi])), torch.cat((v[bi, hi], v2[bi, hi]))
        close(out[bi, hi], hand_attention_head(q[bi, hi], keys, values, d ** -0.5))
    # Probes: the latent keys matter, and each key block stays paired with its own values.
    assert not torch.allclose(out, pr.perceiver_cross_attention(q, k, v))
    assert not torch.allclose(out, pr.perceiver_cross_attention(q, k, v2, k2, v))
    close(pr.perceiver_cross_attention(q, k, v, scale=0.3)[1, 2], hand_attention_head(q[1, 2], k[1, 2], v[1, 2], 0.3))
    with pytest.raises(ValueError, match="k2 and v2"):
        pr.perceiver_cross_attention(q, k, v, k2)


def hand_perceiver_attention(attn, x, latents):
    heads = attn.heads
    inner = attn.to_q.weight.shape[0]
    dh = inner // heads
    xn, ln = hand_layer_norm(x, attn.norm_media), hand_layer_norm(latents, attn.norm_latents)
    w_k, w_v = attn.to_kv.weight[:inner], attn.to_kv.weight[inner:]
    b, t, m, _ = latents.shape
    merged = torch.zeros(b, t, m, inner, dtype=F64)
    for bi, ti, hi in product(range(b), range(t), range(heads)):
        rows = slice(hi * dh, (hi + 1) * dh)  # heads are the outer factor of the inner dim
        kv_in = torch.cat((xn[bi, ti], ln[bi, ti]))  # media tokens first, then the latents
        q = hand_linear(ln[bi, ti], attn.to_q, attn.to_q.weight[rows])
        k = hand_linear(kv_in, attn.to_kv, w_k[rows])
        v = hand_linear(kv_in, attn.to_kv, w_v[rows])
        merged[bi, ti, :, rows] = hand_attention_head(q, k, v, dh ** -0.5)
    return hand_linear(merged, attn.to_out)


def hand_feed_forward(ff, x):
    norm, lin1, _, lin2 = ff
    return hand_linear(hand_gelu(hand_linear(hand_layer_norm(x, norm), lin1)), lin2)


def hand_resampler_layers(model, x):
    b, t = x.shape[:2]
    latents = model.latents.expand(b, t, *model.latents.shape)
    for attn, ff in model.layers:
        latents = hand_perceiver_attention(attn, x, latents) + latents
        latents = hand_feed_forward(ff, latents) + latents
    return hand_layer_norm(latents, model.norm)


def test_perceiver_attention_matches_hand_formula():
    attn = randomize_(pr.PerceiverAttention(dim=16, dim_head=8, heads=2).double())
    gen = torch.Generator().manual_seed(8)
    x, latents = torch.randn(2, 2, 5, 16, generator=gen, dtype=F64), torch.randn(2, 2, 3, 16, generator=gen, dtype=F64)
    with torch.no_grad():
        close(attn(x, latents), hand_perceiver_attention(attn, x, latents))


def test_perceiver_resampler_state_dict_keys():
    model = pr.PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2)
    layer_keys = ["0.norm_media.weight", "0.norm_media.bias", "0.norm_latents.weight", "0.norm_latents.bias",
                  "0.to_q.weight", "0.to_kv.weight", "0.to_out.weight",
                  "1.0.weight", "1.0.bias", "1.1.weight", "1.3.weight"]
    expected = (["latents", "media_pos_emb"] + [f"layers.{i}.{k}" for i in range(2) for k in layer_keys]
                + ["norm.weight", "norm.bias"])
    state = model.state_dict()
    assert list(state) == expected
    shapes = {"latents": (64, 16), "media_pos_emb": (4, 1, 16), "layers.1.0.to_q.weight": (16, 16),
              "layers.1.0.to_kv.weight": (32, 16), "layers.1.0.to_out.weight": (16, 16),
              "layers.1.1.1.weight": (64, 16), "layers.1.1.3.weight": (16, 64)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert isinstance(model.layers[0][1][2], nn.GELU) and model.layers[0][1][2].approximate == "none"


def test_perceiver_resampler_forward_3d_and_4d():
    model = randomize_(pr.PerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=4).double(), seed=1)
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(9), dtype=F64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3, 4, 16)
        close(out, hand_resampler_layers(model, x + model.media_pos_emb[:3]))
        out3 = model(x[:, 0])  # a 3-D input is one media item: [b, 1, m, D]
        close(out3, hand_resampler_layers(model, x[:, :1] + model.media_pos_emb[:1]))


def test_open_flamingo_resampler_keys_and_forward():
    plain = pr.OpenFlamingoPerceiverResampler(dim=16, depth=1, dim_head=8, heads=2, num_latents=4)
    assert [k for k in plain.state_dict() if not k.startswith("layers.")] == ["latents", "norm.weight", "norm.bias"]
    model = pr.OpenFlamingoPerceiverResampler(dim=16, depth=2, dim_head=8, heads=2, num_latents=4,
                                              max_num_media=3, max_num_frames=4)
    keys = list(model.state_dict())
    assert keys[:3] == ["latents", "frame_embs", "media_time_embs"] and keys[-2:] == ["norm.weight", "norm.bias"]
    assert model.frame_embs.shape == (4, 16) and model.media_time_embs.shape == (3, 1, 16)
    randomize_(model.double(), seed=2)
    b, T, Fr, v = 2, 2, 3, 2
    x = torch.randn(b, T, Fr, v, 16, generator=torch.Generator().manual_seed(10), dtype=F64)
    with torch.no_grad():
        media = x.clone()
        for f in range(Fr):
            media[:, :, f] += model.frame_embs[f]
        media = media.reshape(b, T, Fr * v, 16)
        for ti in range(T):
            media[:, ti] += model.media_time_embs[ti, 0]
        close(model(x), hand_resampler_layers(model, media))


# ---- SAM two-way transformer -------------------------------------------------------------------
def test_sam_attention_core_matches_per_head_loop():
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 3, 5, 4, generator=gen, dtype=F64)
    k, v = torch.randn(2, 3, 7, 4, generator=gen, dtype=F64), torch.randn(2, 3, 7, 4, generator=gen, dtype=F64)
    out, out_scaled = sam.sam_attention_core(q, k, v), sam.sam_attention_core(q, k, v, scale=0.25)
    for bi, hi in product(range(2), range(3)):
        close(out[bi, hi], hand_attention_head(q[bi, hi], k[bi, hi], v[bi, hi], 4 ** -0.5))
        close(out_scaled[bi, hi], hand_attention_head(q[bi, hi], k[bi, hi], v[bi, hi], 0.25))


def hand_sam_attention(attn, q_in, k_in, v_in):
    heads, inner = attn.num_heads, attn.internal_dim
    dh = inner // heads
    q, k, v = hand_linear(q_in, attn.q_proj), hand_linear(k_in, attn.k_proj), hand_linear(v_in, attn.v_proj)
    merged = torch.zeros(q.shape[0], q.shape[1], inner, dtype=F64)
    for bi, hi in product(range(q.shape[0]), range(heads)):
        cols = slice(hi * dh, (hi + 1) * dh)
        merged[bi, :, cols] = hand_attention_head(q[bi, :, cols], k[bi, :, cols], v[bi, :, cols], 1 / math.sqrt(dh))
    return hand_linear(merged, attn.out_proj)


def test_sam_attention_module_downsampled_and_non_contiguous():
    attn = randomize_(sam.Attention(32, 4, downsample_rate=2).double(), seed=3)
    assert attn.q_proj.weight.shape == (16, 32) and attn.out_proj.weight.shape == (32, 16)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(5, 2, 32, generator=gen, dtype=F64).transpose(0, 1)  # non-contiguous [B, N, C] views
    kv = torch.randn(2, 32, 9, generator=gen, dtype=F64).permute(0, 2, 1)
    assert not q.is_contiguous() and not kv.is_contiguous()
    with torch.no_grad():
        close(attn(q, kv, kv), hand_sam_attention(attn, q, kv, kv))
    with pytest.raises(ValueError, match="num_heads"):
        sam.Attention(32, 3)


def test_mlp_block_activations():
    assert isinstance(sam.MLPBlock(4, 8).act, nn.GELU)  # segment-anything's default
    assert isinstance(sam.TwoWayAttentionBlock(8, 2, mlp_dim=16).mlp.act, nn.ReLU)


def hand_two_way_block(block, queries, keys, query_pe, key_pe):
    if block.skip_first_layer_pe:
        queries = hand_sam_attention(block.self_attn, queries, queries, queries)  # no pe, no residual
    else:
        q = queries + query_pe
        queries = queries + hand_sam_attention(block.self_attn, q, q, queries)
    queries = hand_layer_norm(queries, block.norm1)
    q, k = queries + query_pe, keys + key_pe
    queries = hand_layer_norm(queries + hand_sam_attention(block.cross_attn_token_to_image, q, k, keys), block.norm2)
    mlp = hand_linear(torch.relu(hand_linear(queries, block.mlp.lin1)), block.mlp.lin2)
    queries = hand_layer_norm(queries + mlp, block.norm3)
    q, k = queries + query_pe, keys + key_pe
    keys = hand_layer_norm(keys + hand_sam_attention(block.cross_attn_image_to_token, k, q, queries), block.norm4)
    return queries, keys


def test_two_way_transformer_state_dict_keys():
    model = sam.TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64)
    attn_keys = ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                 "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias"]
    block_keys = ([f"self_attn.{k}" for k in attn_keys] + ["norm1.weight", "norm1.bias"]
                  + [f"cross_attn_token_to_image.{k}" for k in attn_keys] + ["norm2.weight", "norm2.bias"]
                  + ["mlp.lin1.weight", "mlp.lin1.bias", "mlp.lin2.weight", "mlp.lin2.bias"]
                  + ["norm3.weight", "norm3.bias", "norm4.weight", "norm4.bias"]
                  + [f"cross_attn_image_to_token.{k}" for k in attn_keys])
    expected = ([f"layers.{i}.{k}" for i in range(2) for k in block_keys]
                + [f"final_attn_token_to_image.{k}" for k in attn_keys]
                + ["norm_final_attn.weight", "norm_final_attn.bias"])
    state = model.state_dict()
    assert list(state) == expected
    shapes = {"layers.0.self_attn.q_proj.weight": (32, 32),  # self-attention: no downsampling
              "layers.0.cross_attn_token_to_image.k_proj.weight": (16, 32),  # cross-attentions: 32 // 2
              "layers.1.cross_attn_image_to_token.out_proj.weight": (32, 16),
              "layers.1.mlp.lin1.weight": (64, 32), "final_attn_token_to_image.v_proj.bias": (16,)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert [layer.skip_first_layer_pe for layer in model.layers] == [True, False]


@pytest.mark.parametrize("skip_first_layer_pe", [True, False])
def test_two_way_block_matches_hand_formula(skip_first_layer_pe):
    block = randomize_(sam.TwoWayAttentionBlock(32, 4, mlp_dim=64, skip_first_layer_pe=skip_first_layer_pe).double(),
                       seed=4)
    gen = torch.Generator().manual_seed(13)
    queries, query_pe = (torch.randn(2, 5, 32, generator=gen, dtype=F64) for _ in range(2))
    keys, key_pe = (torch.randn(2, 9, 32, generator=gen, dtype=F64) for _ in range(2))
    with torch.no_grad():
        got = block(queries, keys, query_pe, key_pe)
        want = hand_two_way_block(block, queries, keys, query_pe, key_pe)
        close(got[0], want[0])
        close(got[1], want[1])
        if skip_first_layer_pe:
            # First layer: step (1) is norm1(self_attn(queries)), no positional encoding, no residual;
            # and the flag does change the block's output.
            step1 = block.norm1(block.self_attn(queries, queries, queries))
            close(step1, hand_layer_norm(hand_sam_attention(block.self_attn, queries, queries, queries), block.norm1))
            block.skip_first_layer_pe = False
            assert not torch.allclose(block(queries, keys, query_pe, key_pe)[0], got[0])


def test_two_way_transformer_matches_hand_formula():
    model = randomize_(sam.TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64).double(), seed=5)
    gen = torch.Generator().manual_seed(14)
    image, image_pe = (torch.randn(2, 32, 3, 4, generator=gen, dtype=F64) for _ in range(2))
    points = torch.randn(2, 5, 32, generator=gen, dtype=F64)
    with torch.no_grad():
        queries, keys = model(image, image_pe, points)
        flat_image = torch.stack([image[:, :, y, x] for y in range(3) for x in range(4)], dim=1)  # [B, HW, C]
        flat_pe = torch.stack([image_pe[:, :, y, x] for y in range(3) for x in range(4)], dim=1)
        q, k = points, flat_image
        for layer in model.layers:
            q, k = hand_two_way_block(layer, q, k, points, flat_pe)
        final = hand_sam_attention(model.final_attn_token_to_image, q + points, k + flat_pe, k)
        close(queries, hand_layer_norm(q + final, model.norm_final_attn))
        close(keys, k)


# ---- distributed paths: gloo groups of 2 and 3 processes ---------------------------------------
# One spawn of 3 processes (starting one costs seconds: it imports torch and mmfast): ranks 0-1 form a
# 2-process group first, then all three a 3-process one, which also runs SigLIP's two-way ring exchange
# ('bidir' with world_size - 1 even; with 2 ranks it is a single one-way step).
WORLDS, LOCAL_B, DIM = (2, 3), 3, 8
CLIP_MODES = list(product((False, True), (False, True)))  # (local_loss, gather_with_grad)


def _global_inputs(world):
    return unit_rows(world * LOCAL_B, DIM, 20), unit_rows(world * LOCAL_B, DIM, 21)


def _leaves(image, text, rows):
    scale = torch.tensor(5.0, dtype=F64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=F64, requires_grad=True)
    return image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_(), scale, bias


def _rank_losses(rank, world):
    """Loss and gradients of every ClipLoss mode and SigLipLoss dist_impl on this rank's rows."""
    image, text = _global_inputs(world)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    results = {}
    for local_loss, gather_with_grad in CLIP_MODES:
        img, txt, scale, bias = _leaves(image, text, rows)  # the bias cannot change a CLIP loss
        loss_fn = cl.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        loss = loss_fn(img, txt, scale, bias)
        loss.backward()
        results["clip", local_loss, gather_with_grad] = (loss.detach(), img.grad, txt.grad, scale.grad)
    for impl in cl.SigLipLoss.DIST_IMPLS:
        img, txt, scale, bias = _leaves(image, text, rows)
        loss = cl.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)(img, txt, scale, bias)
        loss.backward()
        results["siglip", impl] = (loss.detach(), img.grad, txt.grad, scale.grad, bias.grad)
    return results


def _dist_worker(rank, out_dir):
    save_results_per_world(rank, out_dir, WORLDS, _rank_losses)


def _check_against_single_process(world, ranks):
    rows = [slice(r * LOCAL_B, (r + 1) * LOCAL_B) for r in range(world)]
    image, text = _global_inputs(world)
    img, txt, scale, _ = _leaves(image, text, slice(None))
    clip_global = cl.clip_loss(img, txt, scale)
    clip_global.backward()
    clip_grads = (img.grad, txt.grad, scale.grad)
    close(clip_global, hand_clip_loss(image, text, 5.0))
    img, txt, scale, bias = _leaves(image, text, slice(None))
    siglip_global = cl.siglip_loss(img, txt, scale, bias)
    siglip_global.backward()
    siglip_grads = (img.grad, txt.grad, scale.grad, bias.grad)

    for local_loss, gather_with_grad in CLIP_MODES:
        per_rank = [res["clip", local_loss, gather_with_grad] for res in ranks]
        close(sum(r[0] for r in per_rank) / world, clip_global)  # local losses average to the global one
        if not local_loss:
            for r in per_rank:
                close(r[0], clip_global)
        if local_loss and not gather_with_grad:
            continue  # only the local rows carry a gradient: no simple relation to the global gradient
        # An autograd all-gather sums every rank's gradient (world_size x); otherwise only the local
        # slot of the (identical) global loss carries one.
        factor = world if gather_with_grad else 1
        for r, res in enumerate(per_rank):
            close(res[1], factor * clip_grads[0][rows[r]])
            close(res[2], factor * clip_grads[1][rows[r]])
        close(sum(res[3] for res in per_rank) / world, clip_grads[2])

    for impl in cl.SigLipLoss.DIST_IMPLS:
        per_rank = [res["siglip", impl] for res in ranks]
        close(sum(r[0] for r in per_rank) / world, siglip_global)
        for r, res in enumerate(per_rank):  # every rank's loss counts each feature block: world_size x
            close(res[1], world * siglip_grads[0][rows[r]])
            close(res[2], world * siglip_grads[1][rows[r]])
        close(sum(res[3] for res in per_rank) / world, siglip_grads[2])
        close(sum(res[4] for res in per_rank) / world, siglip_grads[3])


def test_distributed_losses_match_single_process(tmp_path):
    spawn_and_wait(_dist_worker, tmp_path, max(WORLDS), 90)
    for world in WORLDS:
        _check_against_single_process(world, [torch.load(tmp_path / f"world{world}_rank{r}.pt") for r in range(world)])
