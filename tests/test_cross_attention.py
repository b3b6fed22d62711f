"""mmfast.ops.cross_attention (the Perceiver / SAM attention core) on every kernel backend against the
float64 reference softmax(q @ cat(k, k2)^T * scale) @ cat(v, v2) (mmfast.reference.perceiver):
forward and all five gradients on the Perceiver's shapes and edge shapes, fp32 and the low-precision
2x rule, a float64 gradcheck of the fused kernels, strided / expanded inputs and output layouts, the
order and pairing of the two key/value segments, NaN, opcheck, torch.compile and bad input.
"""
import pytest
import torch

import mmfast
from conftest import assert_attention_grad_close, assert_close_to_reference, backend_device_params, dtypes_for
from mmfast.ops import cross_attention as ca
from mmfast.ops.cross_attention import cross_attention
from mmfast.reference.perceiver import perceiver_cross_attention

BACKENDS = backend_device_params()


def require_kernel(backend):
    if backend not in ca.IMPLEMENTATIONS:
        pytest.skip(f"mmfast::cross_attention has no {backend!r} kernel registered in this build "
                    f"(implementations here: {ca.IMPLEMENTATIONS})")


def op_names(backend):
    names = ("cross_attention", "cross_attention_backward")
    return tuple(n + "_triton" for n in names) if backend == "triton" else names


def make_inputs(b, h, lq, lk, lk2, d, *, seed):
    """float64 q, k, v, k2, v2 (k2 = v2 = None when lk2 == 0)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, lq, d), (b, h, lk, d), (b, h, lk, d)] + ([(b, h, lk2, d)] * 2 if lk2 else [])
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return tensors + [None, None] if not lk2 else tensors


def run(fn, tensors, dtype, device, grad):
    """fn(*leaves) in dtype on device, backward with grad: (output, the five gradients)."""
    leaves = [None if t is None else t.detach().to(device, dtype).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(device, dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def reference(q, k, v, k2, v2):
    return perceiver_cross_attention(q, k, v, k2, v2)


def check_against_reference(backend, device, dtype, tensors, *, seed=1):
    q = tensors[0]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out, grads = run(lambda *t: cross_attention(t[0], t[1], t[2], k2=t[3], v2=t[4], backend=backend),
                     tensors, dtype, device, grad)
    out64, grads64 = run(reference, tensors, torch.float64, "cpu", grad)
    out_lp, grads_lp = (run(reference, tensors, dtype, device, grad) if dtype != torch.float32
                        else (None, [None] * 5))
    assert out.dtype == dtype
    assert_close_to_reference(out.cpu(), out64, out_lp, name="out")
    for name, g, g64, g_lp in zip(("q", "k", "v", "k2", "v2"), grads, grads64, grads_lp):
        assert (g is None) == (g64 is None), name
        if g is None:
            continue
        assert_attention_grad_close(g.cpu(), g64, g_lp, grads64[2], name=f"grad {name}")


# (B, H, Lq, Lk, Lk2, d); Lk2 = 0: no second segment.
SHAPES = {
    "perceiver": (6, 8, 64, 256, 64, 64),
    "perceiver-no-k2": (2, 8, 64, 256, 0, 64),
    "Lk=1": (2, 2, 5, 1, 3, 32),
    "Lk=1-no-k2": (2, 2, 5, 1, 0, 32),
    "Lq=1": (2, 2, 1, 19, 5, 32),
    "Lk2=1": (2, 2, 9, 20, 1, 32),
    "d=96-H=16": (1, 16, 10, 33, 4, 96),
    "d=16-Lq=70": (2, 3, 70, 130, 0, 16),  # a full 64-query block plus a tail
    "d=16-k2": (1, 2, 7, 40, 9, 16),
    "d=32": (2, 2, 7, 40, 9, 32),
    "d=128": (1, 2, 9, 65, 3, 128),
    "d=40": (1, 2, 5, 11, 2, 40),  # a head dim that does not fill whole vectors (copied tiles)
    "d=40-Lq=12": (1, 2, 12, 11, 2, 40),
    "Lk=257": (1, 2, 3, 257, 0, 64),
    "Lk=257-k2": (1, 2, 3, 257, 130, 64),
    # bf16 on a CPU with AMX runs these on the tiles (d >= 32, >= 32 queries, >= 64 keys): ragged query
    # blocks and key tiles, head dims that are not a multiple of the 32-deep tile
    "tiles-d=32-Lq=40": (1, 2, 40, 75, 9, 32),
    "tiles-d=48-Lq=64": (1, 1, 64, 100, 5, 48),
    "tiles-d=96-Lq=33": (1, 2, 33, 70, 0, 96),
    "tiles-d=128-Lq=37": (1, 2, 37, 65, 3, 128),
    "tiles-d=33-Lq=32": (1, 1, 32, 64, 0, 33),  # an odd head dim: half a bf16 pair
}


def backend_dtype_params():
    return [pytest.param(*p.values, dtype, id=f"{p.id}-{str(dtype)[6:]}")
            for p in BACKENDS for dtype in dtypes_for(*p.values)]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend, device, dtype", backend_dtype_params())
def test_forward_and_gradients(backend, device, dtype, shape):
    require_kernel(backend)
    check_against_reference(backend, device, dtype, make_inputs(*shape, seed=sum(shape)))


class _OnAnotherDevice(torch.Tensor):
    """A CPU tensor standing in for one on a GPU: an op mixing it with a plain tensor that is not 0-dim
    raises as CUDA does, and .to(a device) or .cpu() gives a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moves = func is torch.Tensor.cpu or (func is torch.Tensor.to and any(
            isinstance(a, (torch.device, str)) for a in (*args[1:], kwargs.get("device"))))
        if moves:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])]
        if (any(isinstance(t, cls) for t in flat)
                and any(type(t) is torch.Tensor and t.dim() > 0 for t in flat)):
            raise RuntimeError(f"{func.__name__}: Expected all tensors to be on the same device")
        return super().__torch_function__(func, types, args, kwargs)


