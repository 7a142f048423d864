"""NeuralGrok's transform G_phi: docs/methods.md invariants, a reference, fast vs exact path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from grokopt import amplifier, gphi
from grokopt.amplifier import make_amplifier, piecewise_plan
from grokopt.gphi import amplify_gradients, amplify_gradients_vjp
from test_amplifier import rounding_bound

PATHS = ["pwl", "exact"]
F64 = torch.float64


@pytest.fixture(autouse=True, params=[None, False], ids=["cpu-way", "gpu-way"])
def device_way(request, monkeypatch):
    """Every test here both ways the CPU and other devices differ: the table locates the
    pieces (amplifier.CENTRE_SPLIT: on a CPU only the entries off the piece of 0 are
    searched; elsewhere every entry) and buckets shift and scale their segments
    (gphi.SEGMENT_KERNELS: one kernel per segment on a CPU; elsewhere the factors
    repeated over the entries)."""
    monkeypatch.setattr(amplifier, "CENTRE_SPLIT", request.param)
    monkeypatch.setattr(gphi, "SEGMENT_KERNELS", request.param)


def amp64(hidden=(16, 16), seed=0):
    torch.manual_seed(seed)
    return make_amplifier(hidden, dtype=F64)


def reference(g: torch.Tensor, amp: nn.Module, c: float) -> torch.Tensor:
    """docs/methods.md written as in the paper: softmax over the tensor, then renormalise."""
    f = torch.stack([amp(v.view(1, 1)).view(()) for v in g.reshape(-1)])
    w = torch.softmax(f, 0)
    u = w * g.reshape(-1)
    return (c * u / u.norm()).view(g.shape)


def written_out(x: torch.Tensor, amp: nn.Module, c: float, eps: float) -> torch.Tensor:
    """docs/methods.md with eps, for a flat tensor, by the amplifier itself: differentiable
    in its weights (autograd's max shares the derivative evenly among tied entries)."""
    f = amp(x[:, None])[:, 0]
    u = torch.exp(f - f.max()) * x
    return c * u / (u.norm() + eps)


# ---------------------------------------------------------------- invariants (docs/methods.md)

grad_tensors = st.lists(
    st.floats(-10, 10, allow_nan=False, allow_infinity=False), min_size=1, max_size=40
).filter(lambda v: max(abs(x) for x in v) > 1e-3)


@settings(max_examples=40, deadline=None)
@given(values=grad_tensors, c=st.floats(0.05, 5.0), path=st.sampled_from(PATHS))
def test_norm_is_c_and_direction_matches_reference(values, c, path):
    amp = amp64(seed=len(values))
    g = torch.tensor(values, dtype=F64)
    with torch.no_grad():
        out, = amplify_gradients([g], amp, c=c, eps=0.0, path=path)
        ref = reference(g, amp, c)
    # fp64: the norm and the softmax are a few hundred roundings of 1.1e-16 away.
    assert out.norm().item() == pytest.approx(c, rel=1e-10)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12 * c)


@settings(max_examples=30, deadline=None)
@given(values=grad_tensors, shift=st.floats(-20, 20), path=st.sampled_from(PATHS))
def test_adding_a_constant_to_f_changes_nothing(values, shift, path):
    amp = amp64(seed=1)
    shifted = copy.deepcopy(amp)
    with torch.no_grad():
        shifted[-1].bias += shift
        g = torch.tensor(values, dtype=F64)
        a, = amplify_gradients([g], amp, path=path)
        b, = amplify_gradients([g], shifted, path=path)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("c", [0.2, 1.0])
