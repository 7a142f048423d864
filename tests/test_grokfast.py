"""Grokfast: closed forms of docs/methods.md, paths agreeing, identity, faults, bad input."""

from __future__ import annotations

import collections
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from contract import INNER_OPTIMIZERS, make_batches, make_model, state_tensors, train
from grokopt import Grokfast, NonFiniteGradientError, grokfast_

FLOATS = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


def run_filter(seq, state=None, **kw):
    """Feed a sequence of gradient tensors through grokfast_ and return the outputs."""
    state = [{}] if state is None else state
    outs = []
    for g in seq:
        g = [g.clone()]
        grokfast_(g, state, **kw)
        outs.append(g[0])
    return outs


# ---------------------------------------------------------------- independent reference


def plain_ema(seq, alpha, lamb):
    """docs/methods.md written out with Python floats per element, nothing shared with grokopt."""
    mu = None
    outs = []
    for g in seq:
        vals = g.double().flatten().tolist()
        mu = list(vals) if mu is None else mu
        mu = [alpha * m + (1 - alpha) * v for m, v in zip(mu, vals)]
        outs.append(torch.tensor([v + lamb * m for v, m in zip(vals, mu)], dtype=torch.float64).view(g.shape))
    return outs


def plain_ma(seq, window, lamb, reduction, warmup):
    hist = collections.deque(maxlen=window)
    outs = []
    for g in seq:
        hist.append(g.double())
        if warmup and len(hist) < window:
            outs.append(g.double())
            continue
        total = sum(hist)
        avg = total / len(hist) if reduction == "mean" else total
        outs.append(g.double() + lamb * avg)
    return outs


def _finite(flag):
    return None if flag is None else torch.tensor(flag)


# finite=True: the first call decides on the host, every later one on the device.
@pytest.mark.parametrize("finite", [None, True])
@pytest.mark.parametrize("foreach", [True, False])
def test_ema_matches_plain_formula(foreach, finite):
    gen = torch.Generator().manual_seed(0)
    seq = [torch.randn(4, 3, generator=gen) for _ in range(30)]
    ours = run_filter(seq, alpha=0.9, lamb=2.0, foreach=foreach, finite=_finite(finite))
    for a, b in zip(ours, plain_ema(seq, 0.9, 2.0)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("finite", [None, True])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("warmup", [True, False])
def test_ma_matches_plain_formula(foreach, reduction, warmup, finite):
    gen = torch.Generator().manual_seed(1)
    # 23 steps with window 5 wraps the ring buffer several times (running-sum resets too).
    seq = [torch.randn(7, generator=gen) for _ in range(23)]
    ours = run_filter(seq, filter="ma", window=5, lamb=3.0, reduction=reduction,
                      warmup=warmup, foreach=foreach, finite=_finite(finite))
    for a, b in zip(ours, plain_ma(seq, 5, 3.0, reduction, warmup)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("filt", ["ema", "ma"])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("after_step", [1, 4])
def test_after_step_leaves_the_first_gradients_and_then_starts_fresh(filt, foreach, after_step):
    gen = torch.Generator().manual_seed(2)
    seq = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(15)]
    ours = run_filter(seq, filter=filt, alpha=0.8, lamb=1.5, window=3, warmup=False,
                      after_step=after_step, foreach=foreach)
    rest = seq[after_step:]
    expected = seq[:after_step] + (plain_ema(rest, 0.8, 1.5) if filt == "ema"
                                   else plain_ma(rest, 3, 1.5, "mean", False))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- closed forms (docs/methods.md)


@settings(max_examples=40, deadline=None)
@given(g=st.lists(FLOATS, min_size=1, max_size=6), alpha=st.floats(0, 0.999),
       lamb=st.floats(0, 10))
def test_first_step_and_constant_input_give_one_plus_lamb(g, alpha, lamb):
    grad = torch.tensor(g, dtype=torch.float64)
    outs = run_filter([grad] * 5, alpha=alpha, lamb=lamb)
    for out in outs:  # lerp(g, g, w) == g exactly, so every step is (1+lamb) g
        torch.testing.assert_close(out, (1 + lamb) * grad, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(0, 0.99), lamb=st.floats(0, 10), n=st.integers(1, 60))
def test_alternating_input_follows_closed_form(alpha, lamb, n):
    # g_k = (-1)^(k-1) g. With mu_k = (-1)^(k-1) a_k: a_k = -alpha a_{k-1} + (1-alpha),
    # a_1 = 1, so a_k = a* + (-alpha)^(k-1) (1 - a*), a* = (1-alpha)/(1+alpha).
    g = torch.tensor([1.5, -0.25], dtype=torch.float64)
    seq = [g * (-1) ** k for k in range(n)]
    out = run_filter(seq, alpha=alpha, lamb=lamb)[-1]
    a_star = (1 - alpha) / (1 + alpha)
    a_n = a_star + (-alpha) ** (n - 1) * (1 - a_star)
    torch.testing.assert_close(out, (-1) ** (n - 1) * (1 + lamb * a_n) * g, rtol=1e-10, atol=1e-12)


def test_alternating_amplitude_at_defaults():
    g = torch.ones(3, dtype=torch.float64)
    out = run_filter([g * (-1) ** k for k in range(2000)])[-1]
    assert out.abs()[0].item() == pytest.approx(1 + 2.0 * 0.02 / 1.98, abs=1e-12)
    assert 1 + 2.0 * 0.02 / 1.98 == pytest.approx(1.020202, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(a=FLOATS, b=FLOATS, filt=st.sampled_from(["ema", "ma"]))
def test_filter_is_linear_in_the_gradient_sequence(a, b, filt):
    gen = torch.Generator().manual_seed(3)
    s1 = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(12)]
    s2 = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(12)]
    kw = dict(filter=filt, window=4, alpha=0.8, lamb=1.7)
    mixed = run_filter([a * x + b * y for x, y in zip(s1, s2)], **kw)
    o1, o2 = run_filter(s1, **kw), run_filter(s2, **kw)
    for m, x, y in zip(mixed, o1, o2):
        torch.testing.assert_close(m, a * x + b * y, rtol=1e-9, atol=1e-9)


def test_ma_window_rules_at_defaults():
    g = torch.tensor([0.5, -2.0])
    outs = run_filter([g] * 100, filter="ma", lamb=5.0, window=100)
    for out in outs[:99]:  # warmup: untouched until the window is full
        assert torch.equal(out, g)
    torch.testing.assert_close(outs[99], 6 * g)
    alternating = run_filter([g * (-1) ** k for k in range(300)], filter="ma", lamb=5.0)
    torch.testing.assert_close(alternating[-1], g * (-1) ** 299, rtol=0, atol=1e-5)


def test_window_change_keeps_most_recent_gradients():
    seq = [torch.full((2,), float(k)) for k in range(10)]
    state = [{}]
    for g in seq[:7]:
        grokfast_([g.clone()], state, filter="ma", window=4, lamb=1.0, warmup=False)
    out = [seq[7].clone()]
    grokfast_(out, state, filter="ma", window=3, lamb=1.0, warmup=False)
    # window 3 now holds gradients 5, 6, 7
    torch.testing.assert_close(out[0], seq[7] + (5 + 6 + 7) / 3)


# ---------------------------------------------------------------- the paths agree


@pytest.mark.parametrize("filt", ["ema", "ma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_foreach_and_reference_agree_step_by_step(filt, dtype):
    batches = make_batches(12, dtype=dtype)
    runs = []
    for foreach in (True, False):
        model = make_model(0, dtype)
        opt = Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-2), filter=filt,
                       window=3, lamb=2.0, alpha=0.9, foreach=foreach)
        trace = []
        for batch in batches:
            train(model, opt, [batch])
            trace.append(([p.detach().clone() for p in model.parameters()], state_tensors(opt)))
        runs.append(trace)
    # The EMA paths run the same kernels in the same order: bitwise equal. The MA foreach
    # path keeps a running sum (reset each window) where the reference sums the window
    # afresh, so they may differ in the last place: torch's default tolerance per dtype.
    def same(x, y):
        if filt == "ema":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y)

    for (pa, sa), (pb, sb) in zip(*runs):
        for x, y in zip(pa, pb):
            same(x, y)
        assert sa.keys() == sb.keys()
        for key in sa:
            same(sa[key], sb[key])