def test_results_and_low_precision_references_from_another_device_are_compared_on_the_cpu():
    """On 2026-12-04 every fp16/bf16 check of check_against_reference failed on an H200 before comparing
    anything: the bf16 reference made on the GPU met the float64 one on the CPU ("Expected all tensors to be on
    the same device"). Here the output and the bf16 reference live on a stand-in other device; the helpers bring
    them to the float64 reference, pass a result as good as the bf16 reference, fail a 10% error, and keep the
    zero-gradient rule of one key (dq = dk = 0)."""
    tensors = make_inputs(2, 2, 5, 1, 0, 32, seed=30)
    grad = torch.randn(2, 2, 5, 32, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    out64, grads64 = run(reference, tensors, torch.float64, "cpu", grad)
    out_lp, grads_lp = run(reference, tensors, torch.bfloat16, "cpu", grad)

    def elsewhere(t):
        return t.as_subclass(_OnAnotherDevice)

    with pytest.raises(RuntimeError, match="same device"):
        elsewhere(out_lp).double() - out64  # what the comparison did on the GPU
    assert_close_to_reference(elsewhere(out_lp), out64, elsewhere(out_lp), name="out")
    with pytest.raises(AssertionError, match="out: rel err"):
        assert_close_to_reference(elsewhere(out_lp * 1.1), out64, elsewhere(out_lp), name="out")
    assert grads64[0].norm() == 0 and grads64[2].norm() > 0  # both branches of assert_attention_grad_close
    for name, g_lp, g64 in zip("qkv", grads_lp, grads64):
        assert_attention_grad_close(elsewhere(g_lp), g64, elsewhere(g_lp), grads64[2], name=f"grad {name}")
    with pytest.raises(AssertionError, match="grad q: not ~0"):
        assert_attention_grad_close(elsewhere(grads_lp[2]), grads64[0], elsewhere(grads_lp[0]), grads64[2],
                                    name="grad q")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_lse_and_explicit_scale(backend, device):
    """The operator's second output is the rows' log-sum-exp of scale * q @ cat(k, k2)^T, in fp32."""
    require_kernel(backend)
    q, k, v, k2, v2 = make_inputs(2, 3, 11, 70, 6, 32, seed=5)
    scale = 0.37
    out, lse = getattr(torch.ops.mmfast, op_names(backend)[0])(
        *(t.to(device, torch.float32) for t in (q, k, v, k2, v2)), scale)
    logits = scale * q @ torch.cat((k, k2), 2).transpose(-1, -2)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 11)
    assert_close_to_reference(lse.cpu(), torch.logsumexp(logits, -1), name="lse")
    assert_close_to_reference(out.cpu(), logits.softmax(-1) @ torch.cat((v, v2), 2), name="out")
    public = cross_attention(*(t.to(device, torch.float32) for t in (q, k, v)), k2=k2.to(device, torch.float32),
                             v2=v2.to(device, torch.float32), scale=scale, backend=backend)
    torch.testing.assert_close(public, out, rtol=0, atol=0)


