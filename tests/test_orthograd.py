"""OrthoGrad (⊥Grad): closed forms, a float64 formula written here, and the peer's trajectory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from contract import assert_same_params, make_batches, make_model, params_of, train
from grokopt import AmplifiedOptimizer, Grokfast, OrthoGrad
from grokopt.orthograd import orthogonalize_


def _formula(w: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's formula in float64, term by term."""
    w, g = w.double().flatten(), g.double().flatten()
    perp = g - (w @ g) / (w @ w + eps) * w
    return perp * g.norm() / (perp.norm() + eps)


def test_closed_form():
    w, g = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    orthogonalize_([w], [g])
    torch.testing.assert_close(g, torch.tensor([0.0, 2.0**0.5]))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("eps", [1e-30, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_the_formula(foreach, eps, dtype):
    """Every tensor against the float64 formula, a transposed one, a zero weight and a
    zero gradient among them. (No single-entry tensor: its g is parallel to w, so g_perp
    is rounding residue, rescaled to ||g||, in any implementation of the formula.)"""
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4), (2,), (5, 7), (35,), (5, 7), (2,), (5,), (5,)]
    ws = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ws[6], gs[6] = ws[6].t(), gs[6].t()  # transposed (7, 5) views
    ws[8].zero_()
    gs[9].zero_()
    want = [_formula(w, g, eps).view(g.shape) for w, g in zip(ws, gs)]
    orthogonalize_(ws, gs, eps=eps, foreach=foreach)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for g, ref in zip(gs, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(gs[9], torch.zeros(5, dtype=dtype))


@pytest.mark.parametrize("foreach", [False, True])
def test_output_is_orthogonal_to_w_and_keeps_the_norm(foreach):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    g = torch.randn(40, 30, generator=gen, dtype=torch.float64) + 3 * w  # mostly along w
    norm = g.norm()
    orthogonalize_([w], [g], foreach=foreach)
    assert abs(float((w * g).sum())) < 1e-10 * float(w.norm() * g.norm())
    torch.testing.assert_close(g.norm(), norm, rtol=1e-12, atol=0)


def test_zero_weight_and_zero_gradient_stay_finite():
    w, g = torch.zeros(3), torch.tensor([1.0, 2.0, 2.0])
    orthogonalize_([w], [g])  # nothing to remove: g unchanged
    torch.testing.assert_close(g, torch.tensor([1.0, 2.0, 2.0]))
    w, g = torch.ones(3), torch.zeros(3)
    orthogonalize_([w], [g])
    assert torch.equal(g, torch.zeros(3))


def _train(opt_builder, steps=6):
    model = make_model(0, torch.float64)
    train(model, opt_builder(model.parameters()), make_batches(steps, dtype=torch.float64))
    return params_of(model)


@pytest.mark.parametrize("foreach", [False, True])
def test_wrapper_equals_hand_written_loop(foreach):
    """OrthoGrad(SGD) == SGD stepping on gradients replaced by the formula by hand."""

    class Manual(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.copy_(_formula(p, p.grad, 1e-30).view_as(p))
            return super().step(closure)

    ours = _train(lambda p: OrthoGrad(torch.optim.SGD(p, lr=0.1, momentum=0.9), foreach=foreach))
    ref = _train(lambda p: Manual(p, lr=0.1, momentum=0.9))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_agrees_with_pytorch_optimizer_orthograd():
    po = pytest.importorskip("pytorch_optimizer")
    ours = _train(lambda p: OrthoGrad(torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0)))
    peer = _train(lambda p: po.OrthoGrad(torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0)))
    for a, b in zip(ours, peer):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(eps=-1.0), "eps must be a finite float >= 0, got -1.0"),
    (dict(eps=float("nan")), "eps must be a finite float >= 0"),
    (dict(foreach="yes"), "foreach must be None or a bool, got 'yes'"),
])
def test_bad_options_are_refused(kwargs, match):
    model = nn.Linear(2, 2)
    with pytest.raises((ValueError, TypeError), match=match):
        OrthoGrad(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3,\), params\[0\] \(2,\)"):
        orthogonalize_([torch.zeros(2)], [torch.zeros(3)])


