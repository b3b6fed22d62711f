"""Every op and drop-in module can be captured in a CUDA graph, forward and forward + backward, with no host
sync inside (issue 12, item 4), and runs under torch.compile(mode="reduce-overhead") (CUDA graph trees).

GPU tests: without a CUDA device every test here is skipped (they need one). On a GPU `-k cuda` selects them.
For each op / module variant, backend available on CUDA (cuda, triton, auto) and mode:
1. an eager run (same backend) on "fresh" inputs gives the expected outputs (and gradients);
2. a graph is captured on static inputs holding other values (mmfast.bench.runner.capture_graph: torch's
   recipe, warm-up on a side stream, the capture under torch.cuda.set_sync_debug_mode("error"), so a host
   sync inside raises instead of baking capture-time values into the graph);
3. the fresh values are copied into the static inputs (and grad_outputs), the graph replayed, and its
   outputs compared with step 1's: same kernels on the same values, so the tolerance is tight (fp32 1e-5).
A graph that read a value at capture time (through a sync, or a Python number taken from a tensor) gives
step 3 the capture's values and fails the comparison. Modules' parameters are static (a graph reads them in
place); their gradients are compared too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import kernel_backends

import mmfast
import mmfast.nn as mnn
from mmfast.bench.runner import capture_graph
from mmfast.ops import contrastive_loss as _loss_ops
from mmfast.ops import cross_attention as _attention_ops
from mmfast.ops import similarity_softmax as _similarity_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

DEVICE = torch.device("cuda")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _randn(gen, *shape, dtype):
    """Deterministic on every device: drawn on the CPU, then moved."""
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)  # shape () too: a loss's grad_output


def _scalar(value: float) -> torch.Tensor:
    """A 0-dim fp32 tensor on the GPU (a logit scale or bias: the graph must read it, not bake it in)."""
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


@dataclass(frozen=True)
class Graphed:
    """One op call or module forward: build(dtype) -> (call(**inputs), parameters to differentiate);
    make(seed, dtype) -> the inputs (same shapes for every seed); grad_names: the inputs differentiated."""
    name: str
    implementations: tuple[str, ...]  # the op's (or the module's core op's) implementations
    build: Callable[[torch.dtype], tuple[Callable, list]]
    make: Callable[[int, torch.dtype], dict]
    grad_names: tuple[str, ...]


def _op(fn):
    return lambda dtype: (fn, [])


def _module(factory, call):
    """build for a module: constructed with a fixed seed, on the GPU in the dtype; call(module, **inputs)."""
    def build(dtype):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = factory().to(DEVICE, dtype)
        return (lambda **inputs: call(module, **inputs)), list(module.parameters())
    return build


# ---- inputs ------------------------------------------------------------------------------------------
def _features(seed, dtype, classes=33, bias=False):
    gen = torch.Generator().manual_seed(seed)
    inputs = {"image": _randn(gen, 6, 40, dtype=dtype), "text": _randn(gen, classes, 40, dtype=dtype),
              "scale": _scalar(10.0 + seed)}
    if bias:
        inputs["bias"] = _scalar(-2.0 - seed)
    return inputs


def _pairs(seed, dtype, bias=False):
    """Unit features (as CLIP's), each text near its image: a loss far from 0, gradients far from 0."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(_randn(gen, 24, 40, dtype=torch.float32), dim=-1)
    text = torch.nn.functional.normalize(image + 0.5 * _randn(gen, 24, 40, dtype=torch.float32), dim=-1)
    inputs = {"image": image.to(dtype), "text": text.to(dtype), "scale": _scalar(10.0 + seed)}
    if bias:
        inputs["bias"] = _scalar(-2.0 - seed)
    return inputs


def _attention(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = _randn(gen, 2, 3, 5, 32, dtype=dtype)
    k, v = _randn(gen, 2, 3, 17, 32, dtype=dtype), _randn(gen, 2, 3, 17, 32, dtype=dtype)
    k2, v2 = _randn(gen, 2, 3, 4, 32, dtype=dtype), _randn(gen, 2, 3, 4, 32, dtype=dtype)
    return {"q": q, "k": k, "v": v, "k2": k2, "v2": v2}


def _sam_qkv(batch_q, lq, batch_kv, lk):
    """SamAttention(64, 4 heads: head dim 16) inputs; the shapes pick sam_attention's arrangement."""
    def make(seed, dtype):
        gen = torch.Generator().manual_seed(seed)
        return {"q": _randn(gen, batch_q, lq, 64, dtype=dtype), "k": _randn(gen, batch_kv, lk, 64, dtype=dtype),
                "v": _randn(gen, batch_kv, lk, 64, dtype=dtype)}
    return make


SAM = dict(depth=2, embedding_dim=256, num_heads=8, mlp_dim=64)  # SAM's head dims (32 self, 16 cross), small MLP


def _sam_images(image_batch, prompts=2, repeated=False):
    """TwoWayTransformer inputs on an 8x8 image: image_batch images (1: shared by the prompts); repeated: one
    image repeat_interleaved over the prompts, as SAM's MaskDecoder does."""
    def make(seed, dtype):
        gen = torch.Generator().manual_seed(seed)
        count = 1 if repeated else image_batch
        image, pe = (_randn(gen, count, 256, 8, 8, dtype=dtype) for _ in range(2))
        if repeated:
            image, pe = image.repeat_interleave(prompts, 0), pe.repeat_interleave(prompts, 0)
        return {"image_embedding": image, "image_pe": pe, "point_embedding": _randn(gen, prompts, 7, 256, dtype=dtype)}
    return make


def _media(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return {"x": _randn(gen, 2, 1, 12, 64, dtype=dtype)}


def _only(make, *names):
    return lambda seed, dtype: {n: v for n, v in make(seed, dtype).items() if n in names}


def _class_embeddings():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(33, 3, 40, generator=gen)  # 33 classes, 3 prompt templates


SIMILARITY, LOSSES, ATTENTION = (_similarity_ops.IMPLEMENTATIONS, _loss_ops.IMPLEMENTATIONS,
                                 _attention_ops.IMPLEMENTATIONS)
IMAGE_TEXT = ("image", "text")
SAM_INPUTS = ("image_embedding", "image_pe", "point_embedding")

OPS = [
    Graphed("similarity_softmax", SIMILARITY, _op(lambda image, text, scale: mmfast.similarity_softmax(image, text, scale)),
            _features, IMAGE_TEXT + ("scale",)),
    Graphed("similarity_sigmoid_bias", SIMILARITY,
            _op(lambda image, text, scale, bias: mmfast.similarity_softmax(image, text, scale, bias, activation="sigmoid")),
            lambda seed, dtype: _features(seed, dtype, bias=True), IMAGE_TEXT + ("scale", "bias")),
    Graphed("similarity_topk", SIMILARITY, _op(lambda image, text, scale: mmfast.similarity_softmax(image, text, scale, topk=5)),
            _features, IMAGE_TEXT + ("scale",)),
    Graphed("clip_loss", LOSSES, _op(lambda image, text, scale: mmfast.clip_loss(image, text, scale)),
            _pairs, IMAGE_TEXT + ("scale",)),
    Graphed("siglip_loss", LOSSES, _op(lambda image, text, scale, bias: mmfast.siglip_loss(image, text, scale, bias)),
            lambda seed, dtype: _pairs(seed, dtype, bias=True), IMAGE_TEXT + ("scale", "bias")),
    Graphed("cross_attention", ATTENTION, _op(lambda q, k, v, k2, v2: mmfast.cross_attention(q, k, v, k2=k2, v2=v2)),
            _attention, ("q", "k", "v", "k2", "v2")),
] + [  # mmfast.sam_attention through SAM's Attention module, one variant per arrangement (ops.sam_attention.plan)
    Graphed(f"sam_attention_{arrangement}", ATTENTION,
            _module(lambda: mnn.SamAttention(64, 4), lambda m, q, k, v: m(q, k, v)), _sam_qkv(*shape), ("q", "k", "v"))
    for arrangement, shape in (("few_queries", (2, 7, 2, 40)), ("few_keys", (2, 40, 2, 7)), ("projected", (2, 20, 2, 24)),
                               ("shared_kv", (2, 7, 1, 40)), ("shared_q_few_keys", (1, 40, 2, 7)))
]

MODULES = [
    Graphed("TwoWayTransformer_per_prompt_images", ATTENTION,
            _module(lambda: mnn.TwoWayTransformer(**SAM), lambda m, **x: m(**x)), _sam_images(2), SAM_INPUTS),
    Graphed("TwoWayTransformer_shared_image", ATTENTION,
            _module(lambda: mnn.TwoWayTransformer(**SAM), lambda m, **x: m(**x)), _sam_images(1), SAM_INPUTS),
    Graphed("TwoWayTransformer_repeated_image", ATTENTION,  # MaskDecoder's repeat_interleave: equal rows
            _module(lambda: mnn.TwoWayTransformer(**SAM), lambda m, **x: m(**x)), _sam_images(2, repeated=True),
            SAM_INPUTS),
    Graphed("Sam2TwoWayTransformer", ATTENTION,
            _module(lambda: mnn.Sam2TwoWayTransformer(**SAM), lambda m, **x: m(**x)), _sam_images(2), SAM_INPUTS),
    Graphed("PerceiverResampler", ATTENTION,
            _module(lambda: mnn.PerceiverResampler(dim=64, depth=2, dim_head=32, heads=2, num_latents=8),
                    lambda m, x: m(x)), _media, ("x",)),
    Graphed("ClipLoss", LOSSES, _module(mnn.ClipLoss, lambda m, image, text, scale: m(image, text, scale)),
            _pairs, IMAGE_TEXT + ("scale",)),
    Graphed("SigLipLoss", LOSSES, _module(mnn.SigLipLoss, lambda m, image, text, scale, bias: m(image, text, scale, bias)),
            lambda seed, dtype: _pairs(seed, dtype, bias=True), IMAGE_TEXT + ("scale", "bias")),
    Graphed("SimilaritySoftmax", SIMILARITY, _module(mnn.SimilaritySoftmax, lambda m, image, text: m(image, text)),
            _only(_features, *IMAGE_TEXT), IMAGE_TEXT),
    Graphed("SimilaritySoftmax_topk", SIMILARITY,
            _module(mnn.SimilaritySoftmax, lambda m, image, text: m(image, text, topk=5)), _only(_features, *IMAGE_TEXT),
            IMAGE_TEXT),
    Graphed("ZeroShotClassifier", SIMILARITY,
            _module(lambda: mnn.ZeroShotClassifier(_class_embeddings()), lambda m, image: m(image)),
            _only(_features, "image"), ("image",)),
    Graphed("ZeroShotClassifier_topk", SIMILARITY,
            _module(lambda: mnn.ZeroShotClassifier(_class_embeddings()), lambda m, image: m(image, topk=5)),
            _only(_features, "image"), ("image",)),
]


def _backends(implementations) -> list[str]:
    """The kernel backends of the op that run on CUDA here, and auto."""
    return [b for b in kernel_backends("cuda") if b in implementations] + ["auto"]


def _params(cases, dtypes):
    return [pytest.param(case, backend, dtype, mode, id=f"{case.name}-{backend}-{SHORT[dtype]}-{mode}")
            for case in cases for backend in _backends(case.implementations) for dtype in dtypes
            for mode in ("forward", "full")]


# ---- the check -----------------------------------------------------------------------------------------
def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(call, inputs, leaves, grad_outputs, backward):
    """Outputs, then (backward) the gradients of `leaves` for grad_outputs: one list of tensors."""
    if not backward:
        with torch.no_grad():
            return _as_list(call(**inputs))
    outs = _as_list(call(**inputs))
    diff = [o for o in outs if o.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(diff, leaves, grad_outputs))


def _differentiable_outputs(call, inputs) -> list[tuple[torch.Size, torch.dtype]]:
    """(shape, dtype) of each differentiable output of call(**inputs). Only these leave the function: an
    autograd graph kept alive past it would hold the parameters' AccumulateGrad nodes, which remember the
    stream they were made on (here the legacy default stream); a capture's backward then makes that stream
    wait on the capturing one, which CUDA refuses (cudaErrorStreamCaptureImplicit, the H200 run of
    2026-12-04 16:30: six module cases)."""
    return [(o.shape, o.dtype) for o in _as_list(call(**inputs)) if o.requires_grad]


def _assert_capturable(case: Graphed, dtype, backward: bool):
    call, params = case.build(dtype)
    static, fresh = case.make(0, dtype), case.make(1, dtype)  # captured on static's values, replayed on fresh's
    static_grads, fresh_grads = [], []  # grad_outputs
    if backward:
        for inputs in (static, fresh):
            for name in case.grad_names:
                inputs[name].requires_grad_()
        diff = _differentiable_outputs(call, fresh)
        assert diff, f"{case.name}: no differentiable output"
        static_grads, fresh_grads = ([_randn(torch.Generator().manual_seed(seed), *shape, dtype=dtype)
                                      for shape, dtype in diff] for seed in (100, 101))
    static_leaves, fresh_leaves = ([inputs[n] for n in case.grad_names] + params for inputs in (static, fresh))

    expected = _run(call, fresh, fresh_leaves, fresh_grads, backward)
    graph, captured, _ = capture_graph(lambda: _run(call, static, static_leaves, static_grads, backward), DEVICE)
    with torch.no_grad():  # new values into the buffers the graph reads
        for name, value in static.items():
            value.copy_(fresh[name])
        for dst, src in zip(static_grads, fresh_grads):
            dst.copy_(src)
    graph.replay()
    grads = [f"grad {n}" for n in case.grad_names] + [f"grad parameter {i}" for i in range(len(params))]
    names = [f"output {i}" for i in range(len(expected) - len(grads) * backward)] + grads * backward
    assert len(captured) == len(expected) == len(names)
    for what, got, want in zip(names, captured, expected):
        if got.is_floating_point():
            torch.testing.assert_close(got, want, **TOLERANCE[dtype], msg=lambda m: f"{case.name}, {what}: {m}")
        else:  # top-k indices
            assert torch.equal(got, want), f"{case.name}, {what}: indices differ"


@pytest.mark.parametrize("case, backend, dtype, mode", _params(OPS, (torch.float32, torch.bfloat16)))
def test_cuda_graph_op(case, backend, dtype, mode):
    with mmfast.use_backend(backend):
        _assert_capturable(case, dtype, backward=mode == "full")


@pytest.mark.parametrize("case, backend, dtype, mode", _params(MODULES, (torch.float32,)))
def test_cuda_graph_module(case, backend, dtype, mode):
    with mmfast.use_backend(backend):
        _assert_capturable(case, dtype, backward=mode == "full")


# ---- torch.compile(mode="reduce-overhead"): CUDA graph trees ----------------------------------------------
def _assert_reduce_overhead(case: Graphed, fullgraph=True):
    """Three calls of the compiled forward + backward (graph trees: a warm-up call, the recording, a replay),
    each on new values, against eager; inductor must not have skipped CUDA graphs for any of them."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    call, params = case.build(torch.float32)
    compiled = torch.compile(call, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)
    for seed in range(3):
        inputs = case.make(seed, torch.float32)
        for name in case.grad_names:
            inputs[name].requires_grad_()
        leaves = [inputs[n] for n in case.grad_names] + params
        want = _as_list(call(**inputs))
        grad_outputs = [_randn(torch.Generator().manual_seed(100 + seed), *o.shape, dtype=o.dtype) for o in want]
        want_grads = torch.autograd.grad(want, leaves, grad_outputs)
        torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs are done with
        got = _as_list(compiled(**inputs))
        got_grads = torch.autograd.grad(got, leaves, grad_outputs)
        for i, (g, w) in enumerate(zip(got + list(got_grads), want + list(want_grads))):
            torch.testing.assert_close(g, w.detach(), rtol=1e-4, atol=1e-5,  # inductor reorders the glue math
                                       msg=lambda m: f"{case.name} call {seed}, tensor {i}: {m}")
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor skipped CUDA graphs (see the cudagraphs log)"


@pytest.mark.parametrize("backend", _backends(ATTENTION))
def test_cuda_graph_compile_reduce_overhead_op(backend):
    with mmfast.use_backend(backend):
        _assert_reduce_overhead(next(c for c in OPS if c.name == "cross_attention"))


def test_cuda_graph_compile_reduce_overhead_module():
    with mmfast.use_backend("auto"):
        _assert_reduce_overhead(next(c for c in MODULES if c.name == "PerceiverResampler"))
