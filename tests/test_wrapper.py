"""The wrapper base on its own: nesting, state namespacing, pickling of a custom subclass."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from contract import assert_same_state, WRAPPER_CASES, assert_same_params, make_batches, make_model, state_tensors, train
from grokopt import AmplifiedOptimizer, GradientTransform, Grokfast
SKIP_STEP = GradientTransform.SKIP_STEP


class CountingScale(GradientTransform):
    """A minimal wrapper for tests: scales gradients by ``factor`` and counts its steps."""

    _prefix = "scale_"

    def __init__(self, optimizer, *, factor=0.5):
        super().__init__(optimizer, {"factor": factor})

    def _validate_group(self, options):
        if "scale_factor" in options and not options["scale_factor"] > 0:
            raise ValueError(f"factor must be > 0, got {options['scale_factor']!r}")

    def _transform_gradients(self):
        for group in self.param_groups:
            for p, g in self._grads(group):
                g.mul_(group["scale_factor"])
                state = self.own_state[p]
                state["count"] = state.get("count", torch.zeros(())) + 1


def _nested(order, params):
    inner = torch.optim.Adam(params, lr=1e-2)
    if order == "scale(grokfast)":
        return CountingScale(Grokfast(inner, alpha=0.9))
    return Grokfast(CountingScale(inner), alpha=0.9)


@pytest.mark.parametrize("order", ["scale(grokfast)", "grokfast(scale)"])
def test_nested_wrappers_round_trip_exactly(order):
    batches = make_batches(8)
    model_a = make_model(0)
    opt_a = _nested(order, model_a.parameters())
    train(model_a, opt_a, batches)

    model_b = make_model(0)
    opt_b = _nested(order, model_b.parameters())
    train(model_b, opt_b, batches[:5])
    buf = io.BytesIO()
    torch.save((model_b.state_dict(), opt_b.state_dict()), buf)
    buf.seek(0)
    msd, osd = torch.load(buf, weights_only=True)
    model_c = make_model(7)
    opt_c = _nested(order, model_c.parameters())
    model_c.load_state_dict(msd)
    opt_c.load_state_dict(osd)
    train(model_c, opt_c, batches[5:])
    assert_same_params(model_a, model_c)
    sa, sc = state_tensors(opt_a), state_tensors(opt_c)
    assert sa.keys() == sc.keys()
    assert {k.split("/")[1] for k in sa} == {
        "step", "exp_avg", "exp_avg_sq", "grokfast_ema", "scale_count"
    }
    for key in sa:
        assert torch.equal(sa[key], sc[key]), key


def test_nesting_order_matters_as_the_maths_says():
    # The outermost wrapper transforms first. scale(grokfast): the filter sees 0.5 g;
    # grokfast(scale): it sees the raw g. Both maps are linear, so after one step both hand
    # Adam 0.5 * 3 g, yet the EMA states differ by exactly 2x.
    grads = {}
    for order in ("scale(grokfast)", "grokfast(scale)"):
        model = make_model(0)
        opt = _nested(order, model.parameters())
        train(model, opt, make_batches(1))
        grads[order] = {k: v for k, v in state_tensors(opt).items() if "grokfast_ema" in k}
    for key in grads["scale(grokfast)"]:
        torch.testing.assert_close(2 * grads["scale(grokfast)"][key], grads["grokfast(scale)"][key])


def test_state_dict_of_one_stack_is_refused_by_another():
    model = make_model(0)
    a = _nested("scale(grokfast)", model.parameters())
    b = _nested("grokfast(scale)", make_model(0).parameters())
    train(model, a, make_batches(1))
    with pytest.raises(ValueError, match="not produced by Grokfast"):
        b.load_state_dict(a.state_dict())


def test_add_param_group_validates_before_changing_anything():
    model = make_model(0)
    opt = CountingScale(torch.optim.SGD(model[0].parameters(), lr=0.1))
    before = len(opt.param_groups)
    with pytest.raises(ValueError, match="factor must be > 0, got -1"):
        opt.add_param_group({"params": model[2].parameters(), "scale_factor": -1})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == before
    opt.add_param_group({"params": model[2].parameters()})
    assert opt.param_groups[-1]["scale_factor"] == 0.5


def test_closure_is_evaluated_once_with_grad_enabled():
    model = make_model(0)
    opt = CountingScale(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = make_batches(1)[0]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and loss.ndim == 0


# ---------------------------------------------------------------- a plain checkpoint upgrades

UPGRADE_CASES = [pytest.param(c, id=c.name) for c in WRAPPER_CASES
                 if c.name in ("grokfast-ema", "grokfast-ma", "grokfast-skip-late", "neuralgrok",
                               "neuralgrok-over-grokfast")]


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("order", ["load-then-wrap", "wrap-then-load"])
@pytest.mark.parametrize("case", UPGRADE_CASES)
def test_plain_checkpoint_upgrades_to_a_wrapped_run(case, order):
    batches = make_batches(8)
    # Reference: the bare optimizer for 4 steps, then the same live objects wrapped.
    model_a = make_model(0)
    inner_a = _adamw(model_a)
    train(model_a, inner_a, batches[:4])
    opt_a = case.build(inner_a, model_a)
    train(model_a, opt_a, batches[4:], case)

    model_b = make_model(0)
    inner_b = _adamw(model_b)
    train(model_b, inner_b, batches[:4])
    buffer = io.BytesIO()
    torch.save((model_b.state_dict(), inner_b.state_dict()), buffer)
    buffer.seek(0)
    msd, osd = torch.load(buffer, weights_only=True)

    model_c = make_model(9)
    model_c.load_state_dict(msd)
    inner_c = _adamw(model_c)
    if order == "load-then-wrap":
        inner_c.load_state_dict(osd)
        opt_c = case.build(inner_c, model_c)
    else:
        opt_c = case.build(inner_c, model_c)
        inner_c.load_state_dict(osd)  # the groups now lack the wrapper's keys
    train(model_c, opt_c, batches[4:], case)
    assert_same_params(model_a, model_c)
    assert_same_state(opt_a, opt_c)
    assert opt_a.state_dict()["param_groups"] == opt_c.state_dict()["param_groups"]


def test_groups_without_the_wrappers_keys_get_its_defaults_not_a_key_error():
    model = make_model(0)
    opt = Grokfast(_adamw(model), lamb=1.5, after_step=1)
    plain = _adamw(make_model(0)).state_dict()
    opt.optimizer.load_state_dict(plain)
    assert "grokfast_lamb" not in opt.param_groups[0]
    saved = opt.state_dict()["param_groups"][0]  # saved as the next step will use them
    assert (saved["grokfast_lamb"], saved["grokfast_after_step"]) == (1.5, 1)
    train(model, opt, make_batches(2))
    assert opt.param_groups[0]["grokfast_lamb"] == 1.5
    assert set(opt.state[model[0].weight]) == {
        "grokfast_ema", "grokfast_step", "grokfast_started", "exp_avg", "exp_avg_sq", "step"}


def test_loading_a_plain_state_dict_into_the_wrapper_names_the_upgrade_path():
    model = make_model(0)
    opt = Grokfast(_adamw(model))
    with pytest.raises(ValueError, match=r"load this state_dict into the inner optimizer"):
        opt.load_state_dict(_adamw(make_model(0)).state_dict())


# ---------------------------------------------------------------- optimizers that cannot be driven


class _NeedsClosure(torch.optim.Optimizer):
    """Any optimizer whose step() cannot run without a closure, like LBFGS."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure):
        return closure()


