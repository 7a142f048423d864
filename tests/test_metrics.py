"""Absolute Gradient Entropy: closed forms, the scaling law, brute force, inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from grokopt.metrics import absolute_gradient_entropy as age


def brute_force(tensors):
    total = 0.0
    for t in tensors:
        for v in t.double().flatten().tolist():
            total -= 0.0 if v == 0 else abs(v) * math.log(abs(v))
    return total


def test_closed_forms():
    assert age([torch.tensor([0.5, -0.5])]).item() == pytest.approx(math.log(2), rel=1e-7)
    for n in (1, 3, 100):  # n entries of 1/n: ln n
        assert age([torch.full((n,), 1.0 / n, dtype=torch.float64)]).item() == pytest.approx(math.log(n), rel=1e-12)
    assert age([torch.zeros(5), torch.tensor([1.0, -1.0])]).item() == 0.0  # 0 ln 0 = 1 ln 1 = 0
    assert age([torch.tensor([math.e], dtype=torch.float64)]).item() == pytest.approx(-math.e, rel=1e-15)
    assert age([]).item() == 0.0


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5, allow_nan=False, allow_infinity=False), min_size=1, max_size=30),
    split=st.integers(0, 30),
    s=st.floats(1e-3, 1e3),
)
def test_matches_brute_force_and_the_scaling_law(values, split, s):
    g = torch.tensor(values, dtype=torch.float64)
    parts = [g[:split], g[split:]]
    value = age(parts).item()
    assert value == pytest.approx(brute_force(parts), rel=1e-12, abs=1e-12)
    # not scale invariant: AGE(s g) = s AGE(g) - s ln(s) sum|g|
    scaled = age([s * g]).item()
    expected = s * value - s * math.log(s) * g.abs().sum().item()
    assert scaled == pytest.approx(expected, rel=1e-9, abs=1e-9 * s * (1 + abs(math.log(s))) * (1 + g.abs().sum().item()))


def test_parameters_use_their_gradients_and_modules_their_parameters():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 0.5)
    # bias has no gradient: skipped
    expected = 6 * -0.5 * math.log(0.5)
    assert age(model).item() == pytest.approx(expected, rel=1e-6)
    assert age(model.parameters()).item() == pytest.approx(expected, rel=1e-6)
    assert age([model.weight, torch.tensor([0.5])]).item() == pytest.approx(expected - 0.5 * math.log(0.5), rel=1e-6)
    assert age(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(TypeError, match="params_or_tensors"):
        age([1.0, 2.0])


def test_dtypes_and_no_graph():
    bf = torch.tensor([0.5, -0.5], dtype=torch.bfloat16)
    out = age([bf])
    assert out.dtype == torch.float32 and out.item() == pytest.approx(math.log(2), rel=1e-6)
    out64 = age([bf, torch.tensor([0.25], dtype=torch.float64)])
    assert out64.dtype == torch.float64
    x = torch.tensor([0.3, 0.2], requires_grad=True)
    assert not age([x]).requires_grad