def test_gradcheck_float64_through_the_fused_kernels():
    """float64 gradcheck of the CPU operators themselves (the CPU kernel also takes fp64, with fp64
    statistics, for this): backward = derivative of forward across query blocks, key tiles and segments."""
    require_kernel("cpu")
    fwd = torch.ops.mmfast.cross_attention
    for shape, scale in (((1, 2, 3, 5, 2, 16), 0.3), ((1, 1, 2, 70, 0, 16), 0.25), ((1, 1, 66, 3, 1, 20), 0.2)):
        tensors = [None if t is None else t.requires_grad_() for t in make_inputs(*shape, seed=7)]
        assert torch.autograd.gradcheck(lambda q, k, v, k2, v2: fwd(q, k, v, k2, v2, scale)[0], tuple(tensors))


# ---- strided inputs, layouts, segments ---------------------------------------------------------------
def strided_inputs(b, h, lq, lk, lk2, d, *, seed, dtype=torch.float32, device="cpu"):
    """SAM/Perceiver-style views: q split from a [B, Lq, H*d] projection (permuted), k and v two halves of
    one [B, Lk, 2*H*d] projection (to_kv(...).chunk(2)), k2 with a non-contiguous head dim (copied by the
    kernel), v2 expanded over the batch with stride 0 (one set of values shared by every prompt)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)

    q = randn(b, lq, h * d).view(b, lq, h, d).permute(0, 2, 1, 3)
    k, v = (t.reshape(b, lk, h, d).permute(0, 2, 1, 3) for t in randn(b, lk, 2 * h * d).chunk(2, dim=-1))
    k2 = randn(b, h, d, lk2).transpose(-1, -2)
    v2 = randn(1, h, lk2, d).expand(b, h, lk2, d)
    return q, k, v, k2, v2


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_strided_views_are_read_in_place_and_never_modified(backend, device):
    require_kernel(backend)
    views = strided_inputs(2, 4, 9, 70, 5, 16, seed=8, device=device)
    assert not any(t.is_contiguous() for t in views)
    before = [t.clone() for t in views]
    leaves = [t.detach().requires_grad_() for t in views]
    # Views of leaves keep their strides; the leaves themselves receive the gradients.
    q, k, v, k2, v2 = leaves
    out = cross_attention(q, k, v, k2=k2, v2=v2, backend=backend)
    grad = torch.randn(out.shape, device=device)
    out.backward(grad)
    for t, t0 in zip(views, before):
        torch.testing.assert_close(t, t0, rtol=0, atol=0)
    tensors = [t.double().cpu() for t in views]  # materialized copies for the reference
    out64, grads64 = run(reference, tensors, torch.float64, "cpu", grad.double().cpu())
    assert_close_to_reference(out.detach().cpu(), out64, name="out")
    for name, leaf, g64 in zip(("q", "k", "v", "k2", "v2"), leaves, grads64):
        assert_close_to_reference(leaf.grad.cpu(), g64, name=f"grad {name}")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_output_and_gradient_layouts_match_the_fake_impls(backend, device):
    """out is [B, Lq, H, d] in memory (merging heads is a view); each gradient keeps its input's dense
    layout with a contiguous head dim (else contiguous); the fake impls predict exactly these strides."""
    require_kernel(backend)
    fwd, bwd = (getattr(torch.ops.mmfast, n) for n in op_names(backend))
    q, k, v, k2, v2 = strided_inputs(2, 4, 9, 70, 5, 16, seed=9, device=device)
    out, lse = fwd(q, k, v, k2, v2, 0.25)
    b, h, lq, d = q.shape
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    out.transpose(1, 2).view(b, lq, h * d)  # a view, no copy
    grad_out = torch.randn_like(out)
    grads = bwd(grad_out, q, k, v, k2, v2, out, lse, 0.25)
    assert grads[0].stride() == q.stride()  # dense permuted q: the same layout
    lk = k.shape[2]  # k, v: halves of one projection: dense in the same [B, Lk, H, d] order
    assert grads[1].stride() == grads[2].stride() == (lk * h * d, d, h * d, 1)
    assert grads[3].is_contiguous() and grads[4].is_contiguous()  # k2: transposed head dim; v2: stride-0 batch
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q, k, v, k2, v2)]
        fake_out, fake_lse = fwd(*fake, 0.25)
        fake_grads = bwd(mode.from_tensor(grad_out), *fake, fake_out, fake_lse, 0.25)
    assert (fake_out.stride(), fake_lse.stride()) == (out.stride(), lse.stride())
    assert [g.stride() for g in fake_grads] == [g.stride() for g in grads]


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_second_segment_order_and_gradient_routing(backend, device):
    """k2/v2 are attended after k/v and pair with each other. The softmax cannot see the segment order,
    so the probes are (1) pairing: a query aligned with key j of one segment returns value j of that
    segment; (2) routing: with segments of equal length the gradients of k/v and k2/v2 differ, and each
    matches the reference's gradient of the same tensor."""
    require_kernel(backend)
    d = 16
    basis = torch.eye(d, dtype=torch.float64)
    k, k2 = basis[:3].reshape(1, 1, 3, d), basis[3:6].reshape(1, 1, 3, d)
    v = torch.arange(3 * d, dtype=torch.float64).reshape(1, 1, 3, d)
    v2 = -1.0 - v
    q = 40.0 * torch.stack((basis[1], basis[4])).reshape(1, 1, 2, d)  # aims at k[1], then at k2[1]
    out = cross_attention(*(t.to(device, torch.float32) for t in (q, k, v)), k2=k2.to(device, torch.float32),
                          v2=v2.to(device, torch.float32), scale=1.0, backend=backend).cpu()
    torch.testing.assert_close(out[0, 0, 0].double(), v[0, 0, 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0, 0, 1].double(), v2[0, 0, 1], rtol=1e-5, atol=1e-5)

    tensors = make_inputs(2, 2, 6, 4, 4, 16, seed=10)
    grad = torch.randn(2, 2, 6, 16, dtype=torch.float64)
    _, grads = run(lambda *t: cross_attention(t[0], t[1], t[2], k2=t[3], v2=t[4], backend=backend),
                   tensors, torch.float32, device, grad)
    _, grads64 = run(reference, tensors, torch.float64, "cpu", grad)
    assert (grads64[1] - grads64[3]).norm() > 0.1 * grads64[1].norm()  # a swap would be visible
    for name, g, g64 in zip(("q", "k", "v", "k2", "v2"), grads, grads64):
        assert_close_to_reference(g.cpu(), g64, name=f"grad {name}")