def test_low_precision_state_is_fp32_and_never_aliases_grad():
    model = make_model(0, torch.bfloat16)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, make_batches(2, dtype=torch.bfloat16))
    for p in model.parameters():
        assert opt.state[p]["grokfast_ema"].dtype == torch.float32
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, make_batches(1))
    for p in model.parameters():
        assert opt.state[p]["grokfast_ema"].data_ptr() != p.grad.data_ptr()


# ---------------------------------------------------------------- after_step, normalize_lr


def _partly_frozen_batches(n):
    """Batches, and for each whether the last layer gets a gradient (every third does not)."""
    return [(b, i % 3 != 1) for i, b in enumerate(make_batches(n, dtype=torch.float64))]


def _train_partly(model, opt, batches):
    for (x, y), full in batches:
        opt.zero_grad()
        out = model(x) if full else model[1](model[0](x))[:, :3]
        nn.functional.mse_loss(out, y).backward()
        opt.step()


@pytest.mark.parametrize("normalize_lr", [False, True])
@pytest.mark.parametrize("after_step", [0, 3])
def test_after_step_matches_grokfast_pytorch(after_step, normalize_lr):
    # grokfast-pytorch counts steps per parameter (those with a gradient) and starts the
    # EMA from the gradient of its first filtered step; its normalize_lr divides lr by
    # 1 + lamb. Some steps give the last layer no gradient, so the per-parameter counts
    # differ. It computes Adam's denominator as sqrt(v / bc2) where torch computes
    # sqrt(v) / sqrt(bc2): float64 last-place differences, nothing more.
    ref_pkg = pytest.importorskip("grokfast_pytorch")
    batches = _partly_frozen_batches(12)
    ref_model = make_model(0, torch.float64)
    ref = ref_pkg.GrokFastAdamW(ref_model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-30,
                                grokfast_alpha=0.9, grokfast_lamb=2.0,
                                grokfast_after_step=after_step, normalize_lr=normalize_lr)
    _train_partly(ref_model, ref, batches)
    model = make_model(0, torch.float64)
    opt = Grokfast(torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-30),
                   alpha=0.9, lamb=2.0, after_step=after_step, normalize_lr=normalize_lr)
    _train_partly(model, opt, batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    assert opt.param_groups[0]["lr"] == 1e-2  # the group keeps its own lr


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lamb", [0.5, 2.0])
@pytest.mark.parametrize("normalize_lr", [False, True])
def test_normalize_lr_matches_pytorch_optimizer_bit_for_bit(normalize_lr, lamb, weight_decay, foreach):
    # pytorch_optimizer's GrokFastAdamW divides lr by 1 + lamb (weight decay included) and
    # clamps Adam's denominator at eps where torch adds eps; with eps=1e-30 neither changes
    # a float64 value here, and the remaining operations are torch AdamW's, in its order.
    ref_pkg = pytest.importorskip("pytorch_optimizer")
    batches = make_batches(10, dtype=torch.float64)
    ref_model = make_model(0, torch.float64)
    ref = ref_pkg.GrokFastAdamW(ref_model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-30,
                                grokfast_alpha=0.9, grokfast_lamb=lamb, weight_decay=weight_decay,
                                normalize_lr=normalize_lr, foreach=foreach)
    train(ref_model, ref, batches)
    model = make_model(0, torch.float64)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-30,
                              weight_decay=weight_decay)
    opt = Grokfast(inner, alpha=0.9, lamb=lamb, normalize_lr=normalize_lr)
    train(model, opt, batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("as_tensor", ["none", "lr", "lamb", "both"])
def test_normalize_lr_makes_sgd_on_a_constant_gradient_step_like_bare_sgd(as_tensor):
    # A constant gradient g is filtered to (1 + lamb) g; with lr / (1 + lamb) the step is
    # lr * g again (lr 0.25, lamb 3: every number here is exact in binary).
    lr = torch.tensor(0.25) if as_tensor in ("lr", "both") else 0.25
    lamb = torch.tensor(3.0) if as_tensor in ("lamb", "both") else 3.0
    p = nn.Parameter(torch.zeros(3))
    opt = Grokfast(torch.optim.SGD([p], lr=lr), lamb=lamb, normalize_lr=True)
    for k in range(1, 4):
        p.grad = torch.tensor([1.0, -2.0, 0.5])
        opt.step()
        assert torch.equal(p.detach(), -k * 0.25 * torch.tensor([1.0, -2.0, 0.5]))
    assert opt.param_groups[0]["lr"] is lr  # restored: the same object a scheduler updates


def test_normalize_lr_follows_a_scheduler_and_a_per_group_lamb():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([{"params": [a]}, {"params": [b], "grokfast_lamb": 1.0}], lr=0.5)
    opt = Grokfast(inner, lamb=3.0, normalize_lr=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for k in range(3):
        before_a, before_b = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        opt.step()
        sched.step()
        lr = 0.5 * 0.5**k  # powers of two: exact
        assert torch.equal(before_a - a, torch.full((2,), lr))
        assert torch.equal(before_b - b, torch.full((2,), lr))


@pytest.mark.parametrize("filt", ["ema", "ma"])
def test_after_step_counts_live_in_the_state_and_survive_a_reload(filt):
    batches = make_batches(8)
    make = lambda m: Grokfast(torch.optim.Adam(m.parameters(), lr=1e-2), filter=filt, window=2,
                              warmup=False, after_step=5)
    model_a = make_model(0)
    opt_a = make(model_a)
    train(model_a, opt_a, batches)
    model_b = make_model(0)
    opt_b = make(model_b)
    train(model_b, opt_b, batches[:3])
    sd = opt_b.state_dict()
    assert {sd["state"][i]["grokfast_step"] for i in sd["state"]} == {3}
    model_c = make_model(4)
    model_c.load_state_dict(model_b.state_dict())
    opt_c = make(model_c)
    opt_c.load_state_dict(sd)
    train(model_c, opt_c, batches[3:])
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    # One set of keys before and after the start (what DCP's flattened layout needs).
    keys = {"grokfast_step", "grokfast_started"} | (
        {"grokfast_ema"} if filt == "ema"
        else {"grokfast_ma_buffer", "grokfast_ma_sum", "grokfast_ma_count"})
    for p in model_c.parameters():
        assert keys <= set(opt_c.state[p]) and opt_c.state[p]["grokfast_started"] == 1
        assert opt_c.state[p]["grokfast_step"] == 6  # counted up to the start, then kept
    assert all(keys <= set(entries) and entries["grokfast_started"] == 0
               for entries in sd["state"].values())


def test_state_dict_without_the_newer_group_keys_loads_with_the_defaults():
    # A checkpoint written before after_step / normalize_lr existed.
    batches = make_batches(6)
    model_a = make_model(0)
    opt_a = Grokfast(torch.optim.Adam(model_a.parameters(), lr=1e-2), alpha=0.9)
    train(model_a, opt_a, batches)
    model_b = make_model(0)
    opt_b = Grokfast(torch.optim.Adam(model_b.parameters(), lr=1e-2), alpha=0.9)
    train(model_b, opt_b, batches[:3])
    sd = opt_b.state_dict()
    for group in sd["param_groups"]:
        del group["grokfast_after_step"], group["grokfast_normalize_lr"]
    model_c = make_model(0)
    model_c.load_state_dict(model_b.state_dict())
    opt_c = Grokfast(torch.optim.Adam(model_c.parameters(), lr=1e-2), alpha=0.9)
    opt_c.load_state_dict(sd)
    assert "grokfast_after_step" in opt_c.state_dict()["param_groups"][0]
    train(model_c, opt_c, batches[3:])
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- identity at lamb = 0


@pytest.mark.parametrize("inner", list(INNER_OPTIMIZERS))
@pytest.mark.parametrize("filt", ["ema", "ma"])
def test_lamb_zero_is_exactly_the_bare_optimizer(inner, filt):
    batches = make_batches(10)
    bare = make_model(0)
    train(bare, INNER_OPTIMIZERS[inner](bare.parameters()), batches)
    wrapped = make_model(0)
    opt = Grokfast(INNER_OPTIMIZERS[inner](wrapped.parameters()), lamb=0.0, filter=filt,
                   window=2, warmup=False)
    train(wrapped, opt, batches)
    for p, q in zip(bare.parameters(), wrapped.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("restore_grad", [False, True])
def test_hyperparameters_live_in_param_groups_per_group(restore_grad):
    model = make_model(0)
    inner = torch.optim.SGD([{"params": model[0].parameters()},
                             {"params": model[2].parameters(), "grokfast_lamb": 0.0}], lr=0.1)
    opt = Grokfast(inner, lamb=2.0, restore_grad=restore_grad)
    assert [g["grokfast_lamb"] for g in opt.param_groups] == [2.0, 0.0]
    x, y = make_batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["grokfast_lamb"] = 1.0  # changed by the user before the step
    opt.step()
    # first step: ema = g, so the filtered gradient is (1 + lamb) g; SGD steps -lr times it
    expected = {0: 2 * raw[0], 2: raw[2]}
    params = list(model.parameters())
    for i, g in expected.items():
        torch.testing.assert_close(before[i] - params[i], 0.1 * g)
        torch.testing.assert_close(params[i].grad, raw[i] if restore_grad else g)


def test_add_param_group_mid_training_gets_defaults():
    model = make_model(0)
    extra = nn.Parameter(torch.ones(3))
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1), lamb=1.0)
    train(model, opt, make_batches(2))
    opt.add_param_group({"params": [extra]})
    assert opt.optimizer.param_groups[-1]["grokfast_lamb"] == 1.0
    extra.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(extra, torch.ones(3) - 0.1 * 2 * torch.ones(3))


# ---------------------------------------------------------------- faults


def _poison(model):
    model[0].weight.grad[0, 0] = float("nan")


def test_nonfinite_gradient_is_refused_before_any_state_changes():
    model = make_model(0)
    opt = Grokfast(torch.optim.Adam(model.parameters(), lr=1e-2))
    train(model, opt, make_batches(2))
    params, state = [p.detach().clone() for p in model.parameters()], state_tensors(opt)
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    _poison(model)
    with pytest.raises(NonFiniteGradientError, match="inf or NaN"):
        opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = state_tensors(opt)
    for key in state:
        assert torch.equal(after[key], state[key]), key


def test_skip_mode_keeps_state_on_device_with_fused_inner():
    model = make_model(0)
    opt = Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), nonfinite="skip")
    train(model, opt, make_batches(2))
    params, state = [p.detach().clone() for p in model.parameters()], state_tensors(opt)
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    _poison(model)
    opt.step()  # no error, no host decision: fused AdamW skips on found_inf
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = state_tensors(opt)
    for key in state:
        assert torch.equal(after[key], state[key]), key
    train(model, opt, make_batches(1, seed=10))  # and training carries on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_mode_skips_the_whole_step_for_a_plain_inner():
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nonfinite="skip")
    train(model, opt, make_batches(2))
    params, state = [p.detach().clone() for p in model.parameters()], state_tensors(opt)
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    _poison(model)
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = state_tensors(opt)
    assert after.keys() == state.keys()
    for key in state:
        assert torch.equal(after[key], state[key]), key