WRAPPERS = {
    "Grokfast": lambda opt: Grokfast(opt),
    "AmplifiedOptimizer": lambda opt: AmplifiedOptimizer(opt, hidden=(4,)),
    "CountingScale": lambda opt: CountingScale(opt),
    "Grokfast(CountingScale)": lambda opt: Grokfast(CountingScale(opt)),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("inner, match", [
    (lambda p: torch.optim.LBFGS(p), "LBFGS cannot be wrapped .* requires a closure"),
    (_NeedsClosure, "_NeedsClosure cannot be wrapped .* requires a closure"),
    (lambda p: torch.optim.SparseAdam(p), "SparseAdam cannot be wrapped .* sparse"),
], ids=["LBFGS", "closure-only", "SparseAdam"])
def test_optimizers_a_wrapper_cannot_drive_are_refused_at_construction(wrapper, inner, match):
    model = make_model(0)
    opt = inner(model.parameters())
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        WRAPPERS[wrapper](opt)
    assert [dict(g) for g in opt.param_groups] == before


# ---------------------------------------------------------------- the wrapper protocol


class _Counting(GradientTransform):
    """Counts validations; its transform returns what ``self.answer`` says."""

    _prefix = "count_"

    def __init__(self, optimizer, *, gain=2.0):
        self.validations = 0
        self.answer = None
        super().__init__(optimizer, {"gain": gain})

    def _validate_group(self, options):
        self.validations += 1
        gain = options.get("count_gain", 1.0)
        if not isinstance(gain, torch.Tensor) and not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain!r}")

    def _transform_gradients(self):
        for group in self.param_groups:
            for _, g in self._grads(group):
                g.mul_(group["count_gain"])
        return self.answer