# The CPU forward's tile layouts: keys in the lanes (5 queries), queries in the lanes (12), and bf16 on the
# AMX tiles where the CPU has them (40 queries, 70 keys, d=32).
NAN_LAYOUTS = [(5, 9, 16, torch.float32), (12, 9, 16, torch.float32), (40, 70, 32, torch.bfloat16)]


@pytest.mark.parametrize("backend, device, lq, lk, d, dtype", [
    pytest.param(*p.values, *layout, id=f"{p.id}-lq{layout[0]}-{str(layout[3])[6:]}")
    for p in BACKENDS for layout in NAN_LAYOUTS if layout[3] in dtypes_for(*p.values)])
def test_nan_propagates_like_the_reference(backend, device, lq, lk, d, dtype):
    """A NaN in q poisons its row, a NaN in a key or value every row of that head, as in the reference."""
    require_kernel(backend)
    q, k, v, k2, v2 = make_inputs(1, 3, lq, lk, 2, d, seed=11)
    q[0, 0, 2, 3] = float("nan")
    k2[0, 1, 1, 0] = float("nan")
    v[0, 2, 4, 5] = float("nan")
    q, k, v, k2, v2 = (t.to(dtype).double() for t in (q, k, v, k2, v2))  # the values the kernel sees
    out = cross_attention(*(t.to(device, dtype) for t in (q, k, v)), k2=k2.to(device, dtype),
                          v2=v2.to(device, dtype), backend=backend).cpu()
    want = reference(q, k, v, k2, v2)
    assert torch.equal(out.isnan(), want.isnan()) and want.isnan().any() and not want.isnan().all()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[~out.isnan()].double(), want[~want.isnan()], **tol)


