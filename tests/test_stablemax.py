"""StableMax: closed forms, the direct formula in float64, extreme logits, gradients."""

from __future__ import annotations

import pytest
import torch

from grokopt import StableMaxCrossEntropyLoss, stablemax, stablemax_cross_entropy


def _s(x: torch.Tensor) -> torch.Tensor:
    """s(x) as the paper writes it, evaluated directly (fine for moderate logits)."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x))


def test_closed_form():
    # s(-1), s(0), s(1) = 1/2, 1, 2: probabilities 1/7, 2/7, 4/7.
    p = stablemax(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(p, torch.tensor([1, 2, 4], dtype=torch.float64) / 7)


@pytest.mark.parametrize("scale", [0.1, 3.0, 100.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_matches_the_direct_formula(scale, reduction):
    gen = torch.Generator().manual_seed(0)
    logits = scale * torch.randn(16, 11, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 11, (16,), generator=gen)
    s = _s(logits)
    per_sample = -torch.log(s[torch.arange(16), target] / s.sum(1))
    want = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    torch.testing.assert_close(stablemax_cross_entropy(logits, target, reduction), want,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(StableMaxCrossEntropyLoss(reduction)(logits, target), want,
                               rtol=1e-12, atol=1e-12)


def test_huge_logits_stay_finite_in_float32():
    logits = torch.tensor([[1e6, -1e6, 0.0], [-1e6, -1e6, 1e6], [1e30, -1e30, 3.0]],
                          requires_grad=True)
    target = torch.tensor([1, 2, 0])
    loss = stablemax_cross_entropy(logits, target, reduction="none")
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # The first two rows against the float64 direct formula.
    l64 = logits.detach()[:2].double()
    want = -torch.log(_s(l64)[torch.arange(2), target[:2]] / _s(l64).sum(1))
    torch.testing.assert_close(loss[:2].double(), want, rtol=1e-5, atol=1e-6)


def test_no_softmax_collapse_where_softmax_has_one():
    """A correct logit 200 above the rest: softmax's probability rounds to exactly 1 in
    float32 and its gradient vanishes; StableMax's is (201/203 - 1, 1/203, 1/203)."""
    logits = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0])
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    logits.grad = None
    stablemax_cross_entropy(logits, target).backward()
    want = torch.tensor([[201 / 203 - 1, 1 / 203, 1 / 203]]) * torch.tensor([[1 / 201, 1.0, 1.0]])
    torch.testing.assert_close(logits.grad, want)


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    logits[0, 0] = 0.0  # the seam of s, where both pieces meet with slope 1
    logits.requires_grad_(True)
    target = torch.randint(0, 4, (5,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: stablemax_cross_entropy(x, target), (logits,))


def test_single_sample_and_bad_input():
    x = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(stablemax_cross_entropy(x, torch.tensor(1), "none"),
                               torch.log(torch.tensor(1.5)))
    with pytest.raises(ValueError, match="reduction must be one of .*got 'avg'"):
        stablemax_cross_entropy(x[None], torch.tensor([1]), "avg")
    with pytest.raises(ValueError, match=r"target has shape \(2,\), expected \(1,\)"):
        stablemax_cross_entropy(x[None], torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="logits must be a float tensor"):
        stablemax_cross_entropy(torch.tensor([[1, 2]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="target must be an integer tensor"):
        stablemax_cross_entropy(x[None], torch.tensor([1.0]))
