"""Mixed precision: bf16 parameters keep fp32 wrapper state; CPU autocast with every wrapper
and with GrokAlignLoss. (GradScaler's skip: tests/test_contract.py and tests/test_faults.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from contract import INNER_OPTIMIZERS, WRAPPER_CASES, make_batches, make_model, mse
from grokopt import GrokAlignLoss, _nonfinite
from grokopt.jacobian import jacobian_frobenius_norm

CASES = [pytest.param(c, id=c.name) for c in WRAPPER_CASES]


def _wrapper_tensors(opt):
    for entries in opt.state_dict()["state"].values():
        for key, value in entries.items():
            if key.startswith(("grokfast_", "neuralgrok_")) and isinstance(value, torch.Tensor):
                yield key, value


@pytest.mark.parametrize("case", CASES)
def test_bf16_parameters_keep_filter_state_in_fp32(case):
    model = make_model(0, torch.bfloat16)
    opt = case.build(INNER_OPTIMIZERS["adamw-foreach"](model.parameters()), model)
    for batch in make_batches(3, dtype=torch.bfloat16):
        opt.zero_grad()
        mse(model(batch[0]), batch[1]).backward()
        opt.step()
        if case.after_step is not None:
            case.after_step(opt, model, batch)
    for key, value in _wrapper_tensors(opt):
        # The low-pass filters accumulate: fp32. A stored raw gradient keeps its dtype.
        expected = torch.bfloat16 if key == "neuralgrok_last_grad" else torch.float32
        assert value.dtype == expected, key
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("case", CASES)
def test_cpu_autocast_training_follows_the_fp32_run(case):
    """Under autocast the matmuls run in bf16 (8 significant bits: relative error ~4e-3 per
    product), the parameters and the wrapper state stay fp32. Three steps of lr 1e-2 move
    each weight by ~3e-2, so the autocast run must agree with the fp32 run to a small
    fraction of that move: atol 5e-3 (and it must have moved away from the init)."""
    runs = {}
    # OrthoGrad removes most of a gradient (its part along w), leaving entries near zero
    # whose sign bf16 noise can flip (measured: 2.0e-5 in fp32, -8.6e-5 under autocast);
    # Adam's first step is lr * sign(g), so one such entry moves 2 lr apart. SGD's step is
    # proportional to g and keeps the comparison meaningful for it.
    inner = "sgd" if case.name.startswith("orthograd") else "adam"
    for mode in ("fp32", "autocast"):
        model = make_model(0)
        init = [p.detach().clone() for p in model.parameters()]
        opt = case.build(INNER_OPTIMIZERS[inner](model.parameters()), model)
        for batch in make_batches(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                out = model(batch[0])
            assert out.dtype == (torch.bfloat16 if mode == "autocast" else torch.float32)
            nn.functional.mse_loss(out.float(), batch[1]).backward()
            opt.step()
            if case.after_step is not None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                    case.after_step(opt, model, batch)
        runs[mode] = [p.detach().clone() for p in model.parameters()]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for _, value in _wrapper_tensors(opt):
            assert value.dtype == torch.float32
    for a, b, p0 in zip(runs["fp32"], runs["autocast"], init):
        assert not torch.equal(a, p0)
        torch.testing.assert_close(b, a, atol=5e-3, rtol=0)


@pytest.mark.parametrize("estimator", ["vjp", "jvp", "exact"])
def test_grokalign_under_cpu_autocast(estimator):
    """The penalty under autocast is finite, differentiable, and close to fp32's: bf16
    matmuls (relative error ~4e-3 each, two layers) give a norm within a few percent; with
    the same probes (same generator seed) rtol 5e-2 is a loose but meaningful bound."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    values = {}
    for mode in ("fp32", "autocast"):
        reg = GrokAlignLoss(model, weight=1.0, estimator=estimator, num_projections=2,
                            generator=torch.Generator().manual_seed(1))
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            penalty = reg(x)
        assert torch.isfinite(penalty)
        penalty.float().backward()
        # (the last bias does not enter the input Jacobian: no gradient)
        assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32
                   for p in model.parameters() if p.grad is not None)
        values[mode] = penalty.detach().float()
    torch.testing.assert_close(values["autocast"], values["fp32"], rtol=5e-2, atol=0)


class _NormalDtypes(TorchDispatchMode):
    """Records the dtype of every tensor that torch's normal_ fills."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.normal_.default:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["vjp", "jvp"])
@pytest.mark.parametrize("seeded", [True, False])
def test_half_precision_probes_are_the_float32_draw_rounded(dtype, estimator, seeded):
    """Probes for fp16 / bf16 tensors are drawn in float32 and rounded: torch's own
    half-precision normal_ draws another stream than float32's (2.5: all of it; 2.13: the
    last 16 values of a draw of 17 or more whose length is not a multiple of 16), and the
    same seed gave other probes, a penalty 6-15% away from float32's under autocast on 2.5.
    Every draw is watched (its dtype must be float32), and the half-precision norms must be
    float32's to half precision (2 x 5 x 7 input and 2 x 5 x 4 output probes: lengths
    that are not multiples of 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 4))
    half = copy.deepcopy(model).to(dtype)  # a half model: the input probes are half too
    x = torch.randn(5, 7)

    def penalty(m, inp):
        gen = torch.Generator().manual_seed(1) if seeded else None
        torch.manual_seed(3)
        return jacobian_frobenius_norm(m, inp, estimator=estimator, num_projections=2,
                                       generator=gen).norms

    with _NormalDtypes() as watch:
        got = penalty(half, x.to(dtype))
    assert watch.dtypes and all(d == torch.float32 for d in watch.dtypes), watch.dtypes
    want = penalty(model, x)
    # a half forward of the same probes: within half precision of float32's norms
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=0)


def _float64_run(case, default):
    """Three steps of ``case`` on a float64 model, with ``default`` as torch's default
    dtype; the parameters after them. (The model and data are made first: under another
    default, initialisation draws other numbers.)"""
    model = make_model(0, torch.float64)
    batches = make_batches(3, dtype=torch.float64)
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        opt = case.build(INNER_OPTIMIZERS["adam"](model.parameters()), model)
        for batch in batches:
            opt.zero_grad()
            mse(model(batch[0]), batch[1]).backward()
            opt.step()
            if case.after_step is not None:
                case.after_step(opt, model, batch)
        return [p.detach().clone() for p in model.parameters()]
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("case", CASES)
def test_float64_default_dtype_changes_nothing(case):
    """``torch.set_default_dtype(torch.float64)`` (common in grokking studies) must not
    break a step or change its result: the run on a float64 model is the same as with the
    float32 default."""
    expected = _float64_run(case, torch.float32)
    _nonfinite._ONES.clear()  # the screen's cached scale is made anew under float64
    got = _float64_run(case, torch.float64)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.dtype == torch.float64 for p in got)


def test_grokalign_float64_default_dtype_changes_nothing():
    out = {}
    for default in (torch.float32, torch.float64):
        model = make_model(0, torch.float64)
        x = make_batches(1, dtype=torch.float64)[0][0]
        before = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            reg = GrokAlignLoss(model, weight=1.0, generator=torch.Generator().manual_seed(3))
            out[default] = reg(x).detach()
        finally:
            torch.set_default_dtype(before)
    assert out[torch.float64].dtype == torch.float64
    torch.testing.assert_close(out[torch.float64], out[torch.float32], rtol=0, atol=0)
