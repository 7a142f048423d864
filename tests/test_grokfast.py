"""Grokfast: closed forms of SPEC section 1, paths agreeing, identity, faults, bad input."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from contract import INNER_OPTIMIZERS, make_batches, make_model, state_tensors, train
from grokopt import Grokfast, NonFiniteGradientError, grokfast_

FLOATS = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)


def run_filter(seq, **kw):
    """Feed a sequence of gradient tensors through grokfast_ and return the outputs."""
    state = [{}]
    outs = []
    for g in seq:
        g = [g.clone()]
        grokfast_(g, state, **kw)
        outs.append(g[0])
    return outs


# ---------------------------------------------------------------- independent reference


def plain_ema(seq, alpha, lamb):
    """SPEC section 1 written out with Python floats per element, nothing shared with grokopt."""
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


@pytest.mark.parametrize("foreach", [True, False])
def test_ema_matches_plain_formula(foreach):
    gen = torch.Generator().manual_seed(0)
    seq = [torch.randn(4, 3, generator=gen) for _ in range(30)]
    ours = run_filter(seq, alpha=0.9, lamb=2.0, foreach=foreach)
    for a, b in zip(ours, plain_ema(seq, 0.9, 2.0)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("warmup", [True, False])
def test_ma_matches_plain_formula(foreach, reduction, warmup):
    gen = torch.Generator().manual_seed(1)
    # 23 steps with window 5 wraps the ring buffer several times (running-sum resets too).
    seq = [torch.randn(7, generator=gen) for _ in range(23)]
    ours = run_filter(seq, filter="ma", window=5, lamb=3.0, reduction=reduction,
                      warmup=warmup, foreach=foreach)
    for a, b in zip(ours, plain_ma(seq, 5, 3.0, reduction, warmup)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- closed forms (SPEC 1)


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
        assert opt.state[p]["ema"].dtype == torch.float32
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.1))
    train(model, opt, make_batches(1))
    for p in model.parameters():
        assert opt.state[p]["ema"].data_ptr() != p.grad.data_ptr()


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


def test_hyperparameters_live_in_param_groups_per_group():
    model = make_model(0)
    inner = torch.optim.SGD([{"params": model[0].parameters()},
                             {"params": model[2].parameters(), "grokfast_lamb": 0.0}], lr=0.1)
    opt = Grokfast(inner, lamb=2.0)
    assert [g["grokfast_lamb"] for g in opt.param_groups] == [2.0, 0.0]
    x, y = make_batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    opt.param_groups[0]["grokfast_lamb"] = 1.0  # changed by the user before the step
    opt.step()
    torch.testing.assert_close(model[0].weight.grad, 2 * raw[0])
    torch.testing.assert_close(model[2].weight.grad, raw[2])


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


def test_skip_mode_ema_state_untouched_for_plain_inner():
    model = make_model(0)
    opt = Grokfast(torch.optim.SGD(model.parameters(), lr=0.0), nonfinite="skip")
    train(model, opt, make_batches(2))
    ema = {k: v for k, v in state_tensors(opt).items() if "grokfast" in k}
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    _poison(model)
    opt.step()
    after = state_tensors(opt)
    for key in ema:
        assert torch.equal(after[key], ema[key]), key


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
    assert "ema" not in opt.state[emb.weight]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.0), r"alpha must be in \[0, 1\), got 1.0"),
        (dict(alpha=-0.1), "alpha must be in"),
        (dict(alpha=float("nan")), "alpha must be finite"),
        (dict(lamb=-1.0), "lamb must be >= 0, got -1.0"),
        (dict(window=0), "window must be an int >= 1, got 0"),
        (dict(window=2.5), "window must be an int"),
        (dict(filter="fir"), r"filter must be one of \('ema', 'ma'\), got 'fir'"),
        (dict(reduction="max"), "reduction must be one of"),
        (dict(nonfinite="ignore"), "nonfinite must be one of"),
    ],
)
def test_bad_arguments_name_the_argument_and_change_nothing(kwargs, match):
    model = make_model(0)
    inner = torch.optim.Adam(model.parameters())
    before = [dict(g) for g in inner.param_groups]
    with pytest.raises(ValueError, match=match):
        Grokfast(inner, **kwargs)
    assert [dict(g) for g in inner.param_groups] == before


@pytest.mark.parametrize("kwargs", [dict(alpha="0.9"), dict(lamb=None), dict(warmup=1)])
def test_wrong_types_raise_type_error(kwargs):
    with pytest.raises(TypeError):
        Grokfast(torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)


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
    with pytest.raises(ValueError, match="alpha must be in"):
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
    # Guard the closed form used above against a silent change in the SPEC numbers.
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
        assert "ema" in opt.state[other]
    else:
        with pytest.raises(NonFiniteGradientError):
            opt.step()
        assert not opt.state[other]


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=torch.tensor(float("nan"))), "alpha must be finite"),
    (dict(alpha=torch.tensor(1.0)), "alpha must be in"),
    (dict(lamb=torch.tensor(-1.0)), "lamb must be >= 0"),
])
def test_tensor_hyperparameters_are_range_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Grokfast(torch.optim.SGD(make_model().parameters(), lr=0.1), **kwargs)