# ---------------------------------------------------------------- skip mode: values

# Inner optimizers for the skip tests: the contract's, plus the fused ones that take
# found_inf (the device-side skip) with state of their own.
SKIP_INNERS = {
    **INNER_OPTIMIZERS,
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adagrad-fused": lambda p: torch.optim.Adagrad(p, lr=0.05, fused=True),
}


def _sgd_lr1_updates(grads, nonfinite, foreach):
    """The updates SGD(lr=1) makes to a scalar parameter whose gradients are ``grads``."""
    p = nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = Grokfast(torch.optim.SGD([p], lr=1.0), alpha=0.5, lamb=2.0, foreach=foreach,
                   nonfinite=nonfinite)
    updates = []
    for g in grads:
        before = p.item()
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        updates.append(before - p.item())
    return updates


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_sgd_lr1_closed_form_in_both_modes(nonfinite, foreach):
    # mu = 1, then 0.5 * 1 + 0.5 * 3 = 2, then 0.5 * 2 + 0.5 * 0 = 1; update g + 2 mu.
    assert _sgd_lr1_updates([1.0, 3.0, 0.0], nonfinite, foreach) == [3.0, 7.0, 2.0]


@pytest.mark.parametrize("foreach", [True, False])
def test_skip_mode_nan_first_gradient_then_the_same_closed_form(foreach):
    nan = float("nan")
    assert _sgd_lr1_updates([nan, 1.0, nan, 3.0, 0.0], "skip", foreach) == [0.0, 3.0, 0.0, 7.0, 2.0]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("after_step", [0, 1])
@pytest.mark.parametrize("bad_at", [0, 1, 3])
def test_functional_false_flag_is_as_if_the_call_never_happened(foreach, after_step, bad_at):
    # With after_step=1 the first gradient (5) passes unchanged. A False flag before the
    # EMA exists (or while it waits) is read on the host; after that, on the device.
    head = [5.0] * after_step
    clean = head + [1.0, 3.0, 0.0, -2.0]
    seq = clean[:bad_at] + [float("nan")] + clean[bad_at:]
    state, outs = [{}], []
    for k, g in enumerate(seq):
        t = [torch.tensor([g], dtype=torch.float64)]
        grokfast_(t, state, alpha=0.5, lamb=2.0, after_step=after_step, foreach=foreach,
                  finite=torch.tensor(k != bad_at))
        if k != bad_at:
            outs.append(t[0].item())
    # mu: 1, 2, 1, 0.5 * 1 + 0.5 * (-2) = -0.5; out g + 2 mu
    assert outs == head + [3.0, 7.0, 2.0, -3.0]
    keys = {"ema"} | ({"step", "started"} if after_step else set())
    assert set(state[0]) == keys and state[0]["ema"].item() == -0.5


def _run(inner, batches, nonfinite, poison=(), filt="ema", **kw):
    model = make_model(0)
    opt = Grokfast(SKIP_INNERS[inner](model.parameters()), alpha=0.9, lamb=2.0, filter=filt,
                   window=3, nonfinite=nonfinite, **kw)
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if i in poison:
            model[2].weight.grad[1, 0] = float("nan")
            model[0].bias.grad[3] = float("inf")
        opt.step()
    return [p.detach().clone() for p in model.parameters()], state_tensors(opt)


def _assert_same_run(a, b):
    for p, q in zip(a[0], b[0]):
        assert torch.equal(p, q)
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