def test_constant_f_is_plain_per_tensor_normalisation(path, c):
    amp = amp64()
    with torch.no_grad():
        amp[-1].weight.zero_()
        amp[-1].bias.fill_(3.0)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)]
    with torch.no_grad():
        out = amplify_gradients(grads, amp, c=c, path=path)
    for g, o in zip(grads, out):
        torch.testing.assert_close(o, c * g / g.norm(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_all_zero_gradient_gives_zero_not_nan(path, grad_mode, dtype):
    torch.manual_seed(0)
    amp = make_amplifier((8, 8))
    grads = [torch.zeros(4, 3, dtype=dtype), torch.ones(2, dtype=dtype), torch.zeros(0, dtype=dtype)]
    with torch.set_grad_enabled(grad_mode):
        out = amplify_gradients(grads, amp, path=path)
    assert torch.equal(out[0], torch.zeros(4, 3, dtype=dtype))
    assert out[2].shape == (0,)
    assert all(o.dtype == dtype and torch.isfinite(o).all() for o in out)
    if grad_mode:
        total = sum(o.float().sum() for o in out)
        grads_phi = torch.autograd.grad(total, list(amp.parameters()), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads_phi)


def test_inputs_are_not_changed_and_outputs_keep_dtype_and_shape():
    torch.manual_seed(0)
    amp = make_amplifier((8,))
    g = torch.randn(3, 4, dtype=torch.bfloat16)
    before = g.clone()
    out, = amplify_gradients([g], amp, c=0.5)
    assert torch.equal(g, before)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4)
    assert out.float().norm().item() == pytest.approx(0.5, rel=1e-2)  # bf16: 8 bits


# ---------------------------------------------------------------- the piecewise-linear path


@pytest.mark.parametrize("chunk", [None, 7])  # 7: the pwl backward recomputes in many chunks
@pytest.mark.parametrize("scale", [1e-3, 1.0])
def test_pwl_transform_and_hypergradient_agree_with_exact_path(scale, chunk):
    """Outputs: a gain error of at most E per entry changes w by a factor in
    [e^-E, e^E] after the common shift, so ||G_pwl - G_exact|| <= 2c(e^{2E} - 1) (plus the
    renormalisation's own rounding, 1e-13 in fp64). Hypergradients: each is a sum over entries
    of products of the same affine pieces' derivatives, computed in fp64 by both paths;
    their difference is rounding (about N * 1e-16 of the terms' size), checked at 1e-9."""
    torch.manual_seed(5)
    amp = make_amplifier((32, 32), dtype=F64)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(40, 30, generator=gen, dtype=F64) * scale,
             torch.randn(30, generator=gen, dtype=F64) * scale]
    weights = [torch.randn(g.shape, generator=gen, dtype=F64) for g in grads]
    outs, hyper = {}, {}
    for path in PATHS:
        out = amplify_gradients(grads, amp, c=0.7, path=path, chunk_size=chunk)
        objective = sum((o * w).sum() for o, w in zip(out, weights))
        hyper[path] = torch.autograd.grad(objective, list(amp.parameters()))
        outs[path] = [o.detach() for o in out]
    x_max = max(g.abs().max().item() for g in grads)
    e = rounding_bound(amp, x_max, F64)
    for a, b in zip(outs["pwl"], outs["exact"]):
        assert (a - b).norm().item() <= 2 * 0.7 * math.expm1(2 * e) + 1e-13
    # The last bias's true hypergradient is 0 (shift invariance), so both paths give only the
    # rounding residue of a cancelling sum there: absolute tolerance on the common scale.
    scale_all = max(b.abs().max().item() for b in hyper["exact"])
    for a, b in zip(hyper["pwl"], hyper["exact"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * scale_all)


def test_chunked_paths_equal_unchunked():
    torch.manual_seed(0)
    amp = make_amplifier((16, 16))
    g = torch.randn(1000) * 0.1
    with torch.no_grad():
        for path in PATHS:
            whole, = amplify_gradients([g], amp, path=path, chunk_size=None)
            parts, = amplify_gradients([g], amp, path=path, chunk_size=37)
            # the lookup is elementwise: chunking cannot change a bit; the MLP's matmuls may
            # block differently per chunk size, one rounding of fp32 per layer
            tol = 0 if path == "pwl" else 1e-6
            torch.testing.assert_close(parts, whole, rtol=tol, atol=tol)


def test_leaky_relu_and_identity_use_pwl_other_activations_fall_back():
    torch.manual_seed(0)
    leaky = nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.1), nn.Identity(), nn.Linear(8, 1)).double()
    assert piecewise_plan(leaky) is not None
    g = torch.randn(300, dtype=F64)
    with torch.no_grad():
        a, = amplify_gradients([g], leaky, path="pwl")
        b, = amplify_gradients([g], leaky, path="exact")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    smooth = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    assert piecewise_plan(smooth) is None
    with pytest.raises(ValueError, match="path='pwl'"):
        amplify_gradients([g.float()], smooth, path="pwl")
    with torch.no_grad():
        auto, = amplify_gradients([g.float()], smooth)  # falls back to the exact path
    assert auto.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_bad_arguments_name_themselves():
    amp = make_amplifier((4,))
    g = [torch.ones(2)]
    with pytest.raises(ValueError, match="path"):
        amplify_gradients(g, amp, path="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        amplify_gradients(g, amp, chunk_size=0)
    with pytest.raises(ValueError, match=r"c must be a float or a sequence of 1 floats \(one per gradient\), got 2 values"):
        amplify_gradients(g, amp, c=[1.0, 2.0])


@pytest.mark.parametrize("path", ["pwl", "exact"])
@pytest.mark.parametrize("eps", [1e-12, 1e-2])
def test_written_out_hypergradient_equals_autograd(path, eps):
    """The hand-written vector-Jacobian product that FSDP2 meta-steps use (with no process
    group its reductions are local) equals autograd through amplify_gradients, including
    the path through max f, which matters through eps; an empty tensor and a tie for the
    max (the repeated entries) included."""
    torch.manual_seed(0)
    amp = make_amplifier((6, 6), dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64),
             torch.zeros(0, dtype=torch.float64), torch.randn(4, dtype=torch.float64) * 1e-3,
             torch.full((3,), 0.7, dtype=torch.float64)]
    upstream = [torch.randn_like(g) for g in grads]
    cs = [1.0, 0.5, 1.0, 2.0, 1.0]
    out = amplify_gradients(grads, amp, c=cs, eps=eps, path=path)
    expected = torch.autograd.grad(sum((y * u).sum() for y, u in zip(out, upstream)),
                                   list(amp.parameters()))
    got = amplify_gradients_vjp(grads, upstream, amp, c=cs, eps=eps, path=path, chunk_size=3)
    # Some entries are exactly zero in exact arithmetic (the last bias cancels in f - max f)
    # and come out as rounding noise on either side: compare on the scale of the whole
    # (fp64; measured error ~2e-15 of it, while a missing or wrong term is O(1)).
    scale = max(e.abs().max().item() for e in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-13 * scale)


