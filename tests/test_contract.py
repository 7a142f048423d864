"""The shared contract battery: every wrapper x every inner optimizer (STYLE habit 4)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from contract import (
    INNER_OPTIMIZERS,
    WRAPPER_CASES,
    assert_same_params,
    make_batches,
    make_model,
    state_tensors,
    train,
)

CASES = [pytest.param(c, id=c.name) for c in WRAPPER_CASES]
INNERS = list(INNER_OPTIMIZERS)


def build(case, inner_name, seed=0, dtype=torch.float32):
    model = make_model(seed, dtype)
    opt = case.build(INNER_OPTIMIZERS[inner_name](model.parameters()), model)
    return model, opt


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_continues_exactly(case, inner):
    batches = make_batches(8)
    model_a, opt_a = build(case, inner)
    train(model_a, opt_a, batches, case)

    model_b, opt_b = build(case, inner)
    train(model_b, opt_b, batches[:4], case)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_c, opt_c = build(case, inner, seed=123)  # fresh objects, different init
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    train(model_c, opt_c, batches[4:], case)

    assert_same_params(model_a, model_c)
    sa, sc = state_tensors(opt_a), state_tensors(opt_c)
    assert sa.keys() == sc.keys()
    for key in sa:
        assert torch.equal(sa[key], sc[key]), key


@pytest.mark.parametrize("inner", ["sgd", "adamw-foreach"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_continue_identically(case, inner, how):
    batches = make_batches(6)
    model, opt = build(case, inner)
    train(model, opt, batches[:3], case)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, batches[3:], case)
    train(model2, opt2, batches[3:], case)
    assert_same_params(model, model2)


@pytest.mark.parametrize("case", CASES)
def test_scheduler_reaches_inner_optimizer_also_after_reload(case):
    model, opt = build(case, "adam")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, make_batches(1), case)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)

    saved = opt.state_dict()
    opt.load_state_dict(saved)
    sched.step()  # created before the reload: must still reach the inner optimizer
    inner = opt.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    assert inner.param_groups[0]["lr"] == pytest.approx(2.5e-3)

    model2, opt2 = build(case, "adam")
    opt2.load_state_dict(saved)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.1)
    train(model2, opt2, make_batches(1), case)
    sched2.step()
    inner2 = opt2.optimizer
    while hasattr(inner2, "optimizer"):
        inner2 = inner2.optimizer
    assert inner2.param_groups[0]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize("inner", ["sgd", "adam", "adamw-fused"])
@pytest.mark.parametrize("case", CASES)
def test_grad_scaler_skip_leaves_all_state_untouched(case, inner):
    model, opt = build(case, inner)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = make_batches(1)[0]
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = state_tensors(opt)

    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()

    for p, q in zip(model.parameters(), before_params):
        assert torch.equal(p, q)
    after_state = state_tensors(opt)
    assert after_state.keys() == before_state.keys()
    for key in before_state:
        assert torch.equal(after_state[key], before_state[key]), key
    assert scaler.get_scale() == 2.0**7  # the skip was seen and the scale backed off


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("case", CASES)
def test_none_grads_are_skipped(case, inner):
    model, opt = build(case, inner)
    frozen = model[2].weight
    x, y = make_batches(1)[0]
    for _ in range(3):
        opt.zero_grad()
        out = model[1](model[0](x))  # the last layer gets no gradient
        out.pow(2).mean().backward()
        opt.step()
    assert frozen.grad is None
    assert all(not k.startswith(("grokfast_", "neuralgrok_")) for k in opt.state_dict()["state"].get(2, {}))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_is_preserved(case, dtype):
    model, opt = build(case, "adamw-foreach", dtype=dtype)
    train(model, opt, make_batches(3, dtype=dtype), case)
    for p in model.parameters():
        assert p.dtype == dtype
        assert p.grad is None or p.grad.dtype == dtype
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("case", CASES)
def test_step_hooks_fire(case):
    model, opt = build(case, "sgd")
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(model, opt, make_batches(2), case)
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("case", CASES)
def test_is_an_optimizer_sharing_param_groups(case):
    model, opt = build(case, "adam")
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    opt.param_groups[0]["lr"] = 0.123
    inner = opt.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    assert inner.param_groups[0]["lr"] == 0.123


@pytest.mark.parametrize("case", CASES)
def test_rejects_state_dict_of_plain_optimizer(case):
    model, opt = build(case, "adam")
    plain = torch.optim.Adam(make_model().parameters())
    before = opt.state_dict()
    with pytest.raises(ValueError, match="not produced by"):
        opt.load_state_dict(plain.state_dict())
    assert opt.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("inner", ["sgd", "adamw-foreach", "adamw-fused"])
@pytest.mark.parametrize("case", CASES)
def test_transform_sees_unscaled_gradients_under_grad_scaler(case, inner):
    # A power-of-two scale is undone exactly by unscale_, so if the transform runs on the
    # unscaled gradients (inside step()), the scaled run equals the plain run bit for bit.
    batches = make_batches(5)
    model_a, opt_a = build(case, inner)
    train(model_a, opt_a, batches, case)
    model_b, opt_b = build(case, inner)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for batch in batches:
        x, y = batch
        opt_b.zero_grad()
        scaler.scale(nn.functional.mse_loss(model_b(x), y)).backward()
        scaler.step(opt_b)
        scaler.update()
        if case.after_step is not None:
            case.after_step(opt_b, model_b, batch)
    assert_same_params(model_a, model_b)
