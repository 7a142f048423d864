"""EGD: the polar factor against (G G^T)^(-1/2) G by eigendecomposition, and the wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contract import make_batches, make_model, params_of, train
from grokopt import EGD
from grokopt.egd import polar_factor


def _inverse_sqrt_formula(g: torch.Tensor) -> torch.Tensor:
    """(G G^T)^(-1/2) G via an eigendecomposition of the Gram matrix (full row rank)."""
    g = g.double()
    wide = g.shape[0] <= g.shape[1]
    a = g if wide else g.T
    evals, evecs = torch.linalg.eigh(a @ a.T)
    out = evecs @ torch.diag(evals.rsqrt()) @ evecs.T @ a
    return out if wide else out.T


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (12, 5)])
@pytest.mark.parametrize("method", ["svd", "newton-schulz"])
def test_polar_factor_matches_the_formula(shape, method):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    out = polar_factor(g, method=method, ns_steps=60)
    torch.testing.assert_close(out, _inverse_sqrt_formula(g), rtol=1e-9, atol=1e-9)
    # every singular value 1
    torch.testing.assert_close(torch.linalg.svdvals(out), torch.ones(min(shape), dtype=torch.float64))


def test_newton_schulz_default_steps_reach_float32_accuracy_on_a_moderate_spread():
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    s = torch.logspace(0, -1, 16)  # singular values spread over one decade
    g = u[:, :16] @ torch.diag(s) @ v.T
    torch.testing.assert_close(polar_factor(g, method="newton-schulz"), u[:, :16] @ v.T,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_is_kept(dtype):
    g = torch.randn(5, 3).to(dtype)
    assert polar_factor(g).dtype == dtype


def _train(builder, steps=4):
    model = make_model(0, torch.float64)
    opt = builder(model.parameters())
    train(model, opt, make_batches(steps, dtype=torch.float64))
    return opt, params_of(model)


def test_wrapper_replaces_matrices_and_leaves_vectors():
    class Manual(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.ndim == 2:
                        p.grad.copy_(_inverse_sqrt_formula(p.grad))
            return super().step(closure)

    _, ours = _train(lambda p: EGD(torch.optim.SGD(p, lr=0.05)))
    _, ref = _train(lambda p: Manual(p, lr=0.05))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_disabled_group_steps_as_the_bare_optimizer():
    def builder(p):
        opt = EGD(torch.optim.SGD(p, lr=0.05, momentum=0.9))
        for group in opt.param_groups:
            group["egd_enabled"] = False
        return opt

    _, ours = _train(builder)
    _, bare = _train(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    for a, b in zip(ours, bare):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(method="qr"), r"method must be one of \('svd', 'newton-schulz'\), got 'qr'"),
    (dict(ns_steps=0), "ns_steps must be an int >= 1, got 0"),
    (dict(ns_steps=2.5), "ns_steps must be an int >= 1, got float: 2.5"),
])
def test_bad_options_are_refused(kwargs, match):
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError if kwargs.get("ns_steps") == 2.5 else ValueError, match=match):
        EGD(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_polar_factor_needs_a_matrix():
    with pytest.raises(ValueError, match=r"g must be a 2-D tensor, got shape \(3,\)"):
        polar_factor(torch.zeros(3))