@pytest.mark.parametrize("normalize_lr", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("filt", ["ema", "ma"])
@pytest.mark.parametrize("inner", list(SKIP_INNERS))
def test_skip_equals_error_bit_for_bit_on_finite_gradients(inner, filt, foreach, normalize_lr):
    batches = make_batches(6)
    kw = dict(filt=filt, foreach=foreach, normalize_lr=normalize_lr)
    _assert_same_run(_run(inner, batches, "skip", **kw), _run(inner, batches, "error", **kw))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("after_step", [0, 2])
@pytest.mark.parametrize("bad_at", [0, 1, 4])
@pytest.mark.parametrize("inner", list(SKIP_INNERS))
def test_skipped_step_is_as_if_step_was_never_called(inner, bad_at, after_step, foreach):
    # bad_at 0: before any state exists; 1: while the filter waits for after_step=2;
    # 4: filter and inner state exist (a fused inner then skips on the device).
    batches = make_batches(7)
    kept = batches[:bad_at] + batches[bad_at + 1:]
    _assert_same_run(
        _run(inner, batches, "skip", poison={bad_at}, after_step=after_step, foreach=foreach),
        _run(inner, kept, "error", after_step=after_step, foreach=foreach),
    )


@pytest.mark.parametrize("inner", ["sgd", "adam", "adamw-fused"])
def test_skipped_step_with_the_ma_filter_is_as_if_never_called(inner):
    batches = make_batches(7)
    for bad_at in (0, 4):
        kept = batches[:bad_at] + batches[bad_at + 1:]
        _assert_same_run(_run(inner, batches, "skip", poison={bad_at}, filt="ma"),
                         _run(inner, kept, "error", filt="ma"))


def test_skip_creates_no_inner_state_on_the_device():
    # Momentum switched on mid-run: the fused SGD would create its buffer on this step, and
    # found_inf cannot undo that, so the step is decided on the host.
    def run(batches, nonfinite, poison=()):
        model = make_model(0)
        opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.05, fused=True), nonfinite=nonfinite)
        for i, (x, y) in enumerate(batches):
            if i == 2:
                opt.param_groups[0]["momentum"] = 0.9
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if i in poison:
                _poison(model)
            opt.step()
        return [p.detach().clone() for p in model.parameters()], state_tensors(opt)

    batches = make_batches(5)
    _assert_same_run(run(batches, "skip", poison={2}), run(batches[:2] + batches[3:], "error"))


@pytest.mark.parametrize("inner, host_decisions", [
    ("adamw-fused", [True, False, False, False]),   # found_inf once the state exists
    ("sgd-fused", [True, False, False, False]),
    ("adam", [True, True, True, True]),             # no found_inf: decided on the host
])
def test_which_skip_path_each_inner_optimizer_takes(inner, host_decisions, monkeypatch):
    import grokopt.grokfast as gf

    calls = []
    real, real_screen = gf.screen_step, gf._maybe_nonfinite
    monkeypatch.setattr(gf, "screen_step", lambda *a: calls.append(True) or real(*a))
    # The steady path (every EMA running) screens with a flag it reads on the host.
    monkeypatch.setattr(gf, "_maybe_nonfinite", lambda *a: calls.append(True) or real_screen(*a))
    model = make_model(0)
    opt = Grokfast(SKIP_INNERS[inner](model.parameters()), nonfinite="skip")
    seen = []
    for batch in make_batches(4):
        n = len(calls)
        train(model, opt, [batch])
        seen.append(len(calls) > n)
    assert seen == host_decisions


def test_nonfinite_error_names_the_offending_parameter():
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD([{"params": model[0].parameters()},
                                    {"params": model[2].parameters()}], lr=0.1))
    x, y = make_batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad = None  # index 2 counts parameters without a gradient too
    model[2].weight.grad[1, 2] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"parameter 2 \(shape \(3, 8\)\)") as info:
        opt.step()
    assert (info.value.index, info.value.shape) == (2, (3, 8))
    import grokopt.grokfast

    assert grokopt.grokfast.NonFiniteGradientError is NonFiniteGradientError  # old import path
    model[2].bias.grad[0] = float("nan")  # the first offender is named
    with pytest.raises(NonFiniteGradientError, match="parameter 2 "):
        opt.step()
    model[2].weight.grad = None
    with pytest.raises(NonFiniteGradientError, match=r"parameter 3 \(shape \(3,\)\)"):
        opt.step()


def test_skip_mode_ma_skips_the_whole_step():
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1), filter="ma", window=3,
                   nonfinite="skip")
    train(model, opt, make_batches(2))
    params, state = [p.detach().clone() for p in model.parameters()], state_tensors(opt)
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    _poison(model)
    opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = state_tensors(opt)
    for key in state:
        assert torch.equal(after[key], state[key]), key


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(5, 2, sparse=True)
    opt = Grokfast(torch.optim.SGD(emb.parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert "grokfast_ema" not in opt.state[emb.weight]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.0), r"alpha must be a finite float >= 0 and < 1 \(or a 0-d float tensor\), got 1.0"),
        (dict(alpha=-0.1), "alpha must be a finite float >= 0 and < 1.*, got -0.1"),
        (dict(alpha=float("nan")), "alpha must be a finite float.*, got nan"),
        (dict(lamb=-1.0), r"lamb must be a finite float >= 0 \(or a 0-d float tensor\), got -1.0"),
        (dict(window=0), "window must be an int >= 1, got 0"),
        (dict(filter="fir"), r"filter must be one of \('ema', 'ma'\), got 'fir'"),
        (dict(reduction="max"), "reduction must be one of"),
        (dict(nonfinite="ignore"), "nonfinite must be one of"),
        (dict(after_step=-1), "after_step must be an int >= 0, got -1"),
    ],
)
def test_bad_arguments_name_the_argument_and_change_nothing(kwargs, match):
    model = make_model(0)
    inner = torch.optim.Adam(model.parameters())
    before = [dict(g) for g in inner.param_groups]
    with pytest.raises(ValueError, match=match):
        Grokfast(inner, **kwargs)
    assert [dict(g) for g in inner.param_groups] == before


@pytest.mark.parametrize("kwargs", [dict(alpha="0.9"), dict(lamb=None), dict(warmup=1),
                                    dict(after_step=2.0), dict(after_step=True), dict(window=2.5),
                                    dict(normalize_lr="yes"), dict(normalize_lr=1)])
def test_wrong_types_raise_type_error(kwargs):
    inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
    before = [dict(g) for g in inner.param_groups]
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"{name} must be"):
        Grokfast(inner, **kwargs)
    assert [dict(g) for g in inner.param_groups] == before


class _NoLr(torch.optim.Optimizer):
    """An optimizer whose groups have no ``lr``."""

    def __init__(self, params):
        super().__init__(params, {"scale": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["scale"] * p.grad)


def test_normalize_lr_needs_an_lr_in_each_group():
    model = make_model(0)
    inner = _NoLr(model.parameters())
    before = [dict(g) for g in inner.param_groups]
    with pytest.raises(ValueError, match="normalize_lr=True needs an 'lr'.*param group 0"):
        Grokfast(inner, normalize_lr=True)
    assert [dict(g) for g in inner.param_groups] == before
    opt = Grokfast(inner)  # off: fine
    train(model, opt, make_batches(1))
    state = state_tensors(opt)
    params = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["grokfast_normalize_lr"] = True  # switched on later: refused at step
    x, y = make_batches(1, seed=3)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match="normalize_lr=True needs an 'lr'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(v, state_tensors(opt)[k]) for k, v in state.items())


def test_invalid_after_step_count_in_a_state_dict_is_refused():
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1), after_step=3)
    train(model, opt, make_batches(1))
    sd = opt.state_dict()
    sd["state"][0]["grokfast_step"] = -2
    before = state_tensors(opt)
    with pytest.raises(ValueError, match="grokfast step .* must be an int >= 0, got -2"):
        opt.load_state_dict(sd)
    assert state_tensors(opt).keys() == before.keys()


def test_not_an_optimizer_raises_type_error():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        Grokfast(list(make_model().parameters()))


def test_nesting_the_same_wrapper_twice_is_refused():
    opt = Grokfast(torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already wrapped"):
        Grokfast(opt)


def test_invalid_group_value_set_later_is_refused_at_step_without_changes():
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, make_batches(1))
    state = state_tensors(opt)
    opt.param_groups[0]["grokfast_alpha"] = 1.5
    x, y = make_batches(1, seed=4)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match="alpha must be a finite float >= 0 and < 1"):
        opt.step()
    after = state_tensors(opt)
    for key in state:
        assert torch.equal(after[key], state[key])


def test_mismatched_state_dict_is_rejected_before_anything_changes():
    model = make_model(0)
    opt = Grokfast(torch.optim.Adam(model.parameters()))
    train(model, opt, make_batches(2))
    good = opt.state_dict()
    before = state_tensors(opt)

    bad_shape = opt.state_dict()
    bad_shape["state"][0]["grokfast_ema"] = torch.zeros(2, 2)
    wrong_count = opt.state_dict()
    wrong_count["param_groups"][0]["params"] = wrong_count["param_groups"][0]["params"][:-1]
    missing = {k: v for k, v in good.items() if k != "param_groups"}
    for sd, match in [(bad_shape, "shape"), (wrong_count, "parameters"),
                      (missing, "missing the key 'param_groups'")]:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        after = state_tensors(opt)
        for key in before:
            assert torch.equal(after[key], before[key])


