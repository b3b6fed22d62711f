"""Per-call host overhead (issue 12): each op on tiny tensors, one thread, against the eager code it replaces,
guarded as a ratio of times measured in one process, not as a time.

At these sizes the arithmetic is negligible and a call's cost is the Python layer, the dispatcher, autograd
and allocation. Bound: mmfast <= 1.5x the baseline, forward (inputs without grad) and forward+backward.
Baselines: cross_attention against F.scaled_dot_product_attention (with torch.cat of the two key/value
segments for the two-segment call, as upstream must); the other ops against their eager reference
(mmfast/reference, which mirrors upstream line by line).

Noise (a shared 2-core machine, pytest-xdist): mmfast and its baseline run in alternating blocks of calls
and their medians are compared; a round that misses the bound is repeated, up to ROUNDS times, and the op
passes if one round meets it. Garbage collection is off while timing, as in timeit.
"""
import gc
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.ops.contrastive_loss import IMPLEMENTATIONS as LOSS_IMPLEMENTATIONS
from mmfast.ops.cross_attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from mmfast.ops.sam_attention import Projections, sam_attention
from mmfast.reference import contrastive_loss as ref_loss
from mmfast.reference import sam_attention as ref_sam
from mmfast.reference import similarity_softmax as ref_similarity

BOUND = 1.5
ROUNDS = 3
BLOCKS = 31  # per round and candidate, alternating
CALLS = 10  # per block

pytestmark = pytest.mark.skipif("cpu" not in ATTENTION_IMPLEMENTATIONS or "cpu" not in LOSS_IMPLEMENTATIONS,
                                reason="mmfast._C (the CPU kernels) is not built")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _block_time(fn) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - start) / CALLS


def measured_ratio(fast, baseline) -> float:
    """median per-call time of fast / that of baseline, over alternating blocks (the order flips each block)."""
    for _ in range(3):
        _block_time(fast), _block_time(baseline)
    times = {fast: [], baseline: []}
    gc.collect()
    gc.disable()
    try:
        for i in range(BLOCKS):
            for fn in ((fast, baseline) if i % 2 else (baseline, fast)):
                times[fn].append(_block_time(fn))
    finally:
        gc.enable()
    return statistics.median(times[fast]) / statistics.median(times[baseline])


def assert_within_bound(fast, baseline, what):
    ratios = []
    for _ in range(ROUNDS):
        ratios.append(measured_ratio(fast, baseline))
        if ratios[-1] <= BOUND:
            return
    pytest.fail(f"{what}: mmfast took {', '.join(f'{r:.2f}x' for r in ratios)} the baseline's time per call "
                f"in {ROUNDS} rounds (bound {BOUND}x)")


def _tensors(grad, *shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=gen).requires_grad_(grad) for shape in shapes]


def _calls(grad, inputs, fast, baseline):
    """(fast, baseline) as zero-argument calls: the forward, or the forward and the gradients of every input."""
    if not grad:
        return lambda: fast(*inputs), lambda: baseline(*inputs)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def with_backward(fn):
        return lambda: torch.autograd.grad(fn(*inputs).sum(), leaves)

    return with_backward(fast), with_backward(baseline)


# ---- the cases: (inputs, mmfast call, baseline call) for grad or no grad --------------------------------------
SCALE = 0.25  # d = 16: the smallest head dim the kernels take


def cross_attention_two_segments(grad):
    inputs = _tensors(grad, (1, 2, 4, 16), (1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 4, 16), (1, 2, 4, 16))
    return (inputs,
            lambda q, k, v, k2, v2: mmfast.cross_attention(q, k, v, k2=k2, v2=v2, scale=SCALE),
            lambda q, k, v, k2, v2: F.scaled_dot_product_attention(q, torch.cat((k, k2), dim=-2),
                                                                   torch.cat((v, v2), dim=-2), scale=SCALE))


def cross_attention_one_segment(grad):
    return (_tensors(grad, (1, 2, 4, 16), (1, 2, 8, 16), (1, 2, 8, 16)),
            lambda q, k, v: mmfast.cross_attention(q, k, v, scale=SCALE),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=SCALE))


def similarity_softmax(grad):
    return (_tensors(grad, (4, 16), (8, 16)),
            lambda image, text: mmfast.similarity_softmax(image, text, 100.0),
            lambda image, text: ref_similarity.similarity_softmax(image, text, 100.0))