# ---- operator registration: opcheck and torch.compile ----------------------------------------------------
@pytest.mark.parametrize("second_segment", [False, True], ids=["no-k2", "k2"])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_opcheck(backend, device, second_segment):
    require_kernel(backend)
    fwd, bwd = (getattr(torch.ops.mmfast, n) for n in op_names(backend))
    plain = [None if t is None else t.to(device, torch.float32)
             for t in make_inputs(1, 2, 3, 5, 2 if second_segment else 0, 16, seed=12)]
    strided = list(strided_inputs(2, 2, 3, 5, 2, 16, seed=13, device=device))
    for tensors in (plain, strided if second_segment else strided[:3] + [None, None]):
        q, k, v, k2, v2 = (None if t is None else t.detach().requires_grad_() for t in tensors)
        torch.library.opcheck(fwd, (q, k, v, k2, v2, 0.25))
        with torch.no_grad():
            out, lse = fwd(q, k, v, k2, v2, 0.25)
        args = [None if t is None else t.detach() for t in (q, k, v, k2, v2)]
        torch.library.opcheck(bwd, (torch.randn_like(out), *args, out, lse, 0.25))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend, device):
    """The functional API traced into one graph (fake impls + registered autograd), forward and backward.
    aot_eager: the graph capture is what is under test; inductor's C++ codegen would add ~20 s here."""
    require_kernel(backend)
    torch._dynamo.reset()

    def loss_fn(q, k, v, k2, v2):
        out = cross_attention(q, k, v, k2=k2, v2=v2, backend=backend)
        return (out * out).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    tensors = make_inputs(2, 2, 5, 7, 3, 16, seed=14)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.to(device, torch.float32).requires_grad_() for t in tensors]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for eager, from_graph in zip(*results):
        torch.testing.assert_close(from_graph, eager, rtol=1e-6, atol=1e-6)


