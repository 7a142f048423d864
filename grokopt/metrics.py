"""Diagnostics cheap enough to log every step."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["absolute_gradient_entropy"]


def _tensors(items: Tensor | nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(items, nn.Module):
        items = items.parameters()
    elif isinstance(items, Tensor):
        items = [items]
    elif isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(
            f"params_or_tensors must be a module, a tensor, or an iterable of tensors or "
            f"parameters, got {type(items).__name__}"
        )
    out = []
    for t in items:
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
    parts = []
    for (_, dtype), ts in groups.items():
        # One fused abs per group; xlogy has no multi-tensor kernel, but it is one pass.
        mags = torch._foreach_abs([t.to(dtype) for t in ts])
        parts.extend(torch.special.xlogy(m, m).sum().to(device=device, dtype=acc) for m in mags)
    return 0.0 - torch.stack(parts).sum()  # not a negation: AGE of zeros is +0.0, not -0.0
