"""Checkpoints and faults: a killed run resumes exactly; bad state_dicts are refused before
anything changes; NaN losses, missing gradients, param groups added mid-training and empty
groups behave as documented and lose nothing already accumulated."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import _resume_script as resume
from contract import INNER_OPTIMIZERS, WRAPPER_CASES, make_batches, make_model, state_tensors, train
from grokopt import AmplifiedOptimizer, Grokfast, NonFiniteGradientError

CASES = [pytest.param(c, id=c.name) for c in WRAPPER_CASES]


def build(case, inner="adam", seed=0):
    model = make_model(seed)
    return model, case.build(INNER_OPTIMIZERS[inner](model.parameters()), model)


def amplified(opt):
    while opt is not None and not isinstance(opt, AmplifiedOptimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def snapshot(model, opt):
    """Everything a step or a load could change: parameters, state, and the amplifier's
    top-level state (weights, meta-optimizer, counters)."""
    snap = {f"param/{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    snap.update({f"state/{k}": v for k, v in state_tensors(opt).items()})
    snap["groups"] = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    amp = amplified(opt)
    if amp is not None:
        snap.update({f"amp/{k}": v.clone() for k, v in amp.amplifier.state_dict().items()})
        meta = amp.meta_optimizer.state_dict()["state"]
        snap.update({f"meta/{i}/{k}": torch.as_tensor(v).clone() for i, e in meta.items() for k, v in e.items()})
        snap["counters"] = dict(amp._counters)
    return snap


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------------------- kill and resume


def test_killed_training_resumes_exactly(tmp_path):
    script = resume.__file__
    crashed = subprocess.run([sys.executable, script, "crash", str(tmp_path)], timeout=240,
                             capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not (tmp_path / "final.pt").exists()
    resumed = subprocess.run([sys.executable, script, "resume", str(tmp_path)], timeout=240,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert set(final) == set(resume.NAMES)
    for name in resume.NAMES:
        for p, q in zip(resume.uninterrupted(name), final[name]):
            assert torch.equal(p, q), name  # same ops, same order: bit for bit


# ---------------------------------------------------------------------------- bad state_dicts


def _corruptions(opt, sd):
    """(description, corrupted copy, exception type) for one wrapper's state_dict."""
    out = []

    def variant(desc, fn, exc=ValueError):
        bad = copy.deepcopy(sd)
        fn(bad)
        out.append(pytest.param(desc, bad, exc, id=desc))

    variant("missing state", lambda d: d.pop("state"))
    variant("missing param_groups", lambda d: d.pop("param_groups"))
    variant("extra parameter", lambda d: d["param_groups"][0]["params"].append(99))
    variant("one parameter fewer", lambda d: d["param_groups"][0]["params"].pop())
    variant("extra group", lambda d: d["param_groups"].append(dict(d["param_groups"][0], params=[])))
    variant("unknown index", lambda d: d["state"].update({77: dict(d["state"][0])}))

    def unwrapped(d):  # what a plain optimizer saved: no stack, no wrapper keys in the groups
        d.pop("grokopt_stack")
        for g in d["param_groups"]:
            for k in [k for k in g if k.split("_")[0] in ("grokfast", "neuralgrok", "orthograd", "egd")]:
                del g[k]

    variant("no wrapper stack nor group keys", unwrapped)

    def reshape_in(entries):
        for k, v in list(entries.items()):
            if isinstance(v, dict) and reshape_in(v):
                return True
            if isinstance(v, torch.Tensor) and v.dim():
                entries[k] = torch.zeros(*v.shape[:-1], v.shape[-1] + 1)
                return True
        return False

    def reshape(d):  # a per-parameter wrapper tensor, else one of the wrapper-wide ones
        for entries in d["state"].values():
            own = {k: v for k, v in entries.items() if k.startswith(("grokfast_", "neuralgrok_"))}
            if reshape_in(own):
                entries.update(own)
                return
        raise AssertionError("no wrapper tensor to reshape")

    if any(k.startswith(("grokfast_", "neuralgrok_")) for e in sd["state"].values() for k in e):
        variant("wrong shape", reshape)
    variant("not a dict", lambda d: None, TypeError)
    return out