# ---- backend selection and bad input ---------------------------------------------------------------------
def test_float64_and_unsupported_head_dims_run_the_reference_under_auto():
    q, k, v, _, _ = make_inputs(1, 2, 3, 4, 0, 8, seed=15)
    torch.testing.assert_close(cross_attention(q, k, v), reference(q, k, v, None, None))  # float64
    q32, k32, v32 = (t.float() for t in (q, k, v))  # d = 8: no kernel takes it
    torch.testing.assert_close(cross_attention(q32, k32, v32), reference(q32, k32, v32, None, None))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_bad_input_names_the_argument(backend, device):
    require_kernel(backend)
    q, k, v, k2, v2 = (t.to(device, torch.float32) for t in make_inputs(2, 2, 3, 4, 2, 16, seed=16))

    def call(*args, **kwargs):
        return cross_attention(*args, backend=backend, **kwargs)

    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        call(q, k[0], v)
    with pytest.raises(ValueError, match="head dim d mismatch: q has 16 .* but k has 32"):
        call(q, torch.cat((k, k), -1), v)
    with pytest.raises(ValueError, match="head dim d mismatch: q has 16 .* but v2 has 32"):
        call(q, k, v, k2=k2, v2=torch.cat((v2, v2), -1))
    with pytest.raises(ValueError, match="batch size B mismatch: q has 2 .* but v has 1"):
        call(q, k, v[:1])
    with pytest.raises(ValueError, match="number of heads H mismatch: q has 2 .* but k2 has 1"):
        call(q, k, v, k2=k2[:, :1], v2=v2)
    with pytest.raises(ValueError, match="number of keys Lk mismatch: k has 4 .* but v has 3"):
        call(q, k, v[:, :, :3])
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        call(q, k, None)
    with pytest.raises(ValueError, match="k2 was given without v2"):
        call(q, k, v, k2=k2)
    with pytest.raises(ValueError, match="v2 was given without k2"):
        call(q, k, v, v2=v2)
    with pytest.raises(ValueError, match="k must not be empty"):
        call(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="k is torch.float16 but q is torch.float32"):
        call(q, k.half(), v)
    with pytest.raises(TypeError, match="scale must be a float"):
        call(q, k, v, scale=torch.tensor(0.5))
    for d in (8, 160):
        qd, kd, vd = (torch.randn(1, 1, 2, d, device=device) for _ in range(3))
        with pytest.raises(mmfast.BackendUnavailableError, match=f"head dims 16..128; q has head dim d={d}"):
            call(qd, kd, vd)


def test_direct_operator_calls_are_checked_in_cpp():
    """torch.ops.mmfast.cross_attention called without the Python checks still errors, naming the argument."""
    require_kernel("cpu")
    fwd = torch.ops.mmfast.cross_attention
    q, k, v, k2, v2 = (t.float() for t in make_inputs(1, 2, 3, 4, 2, 16, seed=17))
    with pytest.raises(RuntimeError, match="q must have 4 dimensions"):
        fwd(q[0], k, v, None, None, 0.25)
    with pytest.raises(RuntimeError, match=r"k must have shape \[B, H, Lk >= 1, d\]"):
        fwd(q, k[:, :1], v, None, None, 0.25)
    with pytest.raises(RuntimeError, match="v2 must have k2's shape"):
        fwd(q, k, v, k2, v2[:, :, :1], 0.25)
    with pytest.raises(RuntimeError, match="k2 and v2 must be given together"):
        fwd(q, k, v, k2, None, 0.25)
    with pytest.raises(RuntimeError, match=r"head dim d \(q.size\(3\)\) must be in \[16, 128\], got 8"):
        fwd(q[..., :8], k[..., :8], v[..., :8], None, None, 0.25)
    with pytest.raises(RuntimeError, match="k/v are Half but q is Float"):
        fwd(q, k.half(), v.half(), None, None, 0.25)


# ---- Triton split-K forward (flash-decoding): few queries per head against many keys (SAM) -----------------
# mmfast/triton/cross_attention.py cuts each head's keys into chunks when B*H*ceil(Lq/BLOCK_M) programs are
# too few to fill a GPU (its num_splits rule; SAM's 7 prompt tokens x 4096 image keys); one program per
# (head, query block, chunk) writes a partial (out, lse) and a merge kernel combines them. These tests run
# that path and the merge, and turn it on or off through the module's thresholds SPLIT_K_MIN_PROGRAMS and
# SPLIT_K_MIN_KEYS.
TRITON_PARAMS = [pytest.param(*p.values, dtype, id=f"{p.id}-{str(dtype)[6:]}")
                 for p in BACKENDS if p.values[0] == "triton" for dtype in dtypes_for(*p.values)]