def test_hyperparameters_may_be_0d_tensors():
    g_tensor, g_float = [torch.arange(4.0)], [torch.arange(4.0)]
    s_tensor, s_float = [{}], [{}]
    for _ in range(3):
        grokfast_(g_tensor, s_tensor, alpha=torch.tensor(0.9), lamb=torch.tensor(1.5))
        grokfast_(g_float, s_float, alpha=0.9, lamb=1.5)
    torch.testing.assert_close(g_tensor[0], g_float[0])


def test_nan_amplitude_reference_value():
    # Guard the closed form used above against a silent change in the documented numbers.
    assert math.isclose(1 + 2.0 * (1 - 0.98) / (1 + 0.98), 1.020202, abs_tol=1e-6)


@pytest.mark.parametrize(
    "grad, finite",
    [
        (torch.full((8,), 1e30), True),                      # 2-norm overflows fp32: confirmed finite
        (torch.full((4096,), 60000.0, dtype=torch.float16), True),  # norm beyond fp16's range
        (torch.tensor([1e30, float("nan")]), False),
        (torch.tensor([1.0, -float("inf")]), False),
        (torch.tensor([], dtype=torch.float32), True),
    ],
)
def test_error_mode_decides_finiteness_exactly(grad, finite):
    param = nn.Parameter(torch.zeros_like(grad))
    other = nn.Parameter(torch.zeros(3))
    param.grad, other.grad = grad.clone(), torch.ones(3)
    opt = Grokfast(torch.optim.SGD([param, other], lr=0.0))
    if finite:
        opt.step()
        assert "grokfast_ema" in opt.state[other]
    else:
        with pytest.raises(NonFiniteGradientError):
            opt.step()
        assert not opt.state[other]


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=torch.tensor(float("nan"))), "alpha must be a finite float.*, got nan"),
    (dict(alpha=torch.tensor(1.0)), "alpha must be a finite float >= 0 and < 1.*, got 1.0"),
    (dict(lamb=torch.tensor(-1.0)), "lamb must be a finite float >= 0.*, got -1.0"),
])
def test_tensor_hyperparameters_are_range_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Grokfast(torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)


# ---------------------------------------------------------------- p.grad after step() (issue 12)


def _bits(t):
    """The raw bits of a float tensor: tells -0.0 from +0.0, which torch.equal does not."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("restore_grad", [True, False])
@pytest.mark.parametrize("alpha, lamb", [(0.9, 2.0), (0.5, 0.25)])
@pytest.mark.parametrize("foreach", [True, False])
def test_grad_after_step_against_the_ema_closed_form(restore_grad, alpha, lamb, foreach):
    """mu_1 = g_1, mu_k = alpha mu_(k-1) + (1 - alpha) g_k; the step is on g_k + lamb mu_k.
    In place that is what p.grad holds after step(); restoring, it holds g_k itself."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = Grokfast(torch.optim.SGD([p], lr=1.0), alpha=alpha, lamb=lamb, foreach=foreach,
                   restore_grad=restore_grad)
    mu, position = None, torch.zeros(4, 3, dtype=torch.float64)
    for g in grads:
        mu = g.clone() if mu is None else alpha * mu + (1 - alpha) * g
        filtered = g + lamb * mu
        position -= filtered
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), position, rtol=1e-12, atol=1e-12)
        if restore_grad:
            assert torch.equal(p.grad, g)
        else:
            torch.testing.assert_close(p.grad, filtered, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("restore_grad", [True, False])
@pytest.mark.parametrize("filt", ["ema", "ma"])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lamb_zero_leaves_the_gradient_bit_for_bit(restore_grad, filt, foreach, dtype):
    # -0.0 entries: g + 0 * mu would turn them into +0.0 where mu >= 0
    p = nn.Parameter(torch.zeros(6, dtype=dtype))
    opt = Grokfast(torch.optim.SGD([p], lr=0.1), filter=filt, window=2, warmup=False,
                   lamb=0.0, foreach=foreach, restore_grad=restore_grad)
    for values in ([-0.0, 1.5, -2.0, 0.0, 3.0, -0.0], [1.0, -0.0, -0.0, 2.0, -1.0, 0.5]):
        g = torch.tensor(values, dtype=dtype)
        p.grad = g.clone()
        opt.step()
        assert torch.equal(_bits(p.grad), _bits(g))
        assert opt.state[p]  # the filter still runs: its state is kept up to date


def test_device_side_skip_steps_on_a_huge_but_finite_gradient():
    """The device-side screen (fused inner optimizer, nonfinite="skip") is exact: a finite
    gradient of 1e30, whose 2-norm overflows float32, is stepped on, exactly as the host
    path (nonfinite="error") steps on it."""
    results = []
    for mode in ("skip", "error"):
        p = torch.nn.Parameter(torch.ones(8))
        opt = Grokfast(torch.optim.AdamW([p], lr=0.1, fused=True), nonfinite=mode)
        p.grad = torch.ones(8)
        opt.step()  # state exists: the skip mode now decides on the device
        if mode == "skip":
            assert opt._skips_on_device([(opt.param_groups[0], [(p, p.grad)])])
        before = p.detach().clone()
        p.grad = torch.full((8,), 1e30)
        opt.step()
        assert not torch.equal(p.detach(), before), mode  # stepped, not skipped
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])


def _record_steady_steps(monkeypatch):
    """A list that gets, at each step, whether it took the steady path."""
    taken = []
    real = Grokfast._steady_step
    monkeypatch.setattr(Grokfast, "_steady_step", lambda self: taken.append(real(self)) or taken[-1])
    return taken


def test_steady_path_follows_every_change_between_steps(monkeypatch):
    # The steady path (cached per-parameter lists) against a plain EMA written here, with
    # SGD at lr 1 so that each parameter's update is minus its filtered gradient. Between
    # steps the parameters with gradients change, an EMA is deleted through `state`, a
    # group dict is replaced with one of another alpha, and an EMA is replaced with one
    # of another dtype: each must end the plan (the general path then plans again).
    taken = _record_steady_steps(monkeypatch)
    model = make_model(0, torch.float64)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=1.0), lamb=1.5)
    w0, b0, b2 = model[0].weight, model[0].bias, model[2].bias
    alpha, mus = 0.98, {}

    def edit(step):
        nonlocal alpha
        if step == 2:
            b0.grad = None
        elif step == 3:  # as many gradients as last step, not the same parameters
            b2.grad = None
        elif step == 5:
            del opt.state[w0]["grokfast_ema"]
            mus.pop(w0)
        elif step == 7:
            opt.param_groups[0] = {**opt.param_groups[0], "grokfast_alpha": 0.5}
            alpha = 0.5
        elif step == 9:  # float32 gradients now, float64 EMAs: the general path casts
            model.float()
            for p in model.parameters():
                p.grad = p.grad.float()

    for step, (x, y) in enumerate(make_batches(11, dtype=torch.float64)):
        opt.zero_grad()
        dtype = model[0].weight.dtype
        nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
        edit(step)
        before = {p: p.detach().clone() for p in model.parameters()}
        raw = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
        opt.step()
        for p in model.parameters():
            if p not in raw:
                assert torch.equal(p, before[p])
                continue
            g = raw[p]
            mu = mus[p] = g.clone() if p not in mus else (
                alpha * mus[p] + (1 - alpha) * g.to(mus[p].dtype))
            expected = before[p] - (g.to(mu.dtype) + 1.5 * mu).to(g.dtype)
            tol = 1e-6 if p.dtype == torch.float32 else 1e-12
            torch.testing.assert_close(p.detach(), expected, rtol=tol, atol=tol)
            assert torch.equal(p.grad, g)  # restore_grad: the user's gradient is back
    # steady from the 2nd step; each change sends one step through the general path (the
    # gradient set changes at steps 2, 3 and 4), and float32 gradients with float64 EMAs
    # (cast at every step) stay there
    assert taken == [False, True, False, False, False, False, True, False, True, False, False]


