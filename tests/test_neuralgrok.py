"""AmplifiedOptimizer: step, meta-step (finite differences), state, nesting, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from contract import anchor_entry, make_batches, make_model, per_param, wide
from grokopt import Grokfast, grokfast_
from grokopt import AmplifiedOptimizer, amplify_gradients, make_amplifier

F64 = torch.float64
mse = nn.functional.mse_loss


def model64(seed=0):
    return make_model(seed, F64)


def setup(g_hat="recompute", path="exact", hidden=(6, 6), lr=0.3, seed=0, **kw):
    model = model64(seed)
    torch.manual_seed(seed + 100)
    amp = make_amplifier(hidden, dtype=F64)
    opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=lr), amplifier=amp,
                             g_hat=g_hat, path=path, meta_lr=1e-2, **kw)
    return model, opt


def one_step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    mse(model(x), y).backward()
    opt.step()


def losses(batch, outer):
    (x, y), (xo, yo) = batch, outer
    return (lambda fwd: mse(fwd(xo), yo)), (lambda fwd: mse(fwd(x), y))


# ---------------------------------------------------------------- step


@pytest.mark.parametrize("c", [0.2, 1.0])
@pytest.mark.parametrize("path", ["pwl", "exact"])
def test_step_is_inner_optimizer_on_amplified_gradients(path, c):
    model, opt = setup(path=path, eps=0.0, c=c)  # the reference normalises w first: eps would differ
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    amp = copy.deepcopy(opt.amplifier)
    for batch in make_batches(3, dtype=F64):
        one_step(model, opt, batch)
        x, y = batch
        ref_opt.zero_grad()
        mse(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():  # docs/methods.md per tensor, written out
                f = amp(p.grad.reshape(-1, 1)).reshape(p.shape)
                u = torch.softmax(f.reshape(-1), 0).reshape(p.shape) * p.grad
                p.grad.copy_(c * u / u.norm())
        ref_opt.step()
    # Per step the amplified gradients agree to ~10 ulp of their O(1) entries (fp64, see
    # test_gphi.py); 3 steps of lr 0.3 keep the parameters within 1e-12 of each other.
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", ["amplify-then-filter", "filter-then-amplify"])
def test_nesting_with_grokfast_composes_the_transforms(order):
    model = make_model(0)
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    amp = make_amplifier((8, 8))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if order == "amplify-then-filter":
        opt = AmplifiedOptimizer(Grokfast(adamw, alpha=0.9, lamb=2.0), amplifier=copy.deepcopy(amp))
    else:
        opt = Grokfast(AmplifiedOptimizer(adamw, amplifier=copy.deepcopy(amp)), alpha=0.9, lamb=2.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    states = [{} for _ in ref.parameters()]
    for x, y in make_batches(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            mse(m(x), y).backward()
        opt.step()
        grads = [p.grad for p in ref.parameters()]
        with torch.no_grad():
            if order == "amplify-then-filter":
                for g, n in zip(grads, amplify_gradients(grads, amp)):
                    g.copy_(n)
                grokfast_(grads, states, alpha=0.9, lamb=2.0)
            else:
                grokfast_(grads, states, alpha=0.9, lamb=2.0)
                for g, n in zip(grads, amplify_gradients(grads, amp)):
                    g.copy_(n)
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("restore_grad", [False, True])
def test_max_grad_norm_clips_after_the_transform(restore_grad):
    model, opt = setup(path="pwl", max_grad_norm=0.5, restore_grad=restore_grad)
    x, y = make_batches(1, dtype=F64)[0]
    opt.zero_grad()
    mse(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    # plain SGD, lr 0.3: the step it took is -lr times the gradient it stepped on
    stepped = [(b - p.detach()) / 0.3 for b, p in zip(before, model.parameters())]
    total = torch.sqrt(sum(s.pow(2).sum() for s in stepped))
    # 4 tensors of norm 1 -> clipped; clip_grad_norm_ divides by (norm + 1e-6)
    assert total.item() == pytest.approx(0.5 * 2 / (2 + 1e-6), rel=1e-12)
    for p, r, s in zip(model.parameters(), raw, stepped):
        if restore_grad:
            assert torch.equal(p.grad, r)  # the user's gradient, as backward left it
        else:
            torch.testing.assert_close(p.grad, s, rtol=1e-12, atol=0)  # the clipped one


@pytest.mark.parametrize("path", ["pwl", "exact"])
@pytest.mark.parametrize("fused", [False, True])
def test_the_inner_optimizer_sees_the_amplified_gradients_in_the_gradients_layout(fused, path):
    """With restore_grad the inner optimizer steps on G_phi's own outputs, which must be laid
    out as the gradients were (a fused optimizer walks memory and takes the parameter's
    layout): a channels_last conv weight and a transposed linear weight. The strides the
    inner optimizer sees are the parameters', and the parameters after the step equal
    those of restore_grad=False, which writes into the gradients themselves."""
    results, seen = {}, {}
    for restore in (True, False):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        weight = nn.Parameter(torch.randn(6, 5).t())  # a transposed (5, 6)
        params = [conv.weight, conv.bias, weight]
        gen = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
        assert not conv.weight.grad.is_contiguous() and not weight.grad.is_contiguous()
        inner = torch.optim.Adam(params, lr=0.1, fused=fused)

        def strides(optimizer, args, kwargs, restore=restore, params=params):
            seen.setdefault(restore, [p.grad.stride() for p in params])

        inner.register_step_pre_hook(strides)
        opt = AmplifiedOptimizer(inner, hidden=(8,), g_hat="last", path=path,
                                 restore_grad=restore)
        raw = [p.grad.clone() for p in params]
        opt.step()
        results[restore] = [p.detach().clone() for p in params]
        if restore:
            assert all(torch.equal(p.grad, r) for p, r in zip(params, raw))
    assert seen[True] == seen[False] == [p.stride() for p in params]
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- meta-step: exact hypergradient


@pytest.mark.parametrize("g_hat", ["recompute", "last"])
@pytest.mark.parametrize("path", ["exact", "pwl"])
def test_hypergradient_matches_central_finite_differences(g_hat, path):
    """fp64, h = 1e-6: central differences err by O(h^2 |L'''|) ~ 1e-12 plus rounding
    ~ 1e-16 |L| / h ~ 1e-10, far below the 1e-6 relative tolerance. The pwl path is the same
    function, so the same check applies (no kink sits within h of a data point here)."""
    model, opt = setup(g_hat=g_hat, path=path)
    batches = make_batches(3, dtype=F64)
    for batch in batches[:2]:
        one_step(model, opt, batch)
    outer, inner = losses(batches[1], batches[2])
    inner = inner if g_hat == "recompute" else None
    params = list(opt.amplifier.parameters())
    loss = opt.meta_loss(model, outer, inner)
    analytic = torch.autograd.grad(loss, params)
    h = 1e-6
    for p, a in zip(params, analytic):
        numeric = torch.zeros_like(p)
        for i in range(p.numel()):
            with torch.no_grad():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + h
                up = opt.meta_loss(model, outer, inner).item()
                p.view(-1)[i] = old - h
                down = opt.meta_loss(model, outer, inner).item()
                p.view(-1)[i] = old
            numeric.view(-1)[i] = (up - down) / (2 * h)
        torch.testing.assert_close(a, numeric, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- meta-step: a written-out reference


META_LR = 1e-2


def bn_model(seed=0):
    torch.manual_seed(seed)
    # BatchNorm after the Tanh: right after a Linear it would cancel that layer's bias, whose
    # gradient would be rounding noise with an arbitrary normalised direction.
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(F64)


NETS = {"mlp": model64, "batchnorm": bn_model}


def written_out(model, params, x):
    """The model's forward by hand from ``params`` (name -> tensor): Linear, Tanh, and
    BatchNorm1d with the batch's statistics in train mode, the running ones in eval mode."""
    h = x
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            h = h @ params[f"{i}.weight"].T + params[f"{i}.bias"]
        elif isinstance(layer, nn.Tanh):
            h = torch.tanh(h)
        elif isinstance(layer, nn.BatchNorm1d):
            if layer.training:
                mean, var = h.mean(0), h.var(0, unbiased=False)
            else:
                mean, var = layer.running_mean, layer.running_var
            h = (h - mean) / torch.sqrt(var + layer.eps) * params[f"{i}.weight"] + params[f"{i}.bias"]
        else:
            raise AssertionError(type(layer))
    return h


def reference_g_hat(model, batch):
    """The raw gradient of the batch's MSE at the model's current parameters."""
    x, y = batch
    params = dict(model.named_parameters())
    loss = mse(written_out(model, params, x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(params.values()))]


def reference_meta_loss(model, amp, g_hats, lr, c, outer_batch):
    """The lookahead as the paper writes it, theta' = theta - lr * c * u / ||u|| with
    u = softmax(amp(g)) * g per tensor, then the outer MSE of the hand-written forward at
    theta'; differentiable in ``amp``."""
    ahead = {}
    for (name, p), g in zip(model.named_parameters(), g_hats):
        f = amp(g.reshape(-1, 1)).reshape(-1)
        u = torch.softmax(f, 0) * g.reshape(-1)
        ahead[name] = p.detach() - lr * (c * u / u.norm()).view(p.shape)
    xo, yo = outer_batch
    return mse(written_out(model, ahead, xo), yo)


def build(model, *, c=1.0, g_hat="recompute", path="exact", dtype=F64, device="cpu", **kw):
    """SGD(lr 0.3) inside; an SGD meta-optimizer, so a meta-step moves the amplifier by
    exactly -META_LR * hypergradient; eps=0 as in the reference."""
    torch.manual_seed(100)
    amp = make_amplifier((6, 6), dtype=dtype, device=device)
    return AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), amplifier=amp,
                              meta_optimizer=torch.optim.SGD(amp.parameters(), lr=META_LR),
                              c=c, g_hat=g_hat, path=path, eps=0.0, **kw)


def train_steps(model, opt, batches):
    """Training steps; returns the raw gradient of the last one (what g_hat='last' keeps)."""
    for batch in batches:
        raw = reference_g_hat(model, batch)
        one_step(model, opt, batch)
    return raw


def model_state(model):
    return ([p.detach().clone() for p in model.parameters()],
            [p.grad.clone() for p in model.parameters()],
            {n: b.clone() for n, b in model.named_buffers()})


def assert_model_unchanged(model, state):
    params, grads, buffers = state
    for p, before, grad in zip(model.parameters(), params, grads):
        assert torch.equal(p, before) and torch.equal(p.grad, grad)
    now = dict(model.named_buffers())
    assert now.keys() == buffers.keys()
    for name, before in buffers.items():
        assert now[name].dtype == before.dtype and torch.equal(now[name], before), name


def assert_hypergradients_close(got, expected):
    # fp64. The two sides sum the same terms in another order (~1e-16 of the terms); the
    # last bias's true hypergradient is 0 (f - max f cancels it), where both give only
    # rounding noise: compare on the scale of the whole. A wrong lr or c is off by O(1).
    scale = max(e.abs().max().item() for e in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12 * scale)


def assert_meta_sgd_step(before, after, expected_grad):
    # The SGD meta-step's result, to a few ulps of the weights (O(0.1)) plus META_LR times
    # the hypergradients' own tolerance; a wrong lr or c moves it by ~META_LR * 1e-4.
    scale = max(e.abs().max().item() for e in expected_grad)
    for a, q, e in zip(before.parameters(), after.parameters(), expected_grad):
        torch.testing.assert_close(q.detach(), (a - META_LR * e).detach(), rtol=1e-13,
                                   atol=META_LR * 1e-12 * scale)


def _trained_with_reference(model, opt, batches, mode, g_hat, c):
    """Two training steps on ``batches[:2]``, then the meta-loss on ``batches[2]`` written
    out by hand (lookahead lr 0.3, ``c``): the wrapper's (outer, inner) losses, a copy of
    the amplifier before any meta-step, the expected meta-loss and its hypergradient."""
    raw = train_steps(model, opt, batches[:2])
    model.train(mode == "train")
    outer, inner = losses(batches[1], batches[2])
    inner = inner if g_hat == "recompute" else None
    g_hats = reference_g_hat(model, batches[1]) if g_hat == "recompute" else raw
    amp = copy.deepcopy(opt.amplifier)
    expected = reference_meta_loss(model, amp, g_hats, 0.3, c, batches[2])
    return outer, inner, amp, expected, torch.autograd.grad(expected, list(amp.parameters()))


@pytest.mark.parametrize("path", ["exact", "pwl"])
@pytest.mark.parametrize("g_hat", ["recompute", "last"])
@pytest.mark.parametrize("c", [0.2, 1.0])
@pytest.mark.parametrize("net, mode", [("mlp", "train"), ("batchnorm", "train"), ("batchnorm", "eval")])
def test_meta_loss_and_meta_step_equal_a_written_out_reference(net, mode, c, g_hat, path):
    """meta_loss's value and hypergradient, and meta_step's update, equal the lookahead
    written out by hand (at c, the group's lr and g_hat), and neither call changes the model:
    parameters, .grad and every buffer (BatchNorm's running statistics and
    num_batches_tracked, which its train-mode forwards would move) stay bit-identical."""
    model = NETS[net]()
    opt = build(model, c=c, g_hat=g_hat, path=path)
    outer, inner, amp, expected, expected_grad = _trained_with_reference(
        model, opt, make_batches(3, dtype=F64), mode, g_hat, c)

    before = model_state(model)
    loss = opt.meta_loss(model, outer, inner)
    assert_model_unchanged(model, before)
    assert all(torch.equal(a, q) for a, q in zip(amp.parameters(), opt.amplifier.parameters()))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert_hypergradients_close(torch.autograd.grad(loss, list(opt.amplifier.parameters())), expected_grad)
    assert opt.meta_steps == 0

    stepped = opt.meta_step(model, outer, inner)
    assert_model_unchanged(model, before)
    assert stepped.item() == loss.item()
    assert_meta_sgd_step(amp, opt.amplifier, expected_grad)
    assert opt.meta_steps == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [F64, torch.float32])  # fp32: cuDNN's BatchNorm
def test_meta_step_on_cuda_equals_the_reference_and_keeps_the_buffers(dtype):
    """The reference test's BatchNorm cases on CUDA (c = 0.2). fp32 tolerance: both sides
    round each of a few hundred terms by 6e-8, so 1e-4 of the scale leaves a wide margin,
    while a lookahead without c is off by O(1)."""
    tol = 1e-12 if dtype == F64 else 1e-4
    for mode, g_hat in [("train", "recompute"), ("train", "last"), ("eval", "recompute"), ("eval", "last")]:
        model = bn_model().to("cuda", dtype)
        opt = build(model, c=0.2, g_hat=g_hat, dtype=dtype, device="cuda")
        batches = [(x.to("cuda", dtype), y.to("cuda", dtype)) for x, y in make_batches(3, dtype=F64)]
        outer, inner, amp, expected, expected_grad = _trained_with_reference(
            model, opt, batches, mode, g_hat, 0.2)
        before = model_state(model)
        loss = opt.meta_loss(model, outer, inner)
        got = torch.autograd.grad(loss, list(opt.amplifier.parameters()))
        opt.meta_step(model, outer, inner)
        assert_model_unchanged(model, before)
        assert loss.item() == pytest.approx(expected.item(), rel=tol)
        scale = max(e.abs().max().item() for e in expected_grad)
        for g, e in zip(got, expected_grad):
            torch.testing.assert_close(g, e, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("scheduled_on", ["wrapper", "inner optimizer"])
@pytest.mark.parametrize("lookahead_lr", ["base", "scheduled"])
@pytest.mark.parametrize("c", [0.2, 1.0])
def test_lookahead_lr_under_a_linear_warmup(c, lookahead_lr, scheduled_on):
    """A LinearLR warmup moves the group's lr to base * (0.1 + 0.9 k / 10) after k steps.
    The lookahead steps with the base lr (the scheduler's initial_lr) by default, with the
    scheduled one on request; either way the hypergradient is the reference's at that lr."""
    model = model64()
    opt = build(model, c=c, lookahead_lr=lookahead_lr)
    target = opt if scheduled_on == "wrapper" else opt.optimizer
    schedule = torch.optim.lr_scheduler.LinearLR(target, start_factor=0.1, total_iters=10)
    batches = make_batches(3, dtype=F64)
    for batch in batches[:2]:
        one_step(model, opt, batch)
        schedule.step()
    scheduled = 0.3 * (0.1 + 0.9 * 2 / 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(scheduled, rel=1e-12)
    lr = 0.3 if lookahead_lr == "base" else scheduled
    outer, inner = losses(batches[1], batches[2])
    amp = copy.deepcopy(opt.amplifier)
    expected = reference_meta_loss(model, amp, reference_g_hat(model, batches[1]), lr, c, batches[2])
    expected_grad = torch.autograd.grad(expected, list(amp.parameters()))
    loss = opt.meta_step(model, outer, inner)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert_meta_sgd_step(amp, opt.amplifier, expected_grad)


def test_meta_steps_lower_the_outer_loss_on_a_toy_problem():
    """theta in R^4 at 0, inner gradient a (fixed), lookahead -lr * d with d = G(a), a unit
    vector with the signs of a. The outer target punishes moving along the one large entry
    of a and rewards moving along the small ones; the outer loss
    ||lr d + t||^2 = lr^2 + ||t||^2 + 2 lr d.t is lowest when the amplifier weights small |g|
    up. Closed forms: constant f (plain normalisation, d = a/||a||) and the best unit d
    (equal weight on the small entries)."""

    class Vector(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.zeros(4, dtype=F64))

        def forward(self):
            return self.theta

    lr = 0.5
    model = Vector()
    a = torch.tensor([3.0, -0.2, 0.1, -0.15], dtype=F64)
    sign = a.sign()
    target = 0.5 * torch.cat([sign[:1], -sign[1:]])  # moving along sign(a) helps at small |a|
    torch.manual_seed(0)
    opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                             amplifier=make_amplifier((16,), dtype=F64), meta_lr=3e-2, meta_every=1)
    inner = lambda m: (m() * a).sum()  # noqa: E731 - gradient a, independent of theta
    outer = lambda fwd: (fwd() - target).pow(2).sum()  # noqa: E731
    model.theta.grad = a.clone()
    opt.step()
    with torch.no_grad():
        model.theta.zero_()  # look ahead from the same point every time

    def closed_form(d):
        return ((-lr * d - target) ** 2).sum().item()

    plain = closed_form(a / a.norm())
    best = closed_form(torch.cat([torch.zeros(1, dtype=F64), sign[1:] / 3**0.5]))
    first = opt.meta_loss(model, outer, inner).item()
    history = [opt.meta_step(model, outer, inner).item() for _ in range(100)]
    last = opt.meta_loss(model, outer, inner).item()
    assert history[0] == pytest.approx(first, rel=1e-12)
    assert best - 1e-12 <= last  # no unit step does better than the closed-form optimum
    assert last < best + 0.1 * (min(first, plain) - best), (first, plain, last, best)


# ---------------------------------------------------------------- state


OUTER = make_batches(1, seed=9, dtype=F64)[0]


def meta(model, opt, batch):
    outer, inner = losses(batch, OUTER)
    opt.maybe_meta_step(model, outer, None if opt.g_hat == "last" else inner)


@pytest.mark.parametrize("g_hat", ["recompute", "last"])
def test_state_dict_round_trip_between_a_step_and_its_meta_step(g_hat):
    batches = make_batches(9, dtype=F64)
    model_a, opt_a = setup(g_hat=g_hat, path="pwl", meta_every=2)
    for batch in batches:
        one_step(model_a, opt_a, batch)
        meta(model_a, opt_a, batch)

    model_b, opt_b = setup(g_hat=g_hat, path="pwl", meta_every=2)
    for i, batch in enumerate(batches[:6]):
        one_step(model_b, opt_b, batch)
        if i < 5:
            meta(model_b, opt_b, batch)
    assert opt_b.steps == 6 and opt_b.meta_steps == 2  # step 6 done, its meta-step due
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model_c, opt_c = setup(g_hat=g_hat, path="pwl", meta_every=2, seed=42)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    assert (opt_c.steps, opt_c.meta_steps) == (6, 2)
    meta(model_c, opt_c, batches[5])
    for batch in batches[6:]:
        one_step(model_c, opt_c, batch)
        meta(model_c, opt_c, batch)

    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    assert wide(sa)["neuralgrok_counters"] == wide(sc)["neuralgrok_counters"] == {
        "steps": 9, "meta_steps": 4, "last_meta_at": 8}
    for k, v in wide(sa)["neuralgrok_amplifier"].items():
        assert torch.equal(v, wide(sc)["neuralgrok_amplifier"][k])
    for i, entries in wide(sa)["neuralgrok_meta_optimizer"]["state"].items():
        for k, v in entries.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(wide(sc)["neuralgrok_meta_optimizer"]["state"][i][k]))
    if g_hat == "last":
        assert all("neuralgrok_last_grad" in s for s in sa["state"].values())


def test_bad_state_dict_is_rejected_and_changes_nothing():
    model, opt = setup(g_hat="last", path="pwl")
    batches = make_batches(2, dtype=F64)
    one_step(model, opt, batches[0])
    opt.meta_step(model, losses(batches[0], batches[1])[0])
    good = opt.state_dict()
    snapshot = copy.deepcopy(good)

    def corrupt(fn):
        sd = copy.deepcopy(good)
        fn(sd)
        return sd

    bad = [
        corrupt(lambda sd: anchor_entry(sd).update({"neuralgrok_amplifier/0:weight": torch.zeros(3, 3)})),
        corrupt(lambda sd: [anchor_entry(sd).pop(k) for k in list(anchor_entry(sd)) if k.startswith("neuralgrok_meta_optimizer/")]),
        corrupt(lambda sd: anchor_entry(sd).update({"neuralgrok_counters/steps": -1})),
        corrupt(lambda sd: sd["state"][0].update(neuralgrok_last_grad=torch.zeros(2))),
    ]
    other_model, other = setup(g_hat="last", path="pwl", seed=3)
    other_before = copy.deepcopy(other.state_dict())
    for sd in bad:
        with pytest.raises(ValueError, match="state_dict"):
            other.load_state_dict(sd)
        after = other.state_dict()
        assert wide(after)["neuralgrok_counters"] == wide(other_before)["neuralgrok_counters"]
        for k, v in wide(after)["neuralgrok_amplifier"].items():
            assert torch.equal(v, wide(other_before)["neuralgrok_amplifier"][k])
        assert per_param(after) == {} and wide(after)["neuralgrok_meta_optimizer"]["started"] == 0
    assert wide(opt.state_dict())["neuralgrok_counters"] == wide(snapshot)["neuralgrok_counters"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, match", [
    (dict(c=0.0), "c must be"), (dict(c=-1.0), "c must be"), (dict(c=float("nan")), "c must be"),
    (dict(c=True), "c must be"), (dict(meta_every=0), "meta_every"), (dict(meta_every=1.5), "meta_every"),
    (dict(meta_every=True), "meta_every"), (dict(g_hat="fresh"), "g_hat"), (dict(path="fast"), "path"),
    (dict(lookahead_lr="initial"), r"lookahead_lr must be one of \('base', 'scheduled'\), got 'initial'"),
    (dict(lookahead_lr=None), "lookahead_lr must be one of"),
    (dict(meta_lr=0.0), "meta_lr"), (dict(eps=-1.0), "eps"), (dict(chunk_size=0), "chunk_size"),
    (dict(hidden=(0,)), "hidden"), (dict(amplifier=nn.Linear(1, 2)), "amplifier"),
    (dict(amplifier=nn.Linear(2, 1)), "amplifier"), (dict(amplifier="mlp"), "amplifier"),
    (dict(amplifier=nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)), path="pwl"), "path='pwl'"),
    (dict(meta_optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1.0)), "meta_optimizer"),
])
def test_bad_constructor_arguments_name_the_argument(kw, match):
    model = make_model()
    inner = torch.optim.Adam(model.parameters())
    groups_before = copy.deepcopy(inner.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        AmplifiedOptimizer(inner, **kw)
    assert inner.state_dict() == groups_before  # the caller's optimizer is untouched


def test_plain_object_instead_of_optimizer_is_a_type_error():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        AmplifiedOptimizer([1, 2])


def snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        {k: v.clone() for k, v in opt.amplifier.state_dict().items()},
        copy.deepcopy(opt.meta_optimizer.state_dict()),
        dict(opt._counters),
    )


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k])
    assert str(a[2]) == str(b[2]) and a[3] == b[3]


def test_rejected_meta_steps_change_nothing():
    model, opt = setup(g_hat="recompute", path="pwl")
    batches = make_batches(2, dtype=F64)
    outer, inner = losses(*batches)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="before any step"):
        opt.meta_step(model, outer, inner)
    assert_same(before, snapshot(model, opt))

    one_step(model, opt, batches[0])
    opt.meta_step(model, outer, inner)  # Adam state exists now, so a change would show
    before = snapshot(model, opt)
    stranger = nn.Sequential(model[0], nn.Tanh())  # lacks model[2]'s parameters
    with pytest.raises(ValueError, match="model does not hold 2 of this optimizer's parameters"):
        opt.meta_step(stranger, outer, inner)
    with pytest.raises(ValueError, match="inner_loss is required"):
        opt.meta_step(model, outer)
    with pytest.raises(ValueError, match="outer_loss must return a scalar"):
        opt.meta_step(model, lambda fwd: fwd(batches[1][0]), inner)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        opt.meta_step(lambda x: x, outer, inner)
    with pytest.raises(TypeError, match="outer_loss must be callable"):
        opt.meta_step(model, 3.0, inner)
    assert_same(before, snapshot(model, opt))


def test_invalid_group_c_is_rejected_at_step_before_any_change():
    model, opt = setup(path="pwl")
    x, y = make_batches(1, dtype=F64)[0]
    opt.param_groups[0]["neuralgrok_c"] = -2.0
    mse(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="c must be"):
        opt.step()
    assert opt.steps == 0
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.equal(p, b) and torch.equal(p.grad, g)


@pytest.mark.parametrize("g_hat", ["recompute", "last"])
@pytest.mark.parametrize("meta_every", [1, 3])
def test_maybe_meta_step_runs_every_meta_every_steps_once(meta_every, g_hat):
    model, opt = setup(g_hat=g_hat, path="pwl", meta_every=meta_every)
    batches = make_batches(7, dtype=F64)
    ran = []
    for batch in batches:
        one_step(model, opt, batch)
        outer, inner = losses(batch, batches[0])
        inner = inner if g_hat == "recompute" else None
        ran.append(opt.maybe_meta_step(model, outer, inner) is not None)
        assert opt.maybe_meta_step(model, outer, inner) is None  # never twice for one step
    assert ran == [step % meta_every == 0 for step in range(1, 8)]
    assert opt.meta_steps == 7 // meta_every


def test_default_amplifier_is_the_papers_mlp_on_the_parameters_device_in_fp32():
    model = make_model(dtype=torch.bfloat16)
    opt = AmplifiedOptimizer(torch.optim.Adam(model.parameters()))
    layers = list(opt.amplifier)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers[::2]] == [(1, 128), (128, 128), (128, 1)]
    assert all(p.dtype == torch.float32 for p in opt.amplifier.parameters())
    meta = opt.meta_optimizer
    assert isinstance(meta, torch.optim.Adam)
    assert (meta.defaults["lr"], meta.defaults["betas"], meta.defaults["weight_decay"]) == (1e-4, (0.9, 0.98), 1e-3)
    assert "meta_every=4" in repr(opt) and "lookahead_lr='base'" in repr(opt)


@pytest.mark.parametrize("kw, error, message", [
    (dict(c="big"), TypeError, "c must be a finite float > 0, got str: 'big'"),
    (dict(c=0.0), ValueError, "c must be a finite float > 0, got 0.0"),
    (dict(eps=-1.0), ValueError, "eps must be a finite float >= 0, got -1.0"),
    (dict(meta_lr=float("inf")), ValueError, "meta_lr must be a finite float > 0, got inf"),
    (dict(max_grad_norm=0), ValueError, "max_grad_norm must be a finite float > 0, got 0"),
    (dict(meta_every=1.5), TypeError, "meta_every must be an int >= 1, got float: 1.5"),
    (dict(chunk_size="8"), TypeError, "chunk_size must be an int >= 1 or None, got str: '8'"),
    (dict(g_hat="fresh"), ValueError, r"g_hat must be one of \('recompute', 'last'\), got 'fresh'"),
    (dict(path="fast"), ValueError, r"path must be one of \('auto', 'pwl', 'exact'\), got 'fast'"),
    (dict(meta_optimizer="adam"), TypeError,
     r"meta_optimizer must be a torch.optim.Optimizer over the amplifier's parameters, or None, got str: 'adam'"),
])
def test_constructor_errors_say_argument_allowed_values_and_value(kw, error, message):
    model = make_model()
    inner = torch.optim.Adam(model.parameters())
    before = copy.deepcopy(inner.state_dict())
    with pytest.raises(error, match=message):
        AmplifiedOptimizer(inner, hidden=(4,), **kw)
    assert inner.state_dict() == before


def test_a_loss_that_is_not_a_tensor_is_a_type_error_and_changes_nothing():
    model, opt = setup(g_hat="recompute", path="pwl")
    batches = make_batches(2, dtype=F64)
    outer, inner = losses(*batches)
    one_step(model, opt, batches[0])
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match="outer_loss must return a scalar tensor, got float: 3.0"):
        opt.meta_step(model, lambda fwd: 3.0, inner)
    with pytest.raises(TypeError, match="inner_loss must return a scalar tensor, got NoneType: None"):
        opt.meta_step(model, outer, lambda m: None)
    with pytest.raises(ValueError, match="outer_loss must return a loss computed from the forward it is given"):
        opt.meta_step(model, lambda fwd: torch.ones((), dtype=F64), inner)
    assert_same(before, snapshot(model, opt))
