"""The diagnostics: centroids, centroid alignment and the PC1 share against closed forms and
brute-force Jacobians; Absolute Gradient Entropy against closed forms, the scaling law, brute
force, and its inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from grokopt.diagnostics import absolute_gradient_entropy as age
from grokopt.diagnostics import centroid_alignment, centroids, jacobian_pc1_share

DT = torch.float64


def mlp():
    """Bias-free ReLU MLP: piecewise linear and positively homogeneous."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10, bias=False), nn.ReLU(), nn.Linear(10, 10, bias=False), nn.ReLU(), nn.Linear(10, 4, bias=False)
    ).to(DT)


def smooth():
    """Not piecewise linear: the torch.func / autograd path."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 4)).to(DT)


def linear_map():
    """x -> W x with W = [[1, 2], [3, 4], [5, 6]]: J = W everywhere, J^T 1 = (9, 12)."""
    lin = nn.Linear(2, 3, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=DT))
    return nn.Sequential(lin)


# ---------------------------------------------------------------- Absolute Gradient Entropy


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


# ---------------------------------------------------------------- centroid diagnostics


def test_centroid_closed_forms():
    f = linear_map()
    x = torch.tensor([[0.5, 1.0], [1.5, -0.5]], dtype=DT)
    torch.testing.assert_close(centroids(f, x), torch.tensor([[9.0, 12.0], [9.0, 12.0]], dtype=DT))
    stats = centroid_alignment(f, x)
    assert stats.alignment.tolist() == pytest.approx([0.98387, 0.31623], abs=5e-6)
    torch.testing.assert_close(stats.alignment, torch.tensor([16.5 / (15 * math.sqrt(1.25)), 7.5 / (15 * math.sqrt(2.5))], dtype=DT))
    torch.testing.assert_close(stats.inner_product, torch.tensor([16.5, 7.5], dtype=DT))
    torch.testing.assert_close(stats.norm, torch.full((2,), 15.0, dtype=DT))
    assert stats.mean_norm == pytest.approx(15.0)


@pytest.mark.parametrize("fast", [True, False])
def test_centroids_of_a_bias_free_relu_net(fast):
    model = mlp()
    wrapped = model if fast else (lambda v: model(v))
    x = torch.randn(6, 6, dtype=DT)
    stats = centroid_alignment(wrapped, x)
    torch.testing.assert_close(stats.inner_product, model(x).sum(1).detach())
    J = torch.stack([torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[b]) for b in range(6)])
    torch.testing.assert_close(centroids(wrapped, x), J.sum(1))


def _pc1_brute(model, x):
    """Per sample: the singular values of its own (uncentred) Jacobian; then the mean."""
    shares = []
    for b in range(x.shape[0]):
        Jb = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[b]).reshape(-1, x[b].numel())
        s = torch.linalg.svdvals(Jb)
        shares.append(float(s[0] ** 2 / (s**2).sum()))
    return sum(shares) / len(shares)


def test_pc1_share_closed_forms():
    rank_one = nn.Sequential(nn.Linear(2, 3, bias=False)).to(DT)
    with torch.no_grad():
        rank_one[0].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=DT))
    assert jacobian_pc1_share(rank_one, torch.randn(4, 2, dtype=DT)) == pytest.approx(1.0)
    # W^T W = [[35, 44], [44, 56]]: eigenvalues (91 +- sqrt(8185)) / 2, so s_1^2 / ||W||^2 is
    # (91 + sqrt(8185)) / 182 = 0.997093 (centring the rows first would give exactly 1).
    assert jacobian_pc1_share(linear_map(), torch.randn(4, 2, dtype=DT)) == pytest.approx((91 + math.sqrt(8185)) / 182, rel=1e-12)
    iso = nn.Sequential(nn.Linear(2, 4, bias=False)).to(DT)
    with torch.no_grad():
        iso[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=DT))
    assert jacobian_pc1_share(iso, torch.randn(3, 2, dtype=DT)) == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("model_fn", [mlp, smooth])
def test_pc1_share_is_the_per_sample_mean(model_fn):
    """Against per-sample SVDs of brute-force Jacobians; on a ReLU MLP this differs from the
    pooled, centred statistic, so the test tells the two apart."""
    model = model_fn()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    got = jacobian_pc1_share(model, x)
    assert got == pytest.approx(_pc1_brute(model, x), rel=1e-10)
    J = torch.stack([torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[b]) for b in range(5)])
    rows = J.reshape(-1, 6)
    s = torch.linalg.svdvals(rows - rows.mean(0))
    assert abs(got - float(s[0] ** 2 / (s**2).sum())) > 0.05


def test_pc1_share_leaves_out_zero_jacobians():
    """A bias-free ReLU net at x = 0 has J = 0 (no direction): such samples are left out."""
    model = mlp()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    x[1] = 0.0
    keep = [0, 2, 3]
    assert jacobian_pc1_share(model, x) == pytest.approx(_pc1_brute(model, x[keep]), rel=1e-10)
    assert math.isnan(jacobian_pc1_share(model, torch.zeros(2, 6, dtype=DT)))
