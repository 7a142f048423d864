"""Bad input everywhere: random invalid arguments thrown at every public constructor and call
of grokopt.__all__. Each call must either succeed (and give a sane result) or raise
ValueError/TypeError with a message naming the argument, and a rejected call must change no
state (the caller's optimizer, parameters, filter state, generator).

The Jacobian kernels jvp and vjp of grokopt.jacobian (public there, not re-exported) are
fuzzed too. Classes that are results, not calls (CentroidStats, FrobeniusEstimate) and the exception type
NonFiniteGradientError have nothing to validate; GradientTransform is fuzzed through its
constructor, and every subclass's step through bad gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import grokopt
from contract import make_model, state_tensors

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
ACCEPTED = (ValueError, TypeError)


def _tensors():
    shapes = st.sampled_from([(), (0,), (3,), (2, 2), (0, 5), (4, 5)])
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool, torch.complex64])
    fills = st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf")])
    return st.builds(lambda s, d, f: torch.full(s, f).to(d) if d.is_complex or d.is_floating_point
                     else torch.zeros(s, dtype=d), shapes, dtypes, fills)


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, 0.5, 1e30]),
    st.text(max_size=4), st.lists(st.integers(-2, 3), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.just(object()), _tensors(),
)


def check_error(exc: BaseException, name: str) -> None:
    assert isinstance(exc, ACCEPTED), f"{name}: raised {type(exc).__name__}: {exc}"
    # The message must name the argument that was wrong (callers pass that argument's name).
    assert name.split(".")[-1] in str(exc), f"{name}: the message does not name it: {exc!r}"


def raised_by_the_model(exc: BaseException) -> bool:
    """An error raised inside the caller's model (a wrong feature size for its Linear):
    grokopt cannot know the model's input shape without calling it, so such errors
    propagate unchanged, by design."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if "torch/nn/modules/" in code.co_filename and code.co_name == "forward":
            return True
        tb = tb.tb_next
    return False


def groups_snapshot(opt):
    return copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


# ---------------------------------------------------------------- constructors


CONSTRUCTORS = {
    "Grokfast": (lambda opt, **kw: grokopt.Grokfast(opt, **kw),
                 ["alpha", "lamb", "filter", "window", "reduction", "warmup", "foreach", "nonfinite"]),
    "AmplifiedOptimizer": (lambda opt, **kw: grokopt.AmplifiedOptimizer(opt, hidden=(4,), **kw),
                           ["amplifier", "c", "meta_lr", "meta_optimizer", "meta_every", "g_hat", "eps",
                            "path", "chunk_size", "max_grad_norm"]),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@SETTINGS
@given(data=st.data())
def test_wrapper_constructors(name, data):
    build, args = CONSTRUCTORS[name]
    arg = data.draw(st.sampled_from(args + ["optimizer"]))
    value = data.draw(JUNK)
    model = make_model()
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = groups_snapshot(inner)
    try:
        if arg == "optimizer":
            build(value)
        else:
            opt = build(inner, **{arg: value})
    except ACCEPTED as exc:
        check_error(exc, arg)
        assert groups_snapshot(inner) == before  # the caller's optimizer is untouched
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{name}({arg}={value!r}) raised {type(exc).__name__}: {exc}")
    # accepted: it must train
    x = torch.randn(6, 5)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@SETTINGS
@given(hyper=JUNK)
def test_gradient_transform_constructor(hyper):
    inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
    try:
        grokopt.GradientTransform(inner, hyper)
    except ACCEPTED as exc:
        check_error(exc, "hyperparameters")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"GradientTransform(hyperparameters={hyper!r}) raised {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- bad gradients into step()


def _wrappers():
    return {
        "grokfast": lambda o: grokopt.Grokfast(o),
        "grokfast-ma": lambda o: grokopt.Grokfast(o, filter="ma", window=2),
        "neuralgrok": lambda o: grokopt.AmplifiedOptimizer(o, hidden=(4,)),
    }


def _reference_transform(kind, g1, g2, opt):
    """The two gradients the inner optimizer should see, from the method definitions
    (docs/methods.md) at the defaults of ``_wrappers``, written out by hand."""
    if kind == "grokfast":  # EMA alpha 0.98, lamb 2: mu_1 = g1, mu_2 = 0.98 g1 + 0.02 g2
        return g1 + 2.0 * g1, g2 + 2.0 * (0.98 * g1 + 0.02 * g2)
    if kind == "grokfast-ma":  # window 2, lamb 2, mean, warmup: nothing until it is full
        return g1.clone(), g2 + 2.0 * (g1 + g2) / 2

    def g_phi(g):  # per tensor: f on every entry, w = exp(f - max f), c w g / (||w g|| + eps)
        with torch.no_grad():
            f = opt.amplifier(g.reshape(-1, 1).float()).reshape(g.shape)
            wg = torch.exp(f - f.max()) * g
            return 1.0 * wg / (wg.norm() + 1e-12)

    return g_phi(g1), g_phi(g2)


# Gradients for the bias (8 entries): some of its own shape and dtype, which torch lets
# through, so that the accepted branch below is exercised, not only torch's refusals.
_FILLS = st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf")])
_BIAS_GRADS = st.one_of(_tensors(), st.builds(
    lambda d, f: torch.full((8,), f).to(d),
    st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]), _FILLS))