@pytest.mark.parametrize("which", ["params", "grads"])
def test_sharded_tensors_are_refused(which, monkeypatch):
    import grokopt.orthograd as mod

    class Sharded(torch.Tensor):  # stands for DTensor
        pass

    monkeypatch.setattr(mod, "dtensor_type", lambda: Sharded)
    w, g = torch.ones(3), torch.ones(3)
    if which == "params":
        w = w.as_subclass(Sharded)
    else:
        g = g.as_subclass(Sharded)
    with pytest.raises(NotImplementedError, match=r"params\[0\] or grads\[0\] is sharded"):
        orthogonalize_([w], [g])
    assert torch.equal(g, torch.ones(3))
    p = nn.Parameter(w)
    p.grad = g
    with pytest.raises(NotImplementedError, match=r"is sharded"):
        OrthoGrad(torch.optim.SGD([p], lr=0.1)).step()
    assert torch.equal(p.grad, torch.ones(3)) and torch.equal(p.detach(), torch.ones(3))


def _layout_params(gen: torch.Generator, dtype: torch.dtype) -> list[nn.Parameter]:
    """Parameters in the layouts a model hands an optimizer: contiguous (one of 256 KiB at
    fp32, the size from which CPU scratch is kept between steps), channels_last and
    transposed, a vector and an empty tensor; then two whose gradients come in another
    layout than the weight's (see _layout_grad)."""
    conv = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)
    return [
        nn.Parameter(torch.randn(256, 256, generator=gen, dtype=torch.float64).to(dtype)),
        nn.Parameter(conv.to(dtype).contiguous(memory_format=torch.channels_last)),
        nn.Parameter(torch.randn(6, 5, generator=gen, dtype=torch.float64).to(dtype).t()),
        nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64).to(dtype)),
        nn.Parameter(torch.zeros(0, 3, dtype=dtype)),
        nn.Parameter(torch.randn(256, 256, generator=gen, dtype=torch.float64).to(dtype)),
        nn.Parameter(conv.to(dtype).contiguous(memory_format=torch.channels_last)),
    ]


def _layout_grad(i: int, p: nn.Parameter, values: torch.Tensor) -> torch.Tensor:
    """``values`` as parameter i's gradient: in the weight's layout, but transposed for the
    contiguous weight 5 and contiguous for the channels_last weight 6."""
    if i == 5:
        return values.t().contiguous().t()
    if i == 6:
        return values.to(p.dtype).contiguous()
    return torch.empty_like(p).copy_(values)


@pytest.mark.parametrize("keep_bytes", [0, None, 10**12])  # every gradient kept, the large, none
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("foreach", [None, False])
def test_restored_gradients_step_like_the_formula_in_every_layout(keep_bytes, fused, dtype,
                                                                   foreach, monkeypatch):
    """restore_grad (default) writes the transform into new tensors, which the inner
    optimizer steps on in each gradient's layout (a fused Adam walks memory); with foreach,
    on CPU, those of large gradients are scratch kept from one step to the next. Over steps
    with new gradients, some in another layout than their weight's: the user's gradients
    come back untouched, the inner optimizer sees the gradients' strides, the parameters
    equal restore_grad=False's bit for bit and the float64 formula's within rounding, and a
    kept scratch is the same memory every step."""
    import grokopt.orthograd as mod

    if keep_bytes is not None:
        monkeypatch.setattr(mod, "KEEP_SCRATCH_BYTES", keep_bytes)
    finals, seen, kept = {}, {True: [], False: []}, []
    for restore in (True, False, "formula"):
        gen = torch.Generator().manual_seed(0)
        params = _layout_params(gen, dtype)
        # (eps 1e-3: an entry of ~1e-8 would turn its rounding into a full step of lr)
        inner = torch.optim.Adam(params, lr=1e-2, eps=1e-3, fused=fused)
        if restore == "formula":
            opt = inner
        else:
            inner.register_step_pre_hook(
                lambda o, a, k, restore=restore: seen[restore].append(
                    [(p.grad.stride(), p.grad.data_ptr()) for p in params]))
            opt = OrthoGrad(inner, restore_grad=restore, foreach=foreach)
        for _ in range(3):
            for i, p in enumerate(params):
                p.grad = _layout_grad(i, p, torch.randn(p.shape, generator=gen,
                                                        dtype=torch.float64).to(dtype))
            raw = [(p.grad, p.grad.clone()) for p in params]
            if restore == "formula":
                with torch.no_grad():
                    for p in params:
                        p.grad = torch.empty_like(p.grad).copy_(
                            _formula(p, p.grad, 1e-30).view(p.shape))
            opt.step()
            if restore is True:
                assert all(p.grad is g and torch.equal(p.grad, r) for p, (g, r) in zip(params, raw))
                kept.append({i: opt._kept_scratch.get(id(p)) for i, p in enumerate(params)})
        finals[restore] = [p.detach().clone() for p in params]
    strides = [p.grad.stride() for p in params]  # the user's, as they came last
    assert strides[5] != params[5].stride() and strides[6] != params[6].stride()
    assert all([s for s, _ in step] == strides for step in seen[True] + seen[False])
    for a, b in zip(finals[True], finals[False]):
        assert torch.equal(a, b)
    if dtype is not torch.bfloat16:  # (the float64 formula rounds differently there)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
        for i, (a, b) in enumerate(zip(finals[True], finals["formula"])):
            # torch's fused Adam pairs a weight with its gradient by memory order, which a
            # gradient in another layout breaks (bare as wrapped): no reference for those
            if not (fused and i in (5, 6)):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # Kept: the large gradients' scratch from the threshold on (the same tensor at every
    # step, in the weight's layout), the small ones' only with a zero threshold; never the
    # empty one, nor any in bf16 (computed in fp32), nor any on the per-tensor reference
    # path. The inner optimizer steps on the kept scratch itself where the gradient has the
    # weight's layout, else on a copy in the gradient's.
    keeps = dtype is not torch.bfloat16 and foreach is None
    large = keeps and keep_bytes != 10**12
    small = keeps and keep_bytes == 0
    want = {0: large, 1: small, 2: small, 3: small, 4: False, 5: large, 6: small}
    for i, expected in want.items():
        assert all((step[i] is not None) == expected for step in kept), i
        if expected:
            assert all(step[i] is kept[0][i] for step in kept)
            assert kept[0][i].stride() == params[i].stride()
            handed = [step[i][1] == kept[0][i].data_ptr() for step in seen[True]]
            assert handed == [i not in (5, 6)] * 3, i