def _counting(**kw):
    p = torch.nn.Parameter(torch.ones(3))
    opt = _Counting(torch.optim.SGD([p], lr=0.5), **kw)
    return p, opt


def test_options_are_validated_when_they_change_not_at_every_step():
    p, opt = _counting()
    after_init = opt.validations
    for _ in range(4):
        p.grad = torch.ones(3)
        opt.step()
    assert opt.validations == after_init + 1  # the first step validates, the others compare
    opt.param_groups[0]["count_gain"] = 3.0
    p.grad = torch.ones(3)
    opt.step()
    assert opt.validations == after_init + 2
    gain = torch.tensor(2.0)  # tensors compare by identity: the same object is not revalidated
    opt.param_groups[0]["count_gain"] = gain
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    assert opt.validations == after_init + 3
    opt.param_groups[0]["count_gain"] = -1.0  # invalid between steps: refused before any change
    before = p.detach().clone()
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="gain must be > 0"):
        opt.step()
    assert torch.equal(p, before) and torch.equal(p.grad, torch.ones(3))


def test_transform_answers_step_skip_or_found_inf_and_only_the_base_steps():
    p, opt = _counting()
    p.grad = torch.ones(3)
    opt.step()  # None: the inner SGD steps on the transformed gradient, lr 0.5 * 2
    assert torch.equal(p.detach(), torch.zeros(3))
    opt.answer = SKIP_STEP
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3))  # skipped
    # copied or pickled (a transform that keeps it in its state), it is still the one
    for copied in (copy.copy(SKIP_STEP), copy.deepcopy(SKIP_STEP),
                   pickle.loads(pickle.dumps(SKIP_STEP))):
        assert copied is SKIP_STEP
    opt.answer = True  # the protocol before SKIP_STEP: refused by name, not misread
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="must return None .* SKIP_STEP"):
        opt.step()
    # A device-side found_inf reaches a fused inner optimizer, which skips on True only.
    q = torch.nn.Parameter(torch.ones(3))
    fused = _Counting(torch.optim.SGD([q], lr=0.5, fused=True))
    for flag, expected in ((torch.tensor(True), torch.ones(3)), (torch.tensor(False), torch.zeros(3))):
        fused.answer = flag
        q.grad = torch.ones(3)
        fused.step()
        assert torch.equal(q.detach(), expected), flag
    assert not hasattr(fused.optimizer, "found_inf")  # taken off again after the step


# ---------------------------------------------------------------- checkpoints of grokopt 0.1


def test_a_checkpoint_of_grokopt_0_1_loads_and_continues_as_0_1_did():
    """grokopt 0.1 kept NeuralGrok's amplifier, meta-optimizer and counters at the
    state_dict's top level and mirrored them into param_groups[0]. The file was written by
    0.1 itself (tests/data/make_grokopt_0_1_checkpoint.py, run on that release), with the
    parameters 0.1 reached by training on from it: loading it here and training on the same
    batches must reach them bit for bit."""
    from pathlib import Path

    from contract import make_batches, make_model

    saved = torch.load(Path(__file__).parent / "data" / "grokopt-0.1-neuralgrok-over-grokfast.pt",
                       weights_only=True)
    assert saved["grokopt_version"] == "0.1.0"
    assert "grokopt_top_level" in saved["optimizer"]["param_groups"][0]  # really the old form
    batches = make_batches(8)
    model = make_model(5)
    model.load_state_dict(saved["model"])
    opt = AmplifiedOptimizer(Grokfast(torch.optim.AdamW(model.parameters(), lr=1e-2), alpha=0.9),
                             hidden=(4,), meta_every=2, g_hat="last")
    with torch.no_grad():
        for p in opt.amplifier.parameters():
            p.add_(1.0)  # everything must come from the checkpoint
    opt.load_state_dict(saved["optimizer"])
    assert opt.meta_steps == 2 and opt.steps == 4
    assert "grokopt_top_level" not in opt.param_groups[0]
    for i, (x, y) in enumerate(batches[4:]):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.maybe_meta_step(model, lambda fwd, x=x, y=y: torch.nn.functional.mse_loss(fwd(x), y))
    for p, q in zip(model.parameters(), saved["continued"]):
        assert torch.equal(p, q)


def test_state_view_follows_add_param_group():
    """The view's parameter lookup is cached; a group added later must still be seen."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = Grokfast(torch.optim.SGD([a], lr=0.1))
    a.grad = torch.ones(2)
    opt.step()
    assert set(opt.state[a]) == {"grokfast_ema"}  # fills the cache
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    assert set(opt.state[b]) == {"grokfast_ema"}
    assert [len(opt.state[p]) for p in opt.state] == [1, 1]