@pytest.mark.parametrize("case", CASES)
def test_corrupted_or_mismatched_state_dicts_are_refused_before_anything_changes(case):
    batches = make_batches(4)
    model, opt = build(case)
    train(model, opt, batches, case)
    good = opt.state_dict()
    foreign = Grokfast(torch.optim.Adam(make_model().parameters()))
    train(make_model(), foreign, [], None)
    if type(opt) is Grokfast:
        foreign = AmplifiedOptimizer(torch.optim.Adam(make_model().parameters()), hidden=(4,))
    variants = [(p.values[0], p.values[1], p.values[2]) for p in _corruptions(opt, good)]
    variants.append(("another wrapper", foreign.state_dict(), ValueError))
    variants.append(("plain optimizer", torch.optim.Adam(make_model().parameters()).state_dict(), ValueError))

    before = snapshot(model, opt)
    for desc, bad, exc in variants:
        if desc == "not a dict":
            bad = ["not", "a", "dict"]
        with pytest.raises(exc) as info:
            opt.load_state_dict(bad)
        assert len(str(info.value)) > 20, desc  # a message that says something
        assert_same(before, snapshot(model, opt))
    # ... and the optimizer still works and still loads a good state_dict.
    opt.load_state_dict(good)
    train(model, opt, batches[:1], case)


# ---------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("inner", ["adam", "adamw-fused"])
@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_nan_loss_loses_no_grokfast_state(nonfinite, inner):
    model = make_model()
    opt = Grokfast(INNER_OPTIMIZERS[inner](model.parameters()), nonfinite=nonfinite)
    train(model, opt, make_batches(3))
    before = snapshot(model, opt)
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    (nn.functional.mse_loss(model(x), y) * float("nan")).backward()
    if nonfinite == "error":
        with pytest.raises(NonFiniteGradientError):
            opt.step()
    else:
        opt.step()  # the whole step is skipped, fused inner optimizer or not
    assert_same(before, snapshot(model, opt))


NEURALGROK_CASES = [c for c in CASES if "neuralgrok" in c.id]


@pytest.mark.parametrize("case", NEURALGROK_CASES)
def test_nonfinite_gradient_is_refused_by_every_neuralgrok_stack_before_any_change(case):
    model, opt = build(case)
    train(model, opt, make_batches(3), case)
    before = snapshot(model, opt)
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model[2].weight.grad[0, 1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"parameter 2 \(shape \(3, 8\)\)"):
        opt.step()
    assert_same(before, snapshot(model, opt))
    assert torch.isnan(model[2].weight.grad[0, 1])  # the gradients are left as they were too


def _amplified_run(batches, nonfinite, g_hat, poison=()):
    model = make_model(0)
    torch.manual_seed(7)
    opt = AmplifiedOptimizer(INNER_OPTIMIZERS["adam"](model.parameters()), hidden=(8, 8),
                             meta_lr=1e-2, meta_every=2, g_hat=g_hat, nonfinite=nonfinite)
    mse = nn.functional.mse_loss
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        mse(model(x), y).backward()
        if i in poison:
            model[0].bias.grad[2] = float("-inf")
        opt.step()
        # called after a skipped step too, as a training loop would: nothing to do then
        opt.maybe_meta_step(model, lambda fwd: mse(fwd(x[::2] * 0.5), y[::2]),
                            None if g_hat == "last" else (lambda fwd: mse(fwd(x), y)))
    return snapshot(model, opt)


@pytest.mark.parametrize("bad_at", [0, 2, 3])
@pytest.mark.parametrize("g_hat", ["recompute", "last"])
def test_amplified_optimizer_skip_is_as_if_the_step_was_never_called(g_hat, bad_at):
    batches = make_batches(6)
    kept = batches[:bad_at] + batches[bad_at + 1:]
    skipped = _amplified_run(batches, "skip", g_hat, poison={bad_at})
    assert skipped["counters"]["meta_steps"] > 0
    assert_same(skipped, _amplified_run(kept, "error", g_hat))