def test_kept_scratch_is_neither_copied_nor_kept_for_parameters_that_left(monkeypatch):
    import copy

    import grokopt.orthograd as mod

    monkeypatch.setattr(mod, "KEEP_SCRATCH_BYTES", 0)
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3))
    opt = OrthoGrad(torch.optim.SGD([a, b], lr=0.1))
    a.grad, b.grad = torch.randn(4, 4), torch.randn(3)
    opt.step()
    assert set(opt._kept_scratch) == {id(a), id(b)}
    assert "_kept_scratch" not in copy.deepcopy(opt).__dict__
    b.grad = None
    opt.step()
    assert set(opt._kept_scratch) == {id(a)}


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gradients_of_a_shared_size_go_through_in_stacks_as_the_formula(restore, dtype):
    """OrthoGrad transforms small tensors that share a size as the rows of stacks under
    restore_grad (on CPU kept from step to step; in place none, one tensor at a time): sizes
    shared within a group and across two groups with other eps (two stacks of one key in a
    step), transposed and channels_last gradients, a zero weight and a zero gradient, sizes
    alone, and an fp64 pair beside ``dtype``. What the inner optimizer steps on, against
    the float64 formula at each of three steps; the kept stacks are the same memory at
    every step."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 6), (6, 4), (24,), (3, 8), (2, 3, 2, 2), (5,), (5,), (7,), (2, 3, 2, 2)]

    def make(dt):
        return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dt))
                for s in shapes]

    first, second = make(dtype), make(dtype)
    first[4] = nn.Parameter(first[4].detach().contiguous(memory_format=torch.channels_last))
    wide = [nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64)) for _ in range(2)]
    groups = [dict(params=first + wide, orthograd_eps=1e-30), dict(params=second, orthograd_eps=1e-3)]
    params = first + wide + second
    eps = {id(p): g["orthograd_eps"] for g in groups for p in g["params"]}
    inner = torch.optim.SGD([dict(params=g["params"]) for g in groups], lr=1.0)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in params]))
    opt = OrthoGrad(inner, restore_grad=restore)
    for group, g in zip(opt.param_groups, groups):
        group["orthograd_eps"] = g["orthograd_eps"]
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    stacks = []
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        first[1].grad = first[1].grad.t().contiguous().t()  # (6, 4) laid out transposed
        second[4].grad = second[4].grad.contiguous(memory_format=torch.channels_last)
        if step == 1:
            first[0].data.zero_()
            second[2].grad.zero_()
        want = [_formula(p.detach(), p.grad, eps[id(p)]).view(p.shape) for p in params]
        opt.step()
        for p, got, ref in zip(params, seen[-1], want):
            t = 1e-12 if p.dtype is torch.float64 else tol
            torch.testing.assert_close(got.double(), ref, rtol=t, atol=t)
        stacks.append({k: [s.w for s in v] for k, v in opt._kept_stacks.items()})
    if not restore:  # in place: no buffer outlives the step
        assert stacks == [{}] * 3
        return
    # a stack per group, kind (device, dtype) and shared size: in each group one of 24
    # entries and one of 5; the fp64 pair a stack of its own in the first group, or rows
    # of its stack of 5 when dtype is fp64 too
    assert sum(len(v) for v in stacks[0].values()) == (4 if dtype is torch.float64 else 5)
    for later in stacks[1:]:
        assert later.keys() == stacks[0].keys()
        assert all(a is b for k in later for a, b in zip(later[k], stacks[0][k]))


def _shared_sizes_model(seed: int = 0) -> nn.Module:
    """A model whose weights (8 x 8 twice) and biases (8 three times) share sizes, so that
    OrthoGrad stacks them (the contract's model has no two of one size)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


_STACKS = {
    "orthograd": lambda o: OrthoGrad(o),
    "grokfast(orthograd)": lambda o: Grokfast(OrthoGrad(o), alpha=0.9, lamb=2.0),
    "orthograd(grokfast)": lambda o: OrthoGrad(Grokfast(o, alpha=0.9, lamb=2.0)),
    "neuralgrok(orthograd)": lambda o: AmplifiedOptimizer(OrthoGrad(o), hidden=(8,),
                                                          g_hat="last"),
}
_INNERS = {
    # torch's foreach SGD with nesterov momentum adds into p.grad in place
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("inner", list(_INNERS))
@pytest.mark.parametrize("stack", list(_STACKS))
def test_stacked_gradients_in_every_stack_train_alike_in_both_modes(stack, inner):
    """With gradients of shared sizes (the stacked route), alone and in stacks of wrappers,
    around inner optimizers that write into p.grad or walk memory: restore_grad True and
    False give the same parameters bit for bit, True gives each user's gradient back
    untouched, and a deep copy taken midway continues as the original does."""
    finals = {}
    for restore in (True, False):
        model = _shared_sizes_model()
        torch.manual_seed(7)  # the amplifier's init, the same in both runs
        opt = _STACKS[stack](_INNERS[inner](model.parameters()))
        opt.restore_grad = restore
        for i, (x, y) in enumerate(make_batches(4)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            users = [(p.grad, p.grad.clone()) for p in model.parameters()]
            opt.step()
            if restore:
                assert all(p.grad is g and torch.equal(p.grad, r)
                           for p, (g, r) in zip(model.parameters(), users))
            if i == 1:
                twin_model, twin = copy.deepcopy((model, opt))  # one memo: shared params
        if stack == "orthograd" and restore:
            assert len(opt._kept_stacks) == 2  # the 8 x 8 weights, the biases of 8
        finals[restore] = model
        # the copy, from step 2 on the same batches
        for x, y in make_batches(4)[2:]:
            twin.zero_grad()
            nn.functional.mse_loss(twin_model(x), y).backward()
            twin.step()
        assert_same_params(twin_model, model)
    assert_same_params(finals[True], finals[False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stacked_route_equals_the_per_tensor_route_bit_for_bit(dtype):
    """Stacks change no result for contiguous tensors: the same arithmetic as one tensor at
    a time (dot products on the tensors themselves: a BLAS dot on a row that starts
    elsewhere sums in another order), for sizes whose rows start off any alignment, a zero
    weight and a zero gradient. So a run's trajectory is the one before stacks existed."""
    import grokopt.orthograd as mod

    gen = torch.Generator().manual_seed(4)
    shapes = [(3,)] * 3 + [(5,)] * 4 + [(8, 8)] * 3 + [(4097,)] * 2 + [(7, 11)] * 2
    ws = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    ws[3].zero_()
    gs[8].zero_()
    for eps in (1e-30, 1e-3):
        stacked = mod._foreach(ws, gs, eps, stacks=mod._new_stack)
        alone = mod._foreach(ws, gs, eps)
        for a, b in zip(stacked, alone):
            assert torch.equal(a, b)
