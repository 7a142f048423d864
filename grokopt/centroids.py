"""Centroid diagnostics of GrokAlign (docs/methods.md), cheap enough to log every few steps.

For a piecewise-affine network the input Jacobian ``J_x`` is constant on the linear region
around ``x``, and ``mu_x = J_x^T 1`` (the input gradient of the summed logits, one backward
pass) is that region's centroid. How to read them:

* ``alignment = cos(mu_x, x)``: the paper's grokking signal. It rises towards 1 as the
  Jacobian rows align with the data point; a network that has grokked has aligned centroids,
  a memorising one does not.
* ``inner_product = <mu_x, x>``: for a bias-free ReLU network it equals the sum of the logits
  (positive homogeneity, ``J_x x = f(x)``), so it tracks the output scale.
* ``norm = ||mu_x||``: the Jacobian scale that GrokAlign's penalty shrinks.
* :func:`jacobian_pc1_share`: for each sample, the share of its Jacobian's energy along the
  first singular direction (``s_1^2 / sum s_i^2`` of the uncentred ``C x d`` Jacobian),
  averaged over the samples: near 1 each Jacobian is close to rank one (its rows align),
  ``1/min(C, d)`` when its singular values are all equal.

All diagnostics are computed without a graph and leave the model's mode untouched; call them
with the model in eval mode when it has dropout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .jacobian import (
    Model,
    _check_input,
    _check_model,
    _check_output,
    _grad_ready,
    _higher_order_attention,
    _pl_forward_record,
    _pl_reverse,
    _resolve_plan,
    check_samples_independent,
    is_piecewise_linear,
    per_sample_jacobian,
)

__all__ = ["CentroidStats", "centroid_alignment", "centroids", "jacobian_pc1_share"]


def centroids(model: Model, x: Tensor) -> Tensor:
    """Per-sample centroids ``mu_x = J_x^T 1``, shape ``(B, *in)``, detached.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from grokopt.centroids import centroids
        >>> net = nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        >>> centroids(net, torch.randn(2, 2))
        tensor([[ 9., 12.],
                [ 9., 12.]])
    """
    _check_model(model)
    _check_input(x)
    check_samples_independent(model)
    return _ones_vjp(model, x)[1].detach()


def _ones_vjp(model: Model, x: Tensor) -> tuple[Tensor, Tensor]:
    # The all-ones cotangent needs the output's shape, so the forward comes first and the
    # reverse pass reuses it; no graph is kept for the parameters.
    plan = _resolve_plan(model, None, x)
    if plan is not None:
        with torch.no_grad():
            out, tape = _pl_forward_record(plan, x)
            _check_output(out, x.shape[0])
            return out, _pl_reverse(tape, torch.ones_like(out).unsqueeze(0))[0]
    x_ = _grad_ready(x.detach())
    with torch.enable_grad(), _higher_order_attention():
        out = model(x_)
        _check_output(out, x.shape[0])
        (g,) = torch.autograd.grad(out, x_, torch.ones_like(out), allow_unused=True)
    if g is None:
        raise ValueError("the model output does not depend on x")
    return out.detach(), g


class CentroidStats(NamedTuple):
    """Per-sample centroid diagnostics (``(B,)`` tensors) and their batch means (floats).

    Returned by :func:`centroid_alignment`.

    Example:
        >>> import torch
        >>> from grokopt import centroid_alignment
        >>> stats = centroid_alignment(torch.nn.Linear(4, 2, bias=False), torch.randn(8, 4))
        >>> stats.alignment.shape, isinstance(stats.mean_alignment, float)
        (torch.Size([8]), True)
    """

    alignment: Tensor
    inner_product: Tensor
    norm: Tensor
    mean_alignment: float
    mean_inner_product: float
    mean_norm: float


def centroid_alignment(model: Model, x: Tensor) -> CentroidStats:
    """Centroid alignment ``cos(mu_x, x)``, ``<mu_x, x>`` and ``||mu_x||`` (one backward pass).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from grokopt.centroids import centroid_alignment
        >>> net = nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        >>> stats = centroid_alignment(net, torch.tensor([[0.5, 1.0], [1.5, -0.5]]))
        >>> [round(a, 5) for a in stats.alignment.tolist()]
        [0.98387, 0.31623]
    """
    mu = centroids(model, x).flatten(1)
    xf = x.detach().flatten(1).to(mu.dtype)
    inner = (mu * xf).sum(1)
    norm = mu.norm(dim=1)
    align = inner / (norm * xf.norm(dim=1)).clamp_min(1e-12)
    return CentroidStats(
        align, inner, norm, float(align.mean()), float(inner.mean()), float(norm.mean())
    )


def jacobian_pc1_share(model: Model, x: Tensor) -> float:
    """The paper's PC1 share: the mean over samples of ``s_1^2 / sum_i s_i^2``.

    ``s_i`` are the singular values of one sample's uncentred Jacobian (``C x d``, outputs
    by inputs), so each sample's share lies in ``[1/min(C, d), 1]``; the mean is over the
    samples of ``x`` (a small batch: this computes each Jacobian exactly). A sample whose
    Jacobian is zero (a dead ReLU region) has no first direction and is left out of the
    mean; if every one is zero the result is NaN. Pooling all samples' rows and centring
    them would be a different statistic.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from grokopt.centroids import jacobian_pc1_share
        >>> net = nn.Linear(2, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
        >>> round(jacobian_pc1_share(net, torch.randn(4, 2)), 4)  # rank-one Jacobian
        1.0
    """
    _check_model(model)
    _check_input(x)
    with torch.no_grad() if is_piecewise_linear(model) else torch.enable_grad():
        _, jac = per_sample_jacobian(model, x.detach())
    B = x.shape[0]
    d = x[0].numel()
    s2 = torch.linalg.svdvals(jac.detach().reshape(B, -1, d).double()).pow(2)  # (B, min(C, d))
    total = s2.sum(-1)
    defined = total > 0
    if not bool(defined.any()):
        return math.nan
    return float((s2[defined, 0] / total[defined]).mean())
