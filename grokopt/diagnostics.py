"""Grokking diagnostics cheap enough to log every few steps (docs/methods.md).

The centroid diagnostics of GrokAlign, from one reverse pass of :func:`grokopt.jacobian.vjp`
(or, for the PC1 share, from exact per-sample Jacobians), and NeuralGrok's Absolute Gradient
Entropy of a model's gradients.

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

* :func:`absolute_gradient_entropy`: ``-sum_i |g_i| ln |g_i|`` over all gradient entries.

The centroid diagnostics are computed without a graph and leave the model's mode untouched;
call them with the model in eval mode when it has dropout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from ._checks import check_batch, check_model
from .jacobian import Model, is_piecewise_linear, per_sample_jacobian, vjp

__all__ = [
    "CentroidStats",
    "absolute_gradient_entropy",
    "centroid_alignment",
    "centroids",
    "jacobian_pc1_share",
]


def centroids(model: Model, x: Tensor) -> Tensor:
    """Per-sample centroids ``mu_x = J_x^T 1``, shape ``(B, *in)``, detached.

    Example:
        >>> import torch
        >>> from grokopt import centroids
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> centroids(lambda x: x @ W.T, torch.randn(2, 2))  # J = W everywhere: its column sums
        tensor([[ 9., 12.],
                [ 9., 12.]])
    """
    # A constant cotangent of 1: its shape comes from the forward pass inside vjp. No graph
    # is kept for the parameters.
    return vjp(model, x, 1.0, create_graph=False)[1].detach()


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
        >>> from grokopt import centroid_alignment
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> stats = centroid_alignment(lambda x: x @ W.T, torch.tensor([[0.5, 1.0], [1.5, -0.5]]))
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
        >>> from grokopt import jacobian_pc1_share
        >>> W = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
        >>> round(jacobian_pc1_share(lambda x: x @ W.T, torch.randn(4, 2)), 4)  # rank-one J = W
        1.0
    """
    check_model("model", model)
    check_batch("x", x)
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


def _tensors(items: Tensor | nn.Module | Iterable[Tensor]) -> list[Tensor]:
    given: Iterable[Tensor]
    if isinstance(items, nn.Module):
        given = items.parameters()
    elif isinstance(items, Tensor):
        given = [items]
    elif isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(
            f"params_or_tensors must be a module, a tensor, or an iterable of tensors or "
            f"parameters, got {type(items).__name__}"
        )
    else:  # (what it holds is checked below)
        given = cast("Iterable[Tensor]", items)
    out = []
    for t in given:
        if isinstance(t, nn.Parameter):
            if t.grad is not None:
                out.append(t.grad)
        elif isinstance(t, Tensor):
            out.append(t)
        else:
            raise TypeError(
                f"params_or_tensors must hold tensors or parameters, got {type(t).__name__}"
            )
    return out


def absolute_gradient_entropy(params_or_tensors: Tensor | nn.Module | Iterable[Tensor]) -> Tensor:
    """Absolute Gradient Entropy, ``-sum_i |g_i| ln |g_i|`` over all entries (NeuralGrok).

    One 0-d tensor over all entries together, on the first tensor's device, without a host
    sync. Zero entries contribute 0. Sums in at least fp32 (fp64 inputs in fp64).

    It is *not* scale invariant: ``AGE(s*g) = s*AGE(g) - s*ln(s)*sum|g|``, so compare it
    between runs only at comparable gradient scales (for example after the same
    normalisation).

    Args:
        params_or_tensors: an ``nn.Module`` (its parameters' gradients), parameters (their
            ``.grad``; parameters without one are skipped), or plain tensors (used as they
            are), or one tensor.

    Example:
        >>> import math, torch
        >>> age = absolute_gradient_entropy([torch.tensor([0.5, -0.5])])
        >>> math.isclose(age.item(), math.log(2), rel_tol=1e-6)
        True
        >>> absolute_gradient_entropy([torch.zeros(3)]).item()
        0.0
    """
    tensors = [t.detach() for t in _tensors(params_or_tensors) if t.numel()]
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    dtypes = {torch.promote_types(t.dtype, torch.float32) for t in tensors}
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, torch.promote_types(t.dtype, torch.float32)), []).append(t)
    parts: list[Tensor] = []
    for (_, dtype), ts in groups.items():
        # One fused abs per group; xlogy has no multi-tensor kernel, but it is one pass.
        mags = torch._foreach_abs([t.to(dtype) for t in ts])
        parts.extend(torch.special.xlogy(m, m).sum().to(device=device, dtype=acc) for m in mags)
    return 0.0 - torch.stack(parts).sum()  # not a negation: AGE of zeros is +0.0, not -0.0