def clip_loss(grad):
    image, text = _tensors(grad, (4, 16), (4, 16))
    logit_scale = torch.tensor(14.3, requires_grad=grad)  # open_clip passes logit_scale.exp(), a tensor
    return [image, text, logit_scale], mmfast.clip_loss, ref_loss.clip_loss


def siglip_loss(grad):
    image, text = _tensors(grad, (4, 16), (4, 16))
    scale, bias = torch.tensor(10.0, requires_grad=grad), torch.tensor(-10.0, requires_grad=grad)
    return [image, text, scale, bias], mmfast.siglip_loss, ref_loss.siglip_loss


def sam_attention_projected(grad):
    """SAM's Attention (C = 32, 2 heads of d = 16) on 4 queries and 8 keys: the projected arrangement, whose
    core is mmfast.cross_attention; against upstream's module forward."""
    torch.manual_seed(0)
    upstream = ref_sam.Attention(32, 2).requires_grad_(grad)
    weights = Projections.of(upstream)
    q, k, v = _tensors(grad, (1, 4, 32), (1, 8, 32), (1, 8, 32))
    return ([q, k, v, *weights],
            lambda q, k, v, *w: sam_attention(q, k, v, Projections(*w), 2),
            lambda q, k, v, *w: upstream(q, k, v))


CASES = [cross_attention_two_segments, cross_attention_one_segment, similarity_softmax, clip_loss, siglip_loss,
         sam_attention_projected]


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_per_call_overhead_within_bound_of_eager(case, grad):
    inputs, fast, baseline = case(grad)
    torch.testing.assert_close(fast(*inputs), baseline(*inputs), rtol=1e-4, atol=1e-5)  # the same computation
    assert_within_bound(*_calls(grad, inputs, fast, baseline),
                        f"{case.__name__} {'forward+backward' if grad else 'forward'}")


# ---- drop-in modules on upstream's path ------------------------------------------------------------------------
# The same computation as the baseline: only the drop-in's own decision and checks remain. A coarse guard (a
# sync, a heavy check, a resolution per submodule gone wrong): on the dev CPU the ratio of one build spreads over
# 0.99-1.2 between rounds, so the ~5% that run_upstream saved SAM is below what it can see.
UPSTREAM_BOUND = 1.10


def _sam_transformer():
    from mmfast.nn import TwoWayTransformer
    from tests.test_sam_attention import pair

    model, reference = pair(TwoWayTransformer, ref_sam.TwoWayTransformer, depth=2, embedding_dim=32, num_heads=2,
                            mlp_dim=32)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 32, 2, 2, generator=gen), torch.randn(1, 32, 2, 2, generator=gen),
              torch.randn(1, 3, 32, generator=gen)]
    return inputs, model, reference


def _perceiver():
    from mmfast.nn import PerceiverResampler
    from mmfast.reference import perceiver as ref_perceiver

    model = PerceiverResampler(dim=32, depth=2, dim_head=16, heads=2, num_latents=4)
    reference = ref_perceiver.PerceiverResampler(dim=32, depth=2, dim_head=16, heads=2, num_latents=4)
    reference.load_state_dict(model.state_dict())
    return [torch.randn(1, 1, 3, 32, generator=torch.Generator().manual_seed(0))], model, reference


@pytest.mark.parametrize("case", [_sam_transformer, _perceiver], ids=["TwoWayTransformer", "PerceiverResampler"])
def test_drop_in_on_the_upstream_path_costs_what_upstream_costs(case):
    """Where the dispatch table says upstream (a GPU class whose kernels lose), a drop-in runs upstream's forward;
    its host time must stay upstream's: on an H200 SAM's one-prompt forward is host-bound (issue 12). The CPU
    stands in for that device through a table that says upstream for it."""
    from mmfast import backend

    inputs, model, reference = case()
    backend.set_dispatch_table("cpu", {"ops": {op: {"float32": {"order": ["upstream"]}}
                                               for op in ("sam_attention", "perceiver_resampler")}})
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(*inputs), reference(*inputs), rtol=0, atol=0)  # upstream's own math
            ratios = []
            for _ in range(ROUNDS):
                ratios.append(measured_ratio(lambda: model(*inputs), lambda: reference(*inputs)))
                if ratios[-1] <= UPSTREAM_BOUND:
                    return
    finally:
        backend.set_dispatch_table("cpu", None)
    pytest.fail(f"{case.__name__}: the drop-in took {', '.join(f'{r:.2f}x' for r in ratios)} upstream's time per "
                f"call in {ROUNDS} rounds (bound {UPSTREAM_BOUND}x)")