@pytest.mark.parametrize("g_hat", ["recompute", "last"])
def test_amplified_optimizer_skip_equals_error_on_finite_gradients(g_hat):
    batches = make_batches(5)
    assert_same(_amplified_run(batches, "skip", g_hat), _amplified_run(batches, "error", g_hat))


def test_amplified_optimizer_rejects_an_unknown_nonfinite_mode():
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('error', 'skip'\), got 'ignore'"):
        AmplifiedOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), hidden=(4,),
                           nonfinite="ignore")


@pytest.mark.parametrize("case", [c for c in CASES if "neuralgrok" in c.id])
def test_grad_scaler_skip_leaves_amplifier_meta_state_and_counters_untouched(case):
    # The contract battery checks per-parameter state; the amplifier, its meta-optimizer
    # and the step counters live at the state_dict's top level.
    model, opt = build(case)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = make_batches(3)
    for batch in batches:
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(batch[0]), batch[1])).backward()
        scaler.step(opt)
        scaler.update()
        case.after_step(opt, model, batch)
    assert amplified(opt).meta_steps > 0
    before = snapshot(model, opt)
    x, y = batches[0]
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y) * float("nan")).backward()
    scaler.step(opt)
    scaler.update()
    assert_same(before, snapshot(model, opt))


# ---------------------------------------------------------------------------- missing grads, groups


class Holder(nn.Module):
    """The model plus extra parameters, so a meta-step finds every optimised parameter;
    the forward is the model's."""

    def __init__(self, model, *extra):
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList([p for m in extra for p in (m.parameters() if isinstance(m, nn.Module) else [m])])

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("case", CASES)
def test_parameters_without_gradient_keep_their_state(case):
    model, opt = build(case)
    train(model, opt, make_batches(2), case)
    frozen_before = {k: v for k, v in state_tensors(opt).items() if k.startswith(("2/", "3/"))}
    assert frozen_before  # the last layer's entries exist
    x, y = make_batches(1, seed=5)[0]
    for _ in range(2):
        opt.zero_grad()
        model[1](model[0](x)).pow(2).mean().backward()  # the last layer gets no gradient
        opt.step()
    after = state_tensors(opt)
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("case", CASES)
def test_add_param_group_mid_training_keeps_state_and_trains_the_new_group(case):
    model, opt = build(case)
    extra = nn.Linear(3, 3)
    batches = make_batches(4)
    train(model, opt, batches[:2], case)
    before = state_tensors(opt)
    amp_before = snapshot(model, opt)
    opt.add_param_group({"params": list(extra.parameters()), "lr": 1e-3})
    assert len(opt.param_groups) == 2
    for k, v in opt.param_groups[0].items():
        if k.startswith(("grokfast_", "neuralgrok_")):
            assert opt.param_groups[1][k] == v  # the wrapper's defaults filled in
    after = state_tensors(opt)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for k, v in amp_before.items():
        if k.startswith(("amp/", "meta/")):
            assert torch.equal(snapshot(model, opt)[k], v), k
    w0 = extra.weight.detach().clone()
    for x, y in batches[2:]:
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), y) + extra(model(x)).pow(2).mean()).backward()
        opt.step()
        if case.after_step is not None:
            case.after_step(opt, Holder(model, extra), (x, y))
    assert not torch.equal(extra.weight, w0)
    # the grown optimizer still round-trips
    sd = opt.state_dict()
    opt.load_state_dict(sd)


@pytest.mark.parametrize("case", CASES)
def test_empty_param_group_and_zero_size_parameters(case):
    model = make_model()
    empty = nn.Parameter(torch.zeros(0, 3))
    inner = torch.optim.Adam([{"params": list(model.parameters())}, {"params": [empty]}], lr=1e-2)
    opt = case.build(inner, model)
    opt.add_param_group({"params": []})
    batches = make_batches(3)
    for x, y in batches:
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), y) + empty.sum()).backward()
        opt.step()
        if case.after_step is not None:
            case.after_step(opt, Holder(model, empty), (x, y))
    assert empty.grad is not None and empty.grad.numel() == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.load_state_dict(opt.state_dict())