@pytest.mark.parametrize("keep_bytes", [0, 1000, 10**12])  # all, the big ones, none kept
@pytest.mark.parametrize("tensor_lamb", [False, True])
def test_steady_path_kept_scratch_equals_the_general_path_bit_for_bit(
        keep_bytes, tensor_lamb, monkeypatch):
    # On CPU the steady step writes large gradients' filtered copies into scratch kept from
    # step to step (fresh CPU memory costs page faults); the values must be those of the
    # general path's new tensors, bit for bit, and the user's gradients must come back.
    import grokopt.grokfast as gf

    monkeypatch.setattr(gf, "KEEP_SCRATCH_BYTES", keep_bytes)

    def run(steady):
        if not steady:
            monkeypatch.setattr(Grokfast, "_steady_step", lambda self: False)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 3))  # 600 floats: big
        lamb = torch.tensor(1.5) if tensor_lamb else 1.5
        opt = Grokfast(torch.optim.Adam(model.parameters(), lr=1e-2), alpha=0.9, lamb=lamb)
        stepped = []
        for x, y in make_batches(6, seed=3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[:, :5].repeat(1, 4)), y).backward()
            raw = [p.grad for p in model.parameters()]
            values = [g.clone() for g in raw]
            seen = {}
            # the tensors themselves (kept alive: a freed tensor's id can come back)
            hook = opt.optimizer.register_step_pre_hook(
                lambda o, a, k: seen.update(ids=[p.grad for p in model.parameters()]))
            opt.step()
            hook.remove()
            stepped.append(seen["ids"])
            for p, g, v in zip(model.parameters(), raw, values):
                assert p.grad is g and torch.equal(g, v)  # the user's gradients, untouched
        monkeypatch.undo()
        monkeypatch.setattr(gf, "KEEP_SCRATCH_BYTES", keep_bytes)
        return [p.detach().clone() for p in model.parameters()], state_tensors(opt), stepped

    a, b = run(True), run(False)
    _assert_same_run(a[:2], b[:2])
    # What the inner optimizer stepped on from the 3rd step on (the 2nd plans): the same
    # tensors at every step; a scratch of its own where the kept rule applies, else a view
    # of the one flat output buffer.
    stepped = a[2]
    sizes = [p.numel() * 4 for p in nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 3)).parameters()]
    assert all(g is h for g, h in zip(stepped[3], stepped[4]))
    assert [g._base is None for g in stepped[3]] == [s >= keep_bytes for s in sizes]
    assert len({g.untyped_storage().data_ptr() for g in stepped[3] if g._base is not None}) <= 1


def _steady_and_general(run, monkeypatch):
    """``run()`` once as it is and once with the steady path off (the general path)."""
    steady = run()
    monkeypatch.setattr(Grokfast, "_steady_step", lambda self: False)
    general = run()
    monkeypatch.undo()
    return steady, general


def test_steady_path_follows_a_parameter_moved_to_another_group(monkeypatch):
    # b moves from the lamb=2 group to the front of the lamb=0 one: the gradients still come
    # in the order a, b, c, and b must be filtered with its new group's options.
    def run():
        torch.manual_seed(0)
        a, b, c = (nn.Parameter(torch.zeros(4)) for _ in range(3))
        opt = Grokfast(torch.optim.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1), lamb=2.0)
        opt.param_groups[1]["grokfast_lamb"] = 0.0
        for k in range(5):
            for p in (a, b, c):
                p.grad = torch.randn_like(p)
            opt.step()
            if k == 1:
                opt.param_groups[0]["params"].pop()
                opt.param_groups[1]["params"].insert(0, b)
        return [a.detach().clone(), b.detach().clone(), c.detach().clone()]

    steady, general = _steady_and_general(run, monkeypatch)
    for x, y in zip(steady, general):
        assert torch.equal(x, y)


def test_steady_path_kept_scratch_follows_the_gradient_layout(monkeypatch):
    # After a switch to channels_last the inner optimizer must see gradients laid out as
    # the user's (as the general path's new tensors are), not the kept scratch's old layout.
    def run():
        torch.manual_seed(0)
        conv = nn.Conv2d(16, 32, 3)  # weight 18 KiB: kept (threshold lowered below)
        inner = torch.optim.Adam(conv.parameters(), lr=1e-2)
        seen = []
        inner.register_step_pre_hook(lambda o, a, k: seen.append(conv.weight.grad.stride()))
        opt = Grokfast(inner)
        x = torch.randn(2, 16, 6, 6)
        for k in range(5):
            if k == 3:
                conv.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad()
            conv(x).square().mean().backward()
            opt.step()
        return seen, conv.weight.detach().clone()

    import grokopt.grokfast as gf

    monkeypatch.setattr(gf, "KEEP_SCRATCH_BYTES", 1024)
    steady = run()
    monkeypatch.setattr(Grokfast, "_steady_step", lambda self: False)
    general = run()
    assert steady[0] == general[0]
    assert steady[0][3] != steady[0][2]  # the layout did change
    assert torch.equal(steady[1], general[1])


@pytest.mark.parametrize("lamb", [0.0, 2.0])
def test_a_nested_wrapper_never_writes_into_the_users_gradient(lamb):
    # With lamb=0 the filter leaves p.grad as it is; the nested OrthoGrad writes into what
    # it is given, which must be a copy, not the user's gradient.
    from grokopt import OrthoGrad

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 4))
    opt = Grokfast(OrthoGrad(torch.optim.SGD([p], lr=0.1)), lamb=lamb)
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad = g
        kept = g.clone()
        opt.step()
        assert p.grad is g and torch.equal(g, kept)


# ------------------------------------------------ the steady step's flat buffers (CPU)


