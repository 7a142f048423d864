"""The shared contract battery: every wrapper x every inner optimizer (STYLE habit 4)."""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from contract import (
    assert_same_state,
    INNER_OPTIMIZERS,
    WRAPPER_CASES,
    assert_same_params,
    make_batches,
    make_model,
    optimizer_stack,
    state_tensors,
    train,
    per_param,
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
    assert_same_state(opt_a, opt_c)


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
        scaled = [p.grad.clone() for p in model_b.parameters()]
        scaler.step(opt_b)
        # what a bare optimizer leaves: the gradient unscale_ wrote, untransformed
        for p, g in zip(model_b.parameters(), scaled):
            assert torch.equal(p.grad, g / 2.0**10)
        scaler.update()
        if case.after_step is not None:
            case.after_step(opt_b, model_b, batch)
    assert_same_params(model_a, model_b)


# ---------------------------------------------------------------- the torch.optim contract (issue 12)


@pytest.mark.parametrize("inner", INNERS)
@pytest.mark.parametrize("case", CASES)
def test_grad_after_step_is_the_users_or_the_transformed_one(case, inner):
    """restore_grad=True (default): p.grad after step() is the tensor backward produced,
    bit for bit. False: it is what the inner optimizer stepped on (captured by a hook on
    the innermost optimizer). Both modes train identically."""
    batches = make_batches(4)
    finals = {}
    for restore in (True, False):
        model, opt = build(case, inner)
        opt.restore_grad = restore  # the outermost wrapper decides for the stack
        seen = []
        optimizer_stack(opt)[-1].register_step_pre_hook(
            lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()])
        )
        for batch in batches:
            x, y = batch
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            users = [(p.grad, p.grad.clone()) for p in model.parameters()]
            opt.step()
            for p, (obj, raw), stepped in zip(model.parameters(), users, seen[-1]):
                if restore:
                    assert p.grad is obj and torch.equal(p.grad, raw)
                else:
                    assert torch.equal(p.grad, stepped)
            if case.after_step is not None:
                case.after_step(opt, model, batch)
        assert len(seen) == len(batches)
        finals[restore] = model
    assert_same_params(finals[True], finals[False])


@pytest.mark.parametrize("case", CASES)
def test_restore_grad_is_a_validated_constructor_keyword_kept_out_of_state(case):
    model, opt = build(case, "adam")
    for wrapper in optimizer_stack(opt)[:-1]:
        param = inspect.signature(type(wrapper)).parameters.get("restore_grad")
        assert param is not None and param.default is True and param.kind is param.KEYWORD_ONLY
        inner = torch.optim.Adam(make_model().parameters())
        before = [dict(g) for g in inner.param_groups]
        with pytest.raises(TypeError, match=r"restore_grad must be a bool, got str: 'no'"):
            type(wrapper)(inner, restore_grad="no")
        assert [dict(g) for g in inner.param_groups] == before
    train(model, opt, make_batches(1), case)
    assert "restore_grad" not in repr(opt.state_dict())


@pytest.mark.parametrize("case", CASES)
def test_global_step_hooks_fire_once_per_step_with_the_wrapper(case):
    model, opt = build(case, "sgd")
    stack = optimizer_stack(opt)
    calls, inner_calls = [], []
    handles = [
        register_optimizer_step_pre_hook(
            lambda o, a, k: calls.append(("pre", o))),
        register_optimizer_step_post_hook(
            lambda o, a, k: calls.append(("post", o))),
    ]
    # hooks a user registered on the inner optimizer still fire, once per step
    stack[-1].register_step_pre_hook(lambda o, a, k: inner_calls.append("pre"))
    stack[-1].register_step_post_hook(lambda o, a, k: inner_calls.append("post"))
    try:
        train(model, opt, make_batches(3), case)
    finally:
        for h in handles:
            h.remove()
    # a meta-optimizer's own steps are steps of another optimizer: left out here
    ours = [(kind, o) for kind, o in calls if any(o is s for s in stack)]
    assert ours == [("pre", opt), ("post", opt)] * 3
    assert inner_calls == ["pre", "post"] * 3