def tied_max_amplifier():
    """f(x) = -relu(x) + 0 * relu(-x): every x <= 0 attains max f = 0, on a piece whose slope
    (-w, w the zero weight) still moves with the weights, so the share of the max's
    derivative that each tied entry gets reaches the hypergradient."""
    amp = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        amp[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        amp[0].bias.zero_()
        amp[2].weight.copy_(torch.tensor([[-1.0, 0.0]]))
        amp[2].bias.zero_()
    return amp


@pytest.mark.parametrize("c", [0.3, 1.0])
@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_tied_maxima_share_the_max_path_evenly_on_every_route(c, eps):
    """Several entries, at different x, tie for max f. The pwl path's Function and
    amplify_gradients_vjp must give autograd's hypergradient through the exact path (its
    max() shares the gradient evenly among ties), for a written-out G_phi as well. The
    path through max f matters only through eps, hence the large eps values; the gradient
    is small next to them (norm ~0.2)."""
    amp = tied_max_amplifier()
    g = torch.tensor([-0.1, -0.05, -0.02, 0.03, 0.08, -0.15], dtype=F64)
    v = torch.tensor([0.3, -1.0, 0.5, 2.0, -0.7, 1.1], dtype=F64)
    params = list(amp.parameters())

    written = torch.autograd.grad((written_out(g, amp, c, eps) * v).sum(), params)
    for path in PATHS:
        out, = amplify_gradients([g], amp, c=c, eps=eps, path=path, chunk_size=4)
        got = torch.autograd.grad((out * v).sum(), params)
        vjp = amplify_gradients_vjp([g], [v], amp, c=c, eps=eps, path=path, chunk_size=4)
        for a, b, e in zip(got, vjp, written):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(b, e, rtol=1e-12, atol=1e-15)
    # the test has teeth: giving the whole max term to one tied entry moves the zero weight's
    # hypergradient by a fraction of itself
    assert written[2][0, 1].abs().item() > 1e-3


def test_vjp_rejects_cotangents_of_other_shapes_by_name():
    amp = make_amplifier((4,))
    with pytest.raises(ValueError, match=r"cotangents must be tensors of the gradients' shapes \[\(2,\)\], got \[\(3,\)\]"):
        amplify_gradients_vjp([torch.ones(2)], [torch.ones(3)], amp)
    with pytest.raises(TypeError, match="cotangents must be a sequence of tensors, got Tensor"):
        amplify_gradients_vjp([torch.ones(2)], torch.ones(2), amp)
    with pytest.raises(ValueError, match="path must be one of"):
        amplify_gradients_vjp([torch.ones(2)], [torch.ones(2)], amp, path="fast")


# ---------------------------------------------------------------- buckets of small tensors


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 12), max_size=12),
       kinds=st.lists(st.sampled_from([(torch.float32, "cpu"), (F64, "cpu"), (F64, "meta")]),
                      min_size=12, max_size=12),
       limit=st.integers(1, 30))