def triton_module():
    require_kernel("triton")
    from mmfast.triton import cross_attention as tca
    return tca


def check_expanded_kv(fn_kernel, tensors, dtype, device, *, b, seed):
    """fn_kernel(q, k, v, k2, v2) against the fp64 reference when the key/value leaves of batch size 1 are
    expanded over the batch (b > 1) with stride 0 inside the call: out and every gradient (autograd sums
    the expanded gradients over the batch)."""
    def expand(t):
        return t if t is None or t.shape[0] == b else t.expand(b, -1, -1, -1)

    def with_kernel(q, *kv):
        kv = [expand(t) for t in kv]
        assert any(t is not None and t.stride(0) == 0 for t in kv)
        return fn_kernel(q, *kv)

    def with_reference(q, *kv):
        return reference(q, *(expand(t) for t in kv))

    grad = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out, grads = run(with_kernel, tensors, dtype, device, grad)
    out64, grads64 = run(with_reference, tensors, torch.float64, "cpu", grad)
    out_lp, grads_lp = (run(with_reference, tensors, dtype, device, grad) if dtype != torch.float32
                        else (None, [None] * 5))
    assert_close_to_reference(out.cpu(), out64, out_lp, name="out")
    for name, g, g64, g_lp in zip(("q", "k", "v", "k2", "v2"), grads, grads64, grads_lp):
        if g64 is not None:
            assert_close_to_reference(g.cpu(), g64, g_lp, name=f"grad {name}")


@pytest.mark.parametrize("expanded", [False, True], ids=["dense-kv", "expanded-kv"])
@pytest.mark.parametrize("backend, device, dtype", TRITON_PARAMS)
def test_triton_split_k_sam_token_to_image(backend, device, dtype, expanded):
    """SAM's token -> image attention: B=2 prompts, H=8, 7 tokens, 1000 image keys (4096 on a GPU would be
    slow in the interpreter), d=16. 16 programs take the split path under the default rule; k/v either
    dense or one image's keys expanded over the prompts with stride 0. out, lse and the five gradients
    (the backward reads the merged lse)."""
    tca = triton_module()
    b, h, lq, lk, d = 2, 8, 7, 1000, 16
    tensors = make_inputs(b, h, lq, lk, 0, d, seed=20)
    assert tca.forward_splits(*(t.to(device, dtype) for t in tensors[:2]), None) > 1

    def fn(q, k, v, k2, v2):
        return cross_attention(q, k, v, backend=backend)

    if expanded:
        tensors[1], tensors[2] = tensors[1][:1], tensors[2][:1]
        check_expanded_kv(fn, tensors, dtype, device, b=b, seed=21)
    else:
        check_against_reference(backend, device, dtype, tensors, seed=21)
    q, k, v = (t.to(device, dtype).expand(b, -1, -1, -1) for t in tensors[:3])
    _, lse = torch.ops.mmfast.cross_attention_triton(q, k, v, None, None, d ** -0.5)
    # The merged lse against the exact log-sum-exp of the same (rounded) inputs: fp32 statistics either way.
    logits = d ** -0.5 * q.double().cpu() @ k.double().cpu().transpose(-1, -2)
    assert_close_to_reference(lse.cpu(), torch.logsumexp(logits, -1), name="lse")