@pytest.mark.parametrize("case", CASES)
def test_state_dict_hooks_run_as_in_torch(case):
    model, opt = build(case, "adamw-foreach")
    train(model, opt, make_batches(2), case)
    order = []

    def pre(o):
        order.append("pre")
        o.state["test"] = 1  # a non-parameter key, as torch's own hook test writes

    def post(o, sd):
        order.append("post")
        assert sd["state"]["test"] == 1 and "grokopt_stack" in sd
        return {**sd, "ran_post": True}  # a new dict: it must be what state_dict returns

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert order == ["pre", "post"] and sd["ran_post"] is True and sd["state"]["test"] == 1


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_hooks_run_as_in_torch(case):
    model, opt = build(case, "adam")
    train(model, opt, make_batches(2), case)
    saved = opt.state_dict()
    model2, opt2 = build(case, "adam", seed=5)
    order = []

    def pre_in_place(o, sd):
        order.append("pre1")
        sd["param_groups"][0]["lr"] = 0.002  # a shallow copy: the caller's dict is not this

    def pre_returns(o, sd):
        order.append("pre2")
        assert sd["param_groups"][0]["lr"] == 0.002
        new = copy.deepcopy(sd)
        new["param_groups"][0]["lr"] = 0.003
        return new

    def post(o):
        order.append("post")
        # everything is loaded when it runs
        assert o.param_groups[0]["lr"] == 0.003
        assert state_tensors(o).keys() == state_tensors(opt).keys()
        o.state["ran_post"] = True

    lr_saved = saved["param_groups"][0]["lr"]
    opt2.register_load_state_dict_pre_hook(pre_in_place)
    opt2.register_load_state_dict_pre_hook(pre_returns)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(saved)
    assert order == ["pre1", "pre2", "post"]
    assert opt2.state["ran_post"] is True
    # torch changes a group of its shallow copy; that group is the caller's too
    assert saved["param_groups"][0]["lr"] == 0.002 != lr_saved
    inner = optimizer_stack(opt2)[-1]
    assert inner.param_groups[0]["lr"] == 0.003


@pytest.mark.parametrize("inner", ["sgd", "adamw-fused"])
@pytest.mark.parametrize("case", CASES)
def test_non_parameter_state_keys_pass_through_and_round_trip(case, inner):
    model, opt = build(case, inner)
    train(model, opt, make_batches(2), case)
    stack = optimizer_stack(opt)
    opt.state["my_counter"] = 3
    stack[-1].state["inner_note"] = "kept"  # one of the inner optimizer's own
    sd = opt.state_dict()
    assert sd["state"]["my_counter"] == 3 and sd["state"]["inner_note"] == "kept"

    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    model2, opt2 = build(case, inner, seed=9)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    stack2 = optimizer_stack(opt2)
    assert opt2.state["my_counter"] == 3 and stack2[-1].state["inner_note"] == "kept"
    # each back where it was, and nowhere else
    assert all("my_counter" not in o.state for o in stack2[1:])
    assert all("inner_note" not in o.state for o in stack2[:-1])
    a, b = state_tensors(opt), state_tensors(opt2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", CASES)
def test_a_non_parameter_key_that_collides_is_refused_by_name(case):
    model, opt = build(case, "adam")
    train(model, opt, make_batches(1), case)
    optimizer_stack(opt)[-1].state["shared"] = 1
    opt.state["shared"] = 2
    with pytest.raises(ValueError, match=r"under 'shared', which is also a key of the inner"):
        opt.state_dict()
    del opt.state["shared"]
    opt.state[0] = "x"  # a parameter index
    with pytest.raises(ValueError, match=r"under 0, which is also a parameter index"):
        opt.state_dict()


@pytest.mark.parametrize("case", CASES)
def test_a_scheduler_built_on_the_inner_optimizer_sees_its_steps(case):
    # The scheduler patches the inner optimizer's step to record that it ran; stepping the
    # inner optimizer without the global hooks must still record it, or the scheduler warns
    # that it was stepped first.
    model = make_model(0)
    inner = INNER_OPTIMIZERS["adam"](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    opt = case.build(inner, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, make_batches(1), case)
        sched.step()
    assert optimizer_stack(opt)[-1].param_groups[0]["lr"] == pytest.approx(5e-3)


def _nested(case):
    model = make_model()
    return len(optimizer_stack(case.build(torch.optim.SGD(model.parameters(), lr=0.1), model))) > 2


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in WRAPPER_CASES if _nested(c)])
def test_nested_wrappers_share_the_outermost_scratch_copy(case):
    """In a stack only the outermost wrapper copies the gradients: the wrappers inside
    transform its copies in place, so the whole stack costs one gradient-sized buffer."""
    model, opt = build(case, "sgd")
    stack = optimizer_stack(opt)
    seen = {}
    def record(o, args, kwargs):
        seen[id(o)] = [p.grad.data_ptr() for p in model.parameters()]

    for o in stack[1:]:
        o.register_step_pre_hook(record)
    x, y = make_batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    users = [p.grad.data_ptr() for p in model.parameters()]
    opt.step()
    copies = [seen[id(o)] for o in stack[1:]]
    assert all(c == copies[0] for c in copies)  # the same tensors all the way in
    assert all(a != b for a, b in zip(copies[0], users))  # and not the user's
    assert [p.grad.data_ptr() for p in model.parameters()] == users