@pytest.mark.parametrize("kind", list(_wrappers()))
@SETTINGS
@given(grad=_BIAS_GRADS)
def test_step_with_a_bad_gradient(kind, grad):
    model = make_model()
    opt = _wrappers()[kind](torch.optim.Adam(model.parameters(), lr=1e-2))
    x = torch.randn(6, 5)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    first = [p.grad.clone() for p in model.parameters()]
    opt.step()  # some state exists
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = state_tensors(opt)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    try:
        model[0].bias.grad = grad  # torch itself refuses some (shape/dtype): that is fine
    except (RuntimeError, TypeError, ValueError):
        return
    second = [p.grad.clone() for p in model.parameters()]
    try:
        opt.step()
    except (ValueError, TypeError, grokopt.NonFiniteGradientError) as exc:
        assert len(str(exc)) > 20
        for p, q in zip(model.parameters(), before_params):
            assert torch.equal(p, q)
        after = state_tensors(opt)
        assert after.keys() == before_state.keys()
        for k, v in before_state.items():
            assert torch.equal(after[k], v), k
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{kind}.step() with grad {grad.dtype} {tuple(grad.shape)} raised {type(exc).__name__}: {exc}")
    # Accepted: torch let only a gradient of the bias's own shape and dtype through, and the
    # step is the method's ordinary step on it: a bare Adam fed the hand-computed transforms
    # of both steps' gradients lands on the same parameters (NaN where the gradient was NaN
    # or inf, as torch's own optimizers do; Grokfast refuses those by default).
    assert grad.shape == model[0].bias.shape and grad.dtype == model[0].bias.dtype
    twin = make_model()
    bare = torch.optim.Adam(twin.parameters(), lr=1e-2)
    for step in range(2):
        for p, g1, g2 in zip(twin.parameters(), first, second):
            p.grad = _reference_transform(kind, g1, g2, opt)[step]
        bare.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        # Different op orders (foreach lerp, the piecewise-linear amplifier path) round
        # differently in float32: measured up to 3e-8 here, against steps of ~1e-2.
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, equal_nan=True)


# ---------------------------------------------------------------- functions and GrokAlignLoss


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _calls():
    """name -> (call(args), {arg: valid value})."""
    amp = grokopt.make_amplifier((4,))
    return {
        "GrokAlignLoss": (lambda a: grokopt.GrokAlignLoss(**a), dict(model=_net(), weight=1e-3, num_projections=1,
                                                                      estimator="auto", squared=False, generator=None)),
        "GrokAlignLoss.__call__": (lambda a: grokopt.GrokAlignLoss(_net())(**a), dict(x=torch.randn(2, 3), logits=None)),
        "jacobian_frobenius_norm": (lambda a: grokopt.jacobian_frobenius_norm(**a),
                                    dict(model=_net(), x=torch.randn(2, 3), estimator="vjp", num_projections=1,
                                         squared=False, generator=None, probes=None, logits=None, fast_path=None)),
        "per_sample_jacobian": (lambda a: grokopt.per_sample_jacobian(**a), dict(model=_net(), x=torch.randn(2, 3), mode="auto", fast_path=None)),
        # Public in grokopt.jacobian, not re-exported at the top.
        "jacobian.jvp": (lambda a: grokopt.jacobian.jvp(**a), dict(model=_net(), x=torch.randn(2, 3), tangents=torch.randn(2, 3), fast_path=None)),
        "jacobian.vjp": (lambda a: grokopt.jacobian.vjp(**a), dict(model=_net(), x=torch.randn(2, 3), cotangents=1.0, create_graph=True, fast_path=None)),
        "centroids": (lambda a: grokopt.centroids(**a), dict(model=_net(), x=torch.randn(2, 3))),
        "centroid_alignment": (lambda a: grokopt.centroid_alignment(**a), dict(model=_net(), x=torch.randn(2, 3))),
        "jacobian_pc1_share": (lambda a: grokopt.jacobian_pc1_share(**a), dict(model=_net(), x=torch.randn(4, 3))),
        "is_piecewise_linear": (lambda a: grokopt.is_piecewise_linear(**a), dict(model=_net())),
        "absolute_gradient_entropy": (lambda a: grokopt.absolute_gradient_entropy(**a), dict(params_or_tensors=[torch.randn(3)])),
        "make_amplifier": (lambda a: grokopt.make_amplifier(**a), dict(hidden=(4,), device=None, dtype=torch.float32)),
        "amplify_gradients": (lambda a: grokopt.amplify_gradients(**a),
                              dict(grads=[torch.randn(3)], amplifier=amp, c=1.0, eps=1e-12, path="auto", chunk_size=8)),
        "grokfast_": (lambda a: grokopt.grokfast_(**a),
                      dict(grads=[torch.randn(3)], states=[{}], filter="ema", alpha=0.9, lamb=2.0, window=3,
                           reduction="mean", warmup=True, foreach=None, finite=None)),
    }


@pytest.mark.parametrize("name", list(_calls()))
@SETTINGS
@given(data=st.data())
def test_functions_and_loss(name, data):
    call, valid = _calls()[name]
    arg = data.draw(st.sampled_from(sorted(valid)))
    value = data.draw(JUNK)
    args = dict(valid, **{arg: value})
    tensors_before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    model = args.get("model")
    params_before = [p.detach().clone() for p in model.parameters()] if isinstance(model, nn.Module) else []
    try:
        result = call(args)
    except ACCEPTED as exc:
        check_error(exc, arg)
        for k, v in tensors_before.items():  # inputs untouched by a rejected call
            assert torch.equal(args[k], v) or (v.isnan().any() and args[k].isnan().any()), k
        for p, q in zip(model.parameters() if params_before else [], params_before):
            assert torch.equal(p, q)
        return
    except Exception as exc:  # noqa: BLE001
        if arg == "x" and isinstance(exc, RuntimeError) and raised_by_the_model(exc):
            return
        pytest.fail(f"{name}({arg}={value!r}) raised {type(exc).__name__}: {exc}")
    assert result is not None or name == "grokfast_"