def test_buckets_are_maximal_runs_of_one_dtype_and_device_within_the_limit(sizes, kinds, limit):
    """Brute force: every nonempty tensor in exactly one run, in order; a run shares one
    dtype and one device and holds at most `limit` entries unless it is one tensor; a run
    ends only where the next tensor would not fit or differs in dtype or device."""
    from grokopt.gphi import _buckets

    grads = [torch.zeros(n, dtype=kinds[i][0], device=kinds[i][1]) for i, n in enumerate(sizes)]
    runs = _buckets(grads, limit)
    assert [i for run in runs for i in run] == [i for i, n in enumerate(sizes) if n]
    for run in runs:
        assert len({kinds[i] for i in run}) == 1
        assert len(run) == 1 or sum(sizes[i] for i in run) <= limit
    for run, following in zip(runs, runs[1:]):
        nxt = following[0]
        assert kinds[nxt] != kinds[run[-1]] or sum(sizes[i] for i in run) + sizes[nxt] > limit


def mixed_gradients():
    """Small tensors of three dtypes (so three runs at least), an empty one between, an
    all-zero one inside a run, one whose max f is tied (repeated entries), different c."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64),
             torch.zeros(0, dtype=F64), torch.zeros(2, 2, dtype=F64),
             torch.full((4,), -0.3, dtype=F64), torch.randn(6, generator=gen, dtype=F64) * 1e-3,
             torch.randn(2, 3, generator=gen).float(), torch.randn(7, generator=gen).float(),
             torch.randn(4, generator=gen).bfloat16(), torch.randn(3, 3, generator=gen, dtype=F64)]
    cs = [1.0, 0.5, 1.0, 2.0, 0.7, 3.0, 1.0, 0.2, 1.5, 0.9]
    return grads, cs


@pytest.mark.parametrize("chunk", [None, 10, 25])  # where the runs split differs
@pytest.mark.parametrize("eps", [1e-12, 0.3])
def test_bucketed_transform_and_hypergradient_equal_the_per_entry_reference(chunk, eps):
    """The bucket route (several small tensors flat, their max, norm and dot products as
    segment reductions) against the definition written per tensor and per entry with the
    amplifier itself, in fp64: the outputs, and the hypergradient by autograd through the
    written-out definition (its max() shares the derivative among the tied entries)."""
    torch.manual_seed(2)
    amp = make_amplifier((6, 6), dtype=F64)
    grads, cs = mixed_gradients()
    # representable in each output's dtype: the cotangent reaches G_phi through the cast
    weights = [torch.randn(g.shape, dtype=F64).to(g.dtype).double() for g in grads]
    params = list(amp.parameters())
    out = amplify_gradients(grads, amp, c=cs, eps=eps, path="pwl", chunk_size=chunk)
    got = torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(out, weights)), params)
    written = 0
    for g, c, o, w in zip(grads, cs, out, weights):
        if g.numel() == 0:
            assert o.shape == g.shape
            continue
        y = written_out(g.double().reshape(-1), amp, c, eps)
        assert o.dtype == g.dtype and o.shape == g.shape
        tol = 1e-2 if g.dtype == torch.bfloat16 else (1e-6 if g.dtype == torch.float32 else 1e-12)
        torch.testing.assert_close(o.double().reshape(-1), y.detach().to(g.dtype).double(),
                                   rtol=tol, atol=tol * c)
        written = written + (y * w.double().reshape(-1)).sum()
    expected = torch.autograd.grad(written, params)
    scale = max(e.abs().max().item() for e in expected)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12 * scale)
    with torch.no_grad():  # the no-grad route of the buckets: the same outputs
        again = amplify_gradients(grads, amp, c=cs, eps=eps, path="pwl", chunk_size=chunk)
    for a, o in zip(again, out):
        assert torch.equal(a, o.detach())


def _layouts():
    """Small gradients in several memory layouts and dtypes, in runs that form buckets."""
    gen = torch.Generator().manual_seed(4)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return [r(6, 5).double().t(), r(7).double(), r(2, 3, 4, 4).double().to(memory_format=torch.channels_last),
            r(5, 3).t(), r(9), r(2, 3, 3, 3).to(memory_format=torch.channels_last),
            r(4, 6).half(), r(5).half(), r(3, 3).bfloat16(), r(8).bfloat16()]


@pytest.mark.parametrize("amp_dtype", [torch.float32, F64])
def test_bucket_route_equals_the_per_tensor_route(amp_dtype):
    """The buckets (default chunk) against the per-tensor route (chunk_size=1: no tensor
    shares a bucket), which the tests above hold to the definition: outputs with and without
    grad mode and the hypergradient, for transposed and channels_last gradients, fp16, bf16,
    fp32 and fp64 gradients under an fp32 and an fp64 amplifier (the work dtype is the wider
    of fp32, the gradient's and the amplifier's: fp64 gradients under an fp32 amplifier are
    normalised in fp64), and c per tensor."""
    torch.manual_seed(7)
    amp = make_amplifier((8, 8), dtype=amp_dtype)
    grads = _layouts()
    cs = [0.5 + 0.25 * i for i in range(len(grads))]
    weights = [torch.randn(g.shape).to(g.dtype) for g in grads]
    params = list(amp.parameters())
    results = {}
    for chunk in (None, 1):
        out = amplify_gradients(grads, amp, c=cs, chunk_size=chunk)
        hyper = torch.autograd.grad(sum((o.double() * w.double()).sum() for o, w in zip(out, weights)),
                                    params)
        with torch.no_grad():
            plain = amplify_gradients(grads, amp, c=cs, chunk_size=chunk)
        results[chunk] = ([o.detach() for o in out], plain, hyper)
    (bucketed, bucketed_plain, hyper), (single, single_plain, hyper_single) = results[None], results[1]
    for g, a, b, c, d in zip(grads, bucketed, bucketed_plain, single, single_plain):
        assert a.dtype == b.dtype == g.dtype and a.shape == b.shape == g.shape
        wide = torch.promote_types(g.dtype, amp_dtype) == F64
        tol = 1e-12 if wide else (1e-6 if g.dtype == torch.float32 else 1e-2)
        for got in (a, b):
            torch.testing.assert_close(got.double(), c.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(b.double(), d.double(), rtol=tol, atol=tol)
    scale = max(h.abs().max().item() for h in hyper_single)
    tol = 1e-12 if amp_dtype == F64 else 1e-5
    for a, e in zip(hyper, hyper_single):
        torch.testing.assert_close(a, e, rtol=0, atol=tol * scale)


def test_buckets_stay_within_a_chunk_and_keep_no_copy_for_backward(monkeypatch):
    """Even with chunk_size=None (which only stops the per-tensor chunking), a bucket holds
    at most CHUNK_SIZE entries; what the bucket's graph saves for backward is the gradients
    themselves (views) and per-bucket scalars, never a concatenated copy."""
    from grokopt import gphi

    totals = []
    real = gphi._Segments.of
    monkeypatch.setattr(gphi._Segments, "of", classmethod(
        lambda cls, sizes, device: totals.append(sum(sizes)) or real(sizes, device)))
    amp = make_amplifier((4,))
    half = gphi.CHUNK_SIZE // 2 + 1
    big = [torch.randn(half) for _ in range(3)]  # no two fit in one chunk
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            amplify_gradients(big, amp, chunk_size=None)
    assert totals == []
    small = [torch.randn(100, 100) for _ in range(6)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = amplify_gradients(small, amp, chunk_size=None)
    assert totals == [60_000]  # the six in one bucket
    storages = {g.untyped_storage().data_ptr() for g in small}
    copies = [tuple(t.shape) for t in saved
              if t.untyped_storage().data_ptr() not in storages and t.numel() > 100]
    assert copies == []
    # the outputs are separate tensors: changing one in place is allowed and changes no other
    assert len({o.untyped_storage().data_ptr() for o in out}) == len(out)
    before = out[1].detach().clone()
    out[0].mul_(2)
    assert torch.equal(out[1].detach(), before)
    torch.autograd.grad(sum(o.sum() for o in out), list(amp.parameters()))


@pytest.mark.parametrize("c", [0.3, 1.0])
def test_bucketed_ties_share_the_max_path_per_tensor(c):
    """Two tensors in one bucket, each with several entries tied for its max f (every x <= 0
    under tied_max_amplifier): the max term is shared within each tensor, never across."""
    amp = tied_max_amplifier()
    g1 = torch.tensor([-0.1, -0.05, 0.03, 0.08], dtype=F64)
    g2 = torch.tensor([-0.02, 0.2, -0.15, -0.3, 0.01], dtype=F64)
    v1, v2 = torch.tensor([0.3, -1.0, 2.0, -0.7], dtype=F64), torch.tensor([0.5, 1.1, -0.4, 0.9, 1.3], dtype=F64)
    params, eps = list(amp.parameters()), 0.5
    written = 0
    for g, v in ((g1, v1), (g2, v2)):
        written = written + (written_out(g, amp, c, eps) * v).sum()
    expected = torch.autograd.grad(written, params)
    out = amplify_gradients([g1, g2], amp, c=c, eps=eps, path="pwl")
    got = torch.autograd.grad((out[0] * v1).sum() + (out[1] * v2).sum(), params)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-15)
    assert expected[2][0, 1].abs().item() > 1e-3  # the shared max term is there to get wrong