@pytest.mark.parametrize("backend, device, dtype", TRITON_PARAMS)
def test_triton_split_k_chunks_across_segments(backend, device, dtype, monkeypatch):
    """Forced to its most splits (SPLIT_K_MIN_KEYS = 1), the chunks of the stream k (600 keys) then k2 (200)
    include one that straddles the two segments and one inside k2 alone: out and gradients match the
    reference, also with the second segment expanded over the batch and a head dim that is not a power of
    two; turned off (SPLIT_K_MIN_PROGRAMS = 0) the same inputs run unsplit to the same out. A NaN key in one
    chunk makes its head's rows NaN through the merge and leaves the other heads alone."""
    tca = triton_module()
    b, h, lq, lk, lk2, d = 2, 2, 20, 600, 200, 40
    tensors = make_inputs(b, h, lq, lk, lk2, d, seed=22)
    args = [t.to(device, dtype) for t in tensors]
    monkeypatch.setattr(tca, "SPLIT_K_MIN_KEYS", 1)
    assert tca.forward_splits(args[0], args[1], args[3]) >= 4
    check_against_reference(backend, device, dtype, tensors, seed=23)

    def fn(q, k, v, k2, v2):
        return cross_attention(q, k, v, k2=k2, v2=v2, backend=backend)

    check_expanded_kv(fn, tensors[:3] + [tensors[3][:1], tensors[4][:1]], dtype, device, b=b, seed=24)
    monkeypatch.setattr(tca, "SPLIT_K_MIN_PROGRAMS", 0)
    assert tca.forward_splits(args[0], args[1], args[3]) == 1
    out_lp = reference(*args) if dtype != torch.float32 else None
    assert_close_to_reference(fn(*args).cpu(), reference(*tensors), out_lp, name="unsplit out")

    q, k, v, k2, v2 = tensors
    k2 = k2.clone()
    k2[1, 1, lk2 - 3, 7] = float("nan")  # a key in the last chunk of one head
    out = cross_attention(*(t.to(device, dtype) for t in (q, k, v)), k2=k2.to(device, dtype),
                          v2=v2.to(device, dtype), backend=backend).cpu()
    want = reference(q, k, v, k2, v2)
    assert torch.equal(out.isnan(), want.isnan()) and want[1, 1].isnan().all() and not want[1, 0].isnan().any()


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.values[0] == "triton"])
def test_triton_direct_operator_calls_are_checked(backend, device):
    """torch.ops.mmfast.cross_attention_triton(_backward) called without the Python API's checks still
    raise, naming the argument."""
    triton_module()
    fwd, bwd = torch.ops.mmfast.cross_attention_triton, torch.ops.mmfast.cross_attention_backward_triton
    q, k, v, k2, v2 = (t.to(device, torch.float32) for t in make_inputs(1, 2, 3, 4, 2, 16, seed=25))
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        fwd(q[0], k, v, None, None, 0.25)
    with pytest.raises(ValueError, match=r"k must have shape \[B, H, Lk >= 1, d\]"):
        fwd(q, k[:, :1], v, None, None, 0.25)
    with pytest.raises(ValueError, match="v2 must have k2's shape"):
        fwd(q, k, v, k2, v2[:, :, :1], 0.25)
    with pytest.raises(ValueError, match="k2 and v2 must be given together"):
        fwd(q, k, v, k2, None, 0.25)
    with pytest.raises(ValueError, match=r"head dim d \(q.size\(3\)\) must be in \[16, 128\], got 8"):
        fwd(q[..., :8], k[..., :8], v[..., :8], None, None, 0.25)
    with pytest.raises(TypeError, match="k is torch.float16 but q is torch.float32"):
        fwd(q, k.half(), v.half(), None, None, 0.25)
    with pytest.raises(TypeError, match="runs float32, float16 and bfloat16; q is torch.float64"):
        fwd(q.double(), k.double(), v.double(), None, None, 0.25)
    out, lse = fwd(q, k, v, None, None, 0.25)
    with pytest.raises(ValueError, match="grad_out must match q"):
        bwd(out[:, :1], q, k, v, None, None, out, lse, 0.25)
    with pytest.raises(ValueError, match=r"lse must be \[B, H, Lq\]"):
        bwd(out, q, k, v, None, None, out, lse.double(), 0.25)