def _flat_model():
    """Small tensors in two groups of other alpha/lamb, one of them a transposed view (not
    contiguous: outside the flat buffer) and one large enough to keep its own scratch."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(7, dtype=torch.float64))
    c = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))  # gets a transposed gradient
    d = nn.Parameter(torch.randn(40, 40, dtype=torch.float64))  # 12.8 KB: kept (see below)
    e = nn.Parameter(torch.randn(3, dtype=torch.float64))
    return [a, b, c, d, e]


def _flat_grads(params, gen):
    for p in params:
        if p.shape == (4, 6):
            p.grad = torch.randn(6, 4, generator=gen, dtype=p.dtype).t()
        else:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("hyper", ["floats", "tensors", "lamb0"])
def test_steady_flat_buffers_follow_the_plain_ema(hyper, monkeypatch):
    # The plain EMA written here, per group options, with SGD at lr 1 (each parameter's
    # update is minus its filtered gradient). From the 2nd step the small contiguous
    # gradients are filtered in the flat buffers, the transposed one in fresh tensors and
    # the large one in kept scratch; all must follow the formula, and the user's gradients
    # must come back untouched.
    import grokopt.grokfast as gf

    monkeypatch.setattr(gf, "KEEP_SCRATCH_BYTES", 10_000)
    params = _flat_model()
    a, b, c, d, e = params
    opts = {"floats": [(0.9, 2.0), (0.5, 0.7)],
            "tensors": [(torch.tensor(0.9, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)),
                        (0.5, torch.tensor(0.7, dtype=torch.float64))],
            "lamb0": [(0.9, 2.0), (0.5, 0.0)]}[hyper]
    groups = [{"params": [a, c, d], "grokfast_alpha": opts[0][0], "grokfast_lamb": opts[0][1]},
              {"params": [b, e], "grokfast_alpha": opts[1][0], "grokfast_lamb": opts[1][1]}]
    opt = Grokfast(torch.optim.SGD(groups, lr=1.0))
    which = {a: 0, c: 0, d: 0, b: 1, e: 1}
    mus = {}
    gen = torch.Generator().manual_seed(1)
    taken = _record_steady_steps(monkeypatch)
    for _ in range(6):
        _flat_grads(params, gen)
        raw = {p: p.grad for p in params}
        values = {p: p.grad.clone() for p in params}
        before = {p: p.detach().clone() for p in params}
        opt.step()
        for p in params:
            alpha, lamb = (float(v) for v in opts[which[p]])
            g = values[p]
            mu = mus[p] = g.clone() if p not in mus else alpha * mus[p] + (1 - alpha) * g
            torch.testing.assert_close(opt.state[p]["grokfast_ema"], mu, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(p.detach(), before[p] - (g + lamb * mu),
                                       rtol=1e-12, atol=1e-12)
            assert p.grad is raw[p] and torch.equal(p.grad, values[p])
    assert taken == [False] + [True] * 5
    # the small contiguous ones' EMAs are views of one buffer; the others are not
    storages = {p: opt.state[p]["grokfast_ema"].untyped_storage().data_ptr() for p in params}
    assert storages[a] == storages[b] == storages[e]
    assert len({storages[a], storages[c], storages[d]}) == 3


def test_steady_flat_buffers_screen_before_anything_changes(monkeypatch):
    # An inf in a gradient of the flat buffer at a steady step: the error names that
    # parameter, and no state, parameter or gradient changed; the next finite step goes on
    # from the same EMAs as a run that never saw the bad step.
    def run(poison):
        params = _flat_model()
        opt = Grokfast(torch.optim.SGD([{"params": params[:3]}, {"params": params[3:]}],
                                       lr=0.1))
        gen = torch.Generator().manual_seed(2)
        for k in range(5):
            _flat_grads(params, gen)
            if k == 3 and poison:
                params[4].grad[1] = float("inf")
                before = ([p.detach().clone() for p in params], state_tensors(opt),
                          [p.grad.clone() for p in params])
                with pytest.raises(NonFiniteGradientError, match="parameter 4 "):
                    opt.step()
                after = ([p.detach().clone() for p in params], state_tensors(opt),
                         [p.grad.clone() for p in params])
                _assert_same_run(before[:2], after[:2])
                for x, y in zip(before[2], after[2]):
                    assert torch.equal(x, y)
                continue
            opt.step()
        return [p.detach().clone() for p in params], state_tensors(opt)

    poisoned = run(True)
    # the clean run skips the same gradients (drawn, not stepped on) by drawing them too
    params = _flat_model()
    opt = Grokfast(torch.optim.SGD([{"params": params[:3]}, {"params": params[3:]}], lr=0.1))
    gen = torch.Generator().manual_seed(2)
    for k in range(5):
        _flat_grads(params, gen)
        if k != 3:
            opt.step()
    _assert_same_run(poisoned, ([p.detach().clone() for p in params], state_tensors(opt)))


def test_steady_flat_buffers_survive_edits_reloads_and_a_missing_gradient():
    # Against the same run with the steady path off: an in-place edit of an EMA through
    # `state` (seen by the flat step: the EMA lies in the buffer), an EMA moved by
    # `.data = ...` (not through `state`), a replaced EMA, a parameter without a gradient
    # (its EMA leaves the buffer: a storage of its own, so that the old buffer is not kept
    # alive by it), and a state_dict reload. A reference to an EMA taken before the first
    # layout stays the live state through every later one.
    def run(steady):
        params = _flat_model()
        a, b, c, d, e = params
        opt = Grokfast(torch.optim.SGD(params, lr=0.1), alpha=0.8, lamb=1.5)
        if not steady:
            opt._steady_step = lambda: False
        gen = torch.Generator().manual_seed(3)
        held = None
        for k in range(10):
            _flat_grads(params, gen)
            if k == 1:
                held = opt.state[b]["grokfast_ema"]
                held_a = opt.state[a]["grokfast_ema"]  # (a leaves the buffer at k == 6)
            elif k == 2:
                held.data = held.data.clone()
            elif k == 3:
                opt.state[b]["grokfast_ema"].mul_(0.5)
            elif k == 4:  # (a steady step follows: the flat step must use this tensor)
                opt.state[e]["grokfast_ema"] = torch.ones(3, dtype=torch.float64)
            elif k == 6:
                a.grad = None
            elif k == 8:
                sd = opt.state_dict()
                opt = Grokfast(torch.optim.SGD(params, lr=0.1), alpha=0.8, lamb=1.5)
                opt.load_state_dict(sd)
                if not steady:
                    opt._steady_step = lambda: False
            opt.step()
            if k == 6:  # a's EMA holds a storage of its own size, not the old buffer
                assert opt.state[a]["grokfast_ema"].untyped_storage().nbytes() == 15 * 8
            if k == 7:
                assert held is opt.state[b]["grokfast_ema"]
                assert held_a is opt.state[a]["grokfast_ema"]
        return [p.detach().clone() for p in params], state_tensors(opt)

    _assert_same_run(run(True), run(False))


def test_steady_flat_output_buffer_is_freed_when_the_steady_path_ends():
    # A group switched to the MA filter leaves the steady path for good: the flat output
    # buffer (scratch, not state) must not stay allocated; the EMAs, which are state, stay.
    params = _flat_model()
    opt = Grokfast(torch.optim.SGD(params, lr=0.1))
    gen = torch.Generator().manual_seed(4)
    for k in range(4):
        _flat_grads(params, gen)
        if k == 2:
            opt.param_groups[0]["grokfast_filter"] = "ma"
        opt.step()
        buffers = opt.__dict__["_flat_buffers"]
        assert (buffers[1] is None) == (k >= 2)
    assert opt.state[params[0]]["grokfast_ema"].untyped_storage().data_ptr() == (
        buffers[0].untyped_storage().data_ptr())


# ------------------------------------------------ fused=True: the compiled steady kernels


def _fused_run(fused, dtype, monkeypatch, tensor_hyper=False, steps=8):
    """SGD at lr 1 over the _flat_model parameters (float and tensor alpha/lamb, a lamb=0
    group), alpha and lamb changed every other step; returns the parameters and the EMAs
    after every step, and which steps took the steady path."""
    import grokopt.grokfast as gf

    monkeypatch.setattr(gf, "KEEP_SCRATCH_BYTES", 5_000)  # d (6.4 KB in float32) is large
    params = [p.to(dtype).detach().requires_grad_() for p in _flat_model()]
    a, b, c, d, e = params
    hyper = (lambda v: torch.tensor(v, dtype=dtype)) if tensor_hyper else float
    groups = [{"params": [a, c, d], "grokfast_alpha": hyper(0.9), "grokfast_lamb": hyper(2.0)},
              {"params": [b], "grokfast_alpha": 0.5, "grokfast_lamb": 0.0},
              {"params": [e], "grokfast_alpha": 0.7, "grokfast_lamb": 1.5}]
    opt = Grokfast(torch.optim.SGD(groups, lr=1.0), fused=fused)
    taken, seen = _record_steady_steps(monkeypatch), []
    gen = torch.Generator().manual_seed(5)
    for k in range(steps):
        for p in params:
            shape = (6, 4) if p is c else p.shape
            g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            p.grad = g.t() if p is c else g
        opt.step()
        if k % 2 == 1:  # new values, read by the steady step as they come
            opt.param_groups[0]["grokfast_alpha"] = hyper(0.9 - 0.05 * k)
            opt.param_groups[0]["grokfast_lamb"] = hyper(2.0 + 0.25 * k)
            if k == 5:  # 1 - alpha == lamb: two equal values, still two inputs
                opt.param_groups[0]["grokfast_alpha"] = hyper(0.5)
                opt.param_groups[0]["grokfast_lamb"] = hyper(0.5)
        seen.append([p.detach().clone() for p in params]
                    + [opt.state[p]["grokfast_ema"].clone() for p in params])
    monkeypatch.undo()
    return seen, taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tensor_hyper", [False, True])
def test_fused_steady_step_agrees_with_the_eager_one(dtype, tensor_hyper, monkeypatch):
    # The compiled kernels (flat buffer, kept scratch) against the eager steady step: the
    # same filter up to rounding (a contracted multiply-add), and the eager run itself
    # follows the plain EMA (test_steady_flat_buffers_follow_the_plain_ema).
    import grokopt.grokfast as gf

    torch._dynamo.reset()
    fused, taken = _fused_run(True, dtype, monkeypatch, tensor_hyper)
    eager, taken_eager = _fused_run(False, dtype, monkeypatch, tensor_hyper)
    assert not gf._COMPILE_FAILED
    assert sys.float_info.min / 2 > 0  # loading the kernels flushed nothing to zero
    assert taken == taken_eager == [False] + [True] * 7
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for x, y in zip(fused, eager):
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, rtol=tol, atol=tol)


def test_fused_kernels_do_not_recompile_when_the_values_change(monkeypatch):
    # One graph per kernel (the flat buffer's and the large gradients'), however alpha,
    # lamb and lr change: they reach the kernels as 0-d tensors.
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    _, taken = _fused_run(True, torch.float32, monkeypatch, steps=4)
    graphs = counters["stats"]["unique_graphs"]
    _, taken = _fused_run(True, torch.float32, monkeypatch, steps=10)
    assert graphs == 2 and counters["stats"]["unique_graphs"] == graphs
    assert taken == [False] + [True] * 9


@pytest.mark.parametrize("flushing_before", [False, True])
def test_fused_kernels_leave_flush_to_zero_as_it_was(flushing_before, monkeypatch):
    # torch 2.5's Inductor CPU kernels were built with -ffast-math: loading one switched
    # the thread to flushing subnormal numbers to zero, for every later computation. The
    # fused option puts it back, on first use and after every call (a new shape may load
    # another kernel). Simulated by kernels that switch it on whenever they run (torch
    # 2.13's leave it alone); a user's own setting stays.
    import grokopt.grokfast as gf

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals to zero (no SSE3)")

    def flushing_compile(fn, **kwargs):
        def run(*args):
            torch.set_flush_denormal(True)
            return fn(*args)
        return run

    monkeypatch.setattr(gf, "_COMPILED", {})
    monkeypatch.setattr(gf, "_READY", set())
    monkeypatch.setattr(gf, "_COMPILE_FAILED", [])
    monkeypatch.setattr(torch, "compile", flushing_compile)
    try:
        torch.set_flush_denormal(flushing_before)
        _, taken = _fused_run(True, torch.float32, monkeypatch)
        subnormals = sys.float_info.min / 2 > 0
    finally:
        torch.set_flush_denormal(False)
    assert taken == [False] + [True] * 7
    assert subnormals is not flushing_before


@pytest.mark.parametrize("where", ["compile", "first-call"])
def test_fused_falls_back_to_the_eager_kernels_with_one_warning(where, monkeypatch):
    # No compiler: torch.compile raising where it is called (as on a Python it does not
    # support) or when the kernel first runs (no C++ compiler, no Triton). One
    # RuntimeWarning, pointing at the caller's step(), then the eager kernels, with the
    # same results as fused=False.
    import grokopt.grokfast as gf

    def broken(*args, **kwargs):
        if where == "compile":
            raise RuntimeError("no C++ compiler")

        def fail(*a):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(gf, "_COMPILED", {})
    monkeypatch.setattr(gf, "_READY", set())
    monkeypatch.setattr(gf, "_COMPILE_FAILED", [])
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as record:
        fused, _ = _fused_run(True, torch.float64, monkeypatch)
    warned = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1 and warned[0].filename == __file__
    monkeypatch.setattr(gf, "_COMPILE_FAILED", [])
    eager, _ = _fused_run(False, torch.float64, monkeypatch)
    for x, y in zip(fused, eager):
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)


def test_fused_fallback_warning_as_an_error_leaves_the_step_undone(monkeypatch):
    # Under a warnings filter that makes the fallback's warning an error, the step that
    # raises it must have changed nothing; run again, it goes on as fused=False would.
    import warnings as _warnings

    import grokopt.grokfast as gf

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(gf, "_COMPILED", {})
    monkeypatch.setattr(gf, "_READY", set())
    monkeypatch.setattr(gf, "_COMPILE_FAILED", [])
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(gf, "KEEP_SCRATCH_BYTES", 10_000)

    def run(fused):
        params = _flat_model()
        opt = Grokfast(torch.optim.SGD(params, lr=0.1), fused=fused)
        gen = torch.Generator().manual_seed(7)
        for k in range(4):
            _flat_grads(params, gen)
            if fused and k == 1:  # the first steady step tries to compile
                before = ([p.detach().clone() for p in params], state_tensors(opt))
                with _warnings.catch_warnings():
                    _warnings.simplefilter("error")
                    with pytest.raises(RuntimeWarning, match="eager kernels"):
                        opt.step()
                _assert_same_run(before, ([p.detach().clone() for p in params],
                                          state_tensors(opt)))
            opt.step()
        return [p.detach().clone() for p in params], state_tensors(opt)

    _assert_same_run(run(True), run(False))


def test_fused_screens_before_anything_changes(monkeypatch):
    # An inf in a large gradient (screened by its sum under fused) and then in a small one
    # (the flat buffer's sum): refused, nothing changed.
    import grokopt.grokfast as gf

    monkeypatch.setattr(gf, "KEEP_SCRATCH_BYTES", 10_000)
    params = _flat_model()
    opt = Grokfast(torch.optim.SGD(params, lr=0.1), fused=True)
    gen = torch.Generator().manual_seed(6)
    for k in range(5):
        _flat_grads(params, gen)
        if k >= 3:
            params[3 if k == 3 else 1].grad[0] = float("nan")
            before = ([p.detach().clone() for p in params], state_tensors(opt))
            with pytest.raises(NonFiniteGradientError, match=f"parameter {3 if k == 3 else 1} "):
                opt.step()
            _assert_same_run(before, ([p.detach().clone() for p in params], state_tensors(opt)))
        else:
            opt.step()


def test_fused_is_a_validated_keyword():
    inner = torch.optim.SGD(_flat_model(), lr=0.1)
    with pytest.raises(TypeError, match=r"fused must be a bool, got str: 'yes'"):
        Grokfast(inner, fused="yes")
    assert "grokfast_fused" not in inner.param_groups[0]


def test_steady_path_follows_options_changed_every_step(monkeypatch):
    # A schedule on lamb and alpha (new values at every step) keeps the steady path, which
    # reads them at every step; switching the group to the MA filter in place ends it.
    # Against the plain EMA, then against the same run with the steady path off.
    params = _flat_model()
    opt = Grokfast(torch.optim.SGD(params, lr=1.0))
    taken = _record_steady_steps(monkeypatch)
    gen = torch.Generator().manual_seed(8)
    mus = {}
    for k in range(6):
        alpha, lamb = 0.9 - 0.05 * k, 1.0 + 0.5 * k
        opt.param_groups[0]["grokfast_alpha"] = alpha
        opt.param_groups[0]["grokfast_lamb"] = lamb
        _flat_grads(params, gen)
        values = {p: p.grad.clone() for p in params}
        before = {p: p.detach().clone() for p in params}
        opt.step()
        for p in params:
            g = values[p]
            mu = mus[p] = g.clone() if p not in mus else alpha * mus[p] + (1 - alpha) * g
            torch.testing.assert_close(p.detach(), before[p] - (g + lamb * mu),
                                       rtol=1e-12, atol=1e-12)
    assert taken == [False] + [True] * 5
    monkeypatch.undo()

    def run(steady):
        params = _flat_model()
        opt = Grokfast(torch.optim.SGD(params, lr=0.1), window=2)
        if not steady:
            opt._steady_step = lambda: False
        gen = torch.Generator().manual_seed(9)
        for k in range(6):
            if k == 3:
                opt.param_groups[0]["grokfast_filter"] = "ma"
            _flat_grads(params, gen)
            opt.step()
        return [p.detach().clone() for p in params], state_tensors(opt)

    _assert_same_run(run(True), run(False))