# ---------------------------------------------------------------- state view, flattened DCP


@pytest.mark.parametrize("inner", ["sgd", "adam", "adamw-fused"])
@pytest.mark.parametrize("case", CASES)
def test_state_view_shows_every_entry_where_it_is_stored(case, inner):
    """``opt.state[p]`` holds the innermost optimizer's entries (the very objects) and every
    wrapper's under its prefix; it is exactly what the state_dict saves per parameter; and
    writing through it (the "move the state to a device" loop) reaches the storage."""
    model, opt = build(case, inner)
    train(model, opt, make_batches(3), case)
    stack = optimizer_stack(opt)
    base = stack[-1]
    sd = opt.state_dict()
    index = {id(p): i for i, p in enumerate(model.parameters())}
    for p in model.parameters():
        view = opt.state[p]
        for key, value in base.state.get(p, {}).items():
            assert view[key] is value, key
        for wrapper in stack[:-1]:
            for key, value in wrapper.own_state.get(p, {}).items():
                assert view[wrapper._prefix + key] is value
        saved = sd["state"].get(index[id(p)], {})
        assert set(view) == set(saved)
        # the per-parameter entries are the stored objects themselves (the wrapper-wide
        # ones are built on request, as a module's state_dict is)
        own = per_param(sd).get(index[id(p)], {})
        assert all(view[k] is own[k] for k in own if isinstance(own[k], torch.Tensor))
        assert all(torch.equal(torch.as_tensor(view[k]), torch.as_tensor(saved[k])) for k in saved)
    twin_model, twin = build(case, inner)
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    moved = 0
    for state in opt.state.values():
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor):
                state[key] = value.clone()  # what .to(device) hands back on another device
                moved += 1
                assert state[key] is not value
    assert moved == _count_tensors(opt.state_dict()["state"])  # the wrapper-wide ones too
    for p in model.parameters():
        for key, value in base.state.get(p, {}).items():
            assert opt.state[p][key] is value  # the storage holds the new objects
    batches = make_batches(3, seed=9)
    train(model, opt, batches, case)
    train(twin_model, twin, batches, case)
    assert_same_params(model, twin_model)


@pytest.mark.parametrize("inner", ["sgd", "adamw-foreach", "adamw-fused"])
@pytest.mark.parametrize("case", CASES)
def test_flattened_dcp_state_dict_round_trip_continues_exactly(case, inner):
    """get_optimizer_state_dict / set_optimizer_state_dict with
    flatten_optimizer_state_dict=True (torchtitan's layout) into fresh objects: continuing
    equals never stopping, bit for bit, and nothing is stored twice."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    batches = make_batches(8)
    model_a, opt_a = build(case, inner)
    train(model_a, opt_a, batches, case)

    model_b, opt_b = build(case, inner)
    train(model_b, opt_b, batches[:4], case)
    flat = copy.deepcopy(get_optimizer_state_dict(model_b, opt_b, options=options))
    assert all(not isinstance(v, dict) for v in flat.values())  # really the flat layout
    # each saved tensor once: as many as the state_dict's state holds, none in the groups
    assert sum(isinstance(v, torch.Tensor) for v in flat.values()) == _count_tensors(
        opt_b.state_dict()["state"])
    assert not any(isinstance(v, (bytes, torch.Tensor)) for k, v in flat.items()
                   if k.startswith("param_groups."))

    model_c, opt_c = build(case, inner, seed=123)
    model_c.load_state_dict(model_b.state_dict())
    set_optimizer_state_dict(model_c, opt_c, flat, options=options)
    train(model_c, opt_c, batches[4:], case)
    assert_same_params(model_a, model_c)
    assert_same_state(opt_a, opt_c)


def _count_tensors(tree) -> int:
    if isinstance(tree, dict):
        return sum(_count_tensors(v) for v in tree.values())
    return int(isinstance(tree, torch.Tensor))
