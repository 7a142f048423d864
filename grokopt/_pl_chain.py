"""The piecewise-linear chain behind the Jacobian kernels' fast path.

The Jacobian of an ``nn.Sequential`` of ``Linear``, ``ReLU``-family, ``Flatten``, ``Identity``
and inactive ``Dropout`` layers at ``x`` is ``W_L D_{L-1} ... D_1 W_1``, with ``D_l`` the
activation slopes at ``x``. So tangents ride in the same matmuls as the primal, stacked on a
new leading axis (:func:`jvp_stacked`), and cotangents go down the weights and slope masks that
one primal pass records (:func:`forward_record`, :func:`reverse`): plain first-order autograd,
no double backward, and it compiles with ``torch.compile``.

A *plan* is the flat list of a qualifying model's layers (:func:`plan_of`); a *tape* is what
the primal pass keeps for the reverse chain, a list of ``("linear", W)``, ``("scale", slope)``
and ``("reshape", shape)`` entries. :mod:`grokopt.jacobian` decides when this path is taken.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "FORCE_GRAM",
    "GramQuadratic",
    "PASSTHROUGH",
    "Plan",
    "Tape",
    "activation_slope",
    "flatten_dims",
    "forward_record",
    "global_hooks_present",
    "gram_pays",
    "jvp",
    "jvp_stacked",
    "leaf_modules",
    "output_shape",
    "plan_of",
    "reverse",
    "reverse_sq_norms",
    "rowwise_gram_sq",
    "symmetric_gram",
]

Plan = list[nn.Module]
Tape = list[tuple[str, object]]

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)
PASSTHROUGH = (nn.Identity,)


def leaf_modules(model: nn.Module) -> Plan | None:
    """The layers of a (nested) ``nn.Sequential`` in call order, or None if it is not one."""
    # Subclasses of Sequential may override forward, so only the exact type is trusted.
    if type(model) is not nn.Sequential or model._forward_hooks or model._forward_pre_hooks:
        return None
    leaves: Plan = []
    for child in model:
        if type(child) is nn.Sequential:
            sub = leaf_modules(child)
            if sub is None:
                return None
            leaves.extend(sub)
        else:
            leaves.append(child)
    return leaves


def global_hooks_present() -> bool:
    mod = nn.modules.module
    return bool(
        getattr(mod, "_global_forward_hooks", None) or getattr(mod, "_global_forward_pre_hooks", None)
    )


def plan_of(model: object) -> Plan | None:
    """The layer list of a piecewise-linear model, or None when it does not qualify."""
    if not isinstance(model, nn.Module) or global_hooks_present():
        return None
    leaves = leaf_modules(model)
    if not leaves:
        return None
    for m in leaves:
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        kind = type(m)
        if kind is nn.Linear or kind in ACTIVATIONS or kind in PASSTHROUGH:
            continue
        if kind is nn.Flatten and cast(nn.Flatten, m).start_dim != 0:  # keeps the batch
            continue
        if kind is nn.Dropout and (not m.training or m.p == 0.0):
            continue
        return None
    return leaves


def flatten_dims(m: nn.Flatten, ndim: int) -> tuple[int, int]:
    """``m``'s (start, end) dims for an ``ndim``-dim input; refused if it merges the batch."""
    start = m.start_dim % ndim
    end = m.end_dim % ndim
    if start == 0:
        raise ValueError(f"{m} would merge the batch dimension; per-sample Jacobians need start_dim >= 1")
    return start, end


def activation_slope(m: nn.Module, pre: Tensor) -> tuple[Tensor, Tensor | None]:
    """Activation slope at the primal pre-activation (matching autograd's choice at kinks),
    and, for Hardtanh, the constant the clipped primal takes."""
    if type(m) is nn.ReLU:
        return (pre > 0).to(pre.dtype), None
    if type(m) is nn.LeakyReLU:
        return torch.where(pre > 0, pre.new_ones(()), pre.new_full((), m.negative_slope)), None
    clip = cast(nn.Hardtanh, m)
    lo, hi = float(clip.min_val), float(clip.max_val)
    inside = (pre > lo) & (pre < hi)
    const = torch.where(pre <= lo, pre.new_full((), lo), pre.new_zeros(())) + torch.where(
        pre >= hi, pre.new_full((), hi), pre.new_zeros(())
    )
    return inside.to(pre.dtype), const


def jvp(plan: Plan, x: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
    """Primal and k tangents stacked as ``(1 + k, B, ...)``: one GEMM per Linear for all."""
    return jvp_stacked(plan, torch.cat([x.unsqueeze(0), tangents.to(x.dtype)], dim=0))


def jvp_stacked(plan: Plan, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(primal output, tangent outputs)`` from ``z = [x, u_1, ..., u_k]`` stacked on dim 0."""
    k = z.shape[0] - 1
    for m in plan:
        if type(m) is nn.Linear:
            z = F.linear(z, m.weight)
            if m.bias is not None:
                # The bias shifts the primal only; tangents of an affine map drop it.
                bias = torch.cat([m.bias.unsqueeze(0), m.bias.new_zeros(k, m.bias.shape[0])])
                z = z + bias.view(1 + k, *([1] * (z.dim() - 2)), -1)
        elif type(m) is nn.ReLU:
            z = z * (z[0] > 0)
        elif isinstance(m, ACTIVATIONS):
            slope, const = activation_slope(m, z[0])
            z = z * slope
            if const is not None:
                z = z + torch.cat([const.unsqueeze(0), const.new_zeros((k,) + const.shape)])
        elif type(m) is nn.Flatten:
            start, end = flatten_dims(m, z.dim() - 1)
            z = z.flatten(start + 1, end + 1)
    return z[0], z[1:]


def forward_record(plan: Plan, x: Tensor) -> tuple[Tensor, Tape]:
    """Run the model layer by layer and keep what the reverse chain needs."""
    h = x
    tape: Tape = []
    for m in plan:
        if type(m) is nn.Linear:
            tape.append(("linear", m.weight))
            h = F.linear(h, m.weight, m.bias)  # the plan has no hooks: the module call is this
        elif type(m) is nn.ReLU:
            h = torch.relu(h)
            # sign() of the output is the slope (pre > 0) already in the float dtype the
            # reverse chain multiplies by; comparing and casting takes ~10x longer on CPU,
            # and a bool mask would send the products to a slow mixed-dtype kernel.
            tape.append(("scale", h.detach().sign()))
        elif isinstance(m, ACTIVATIONS):
            slope, _ = activation_slope(m, h)
            tape.append(("scale", slope))
            h = m(h)
        elif type(m) is nn.Flatten:
            flatten_dims(m, h.dim())
            tape.append(("reshape", h.shape))
            h = m(h)
        else:
            h = m(h)
    return h, tape


def reverse(tape: Tape, cotangents: Tensor) -> Tensor:
    """``J^T v`` for cotangents ``(k, B, *out)``: down the tape's weights, masks and reshapes."""
    g = cotangents
    k = g.shape[0]
    for op, val in reversed(tape):
        if op == "linear":
            g = g @ val  # type: ignore[operator, unused-ignore]
        elif op == "scale":
            g = g * val  # type: ignore[operator, unused-ignore]
        else:
            g = g.reshape((k,) + tuple(val))  # type: ignore[arg-type]
    return g


# Which way reverse_sq_norms takes the first layer: None compares the costs; tests pin
# True / False to check both against each other.
FORCE_GRAM: bool | None = None


def reverse_sq_norms(tape: Tape, cotangents: Tensor) -> Tensor:
    """``||J^T v||^2`` for each probe and sample, shape ``(k, B)``, from a recorded forward.

    Only the norm of ``J^T v`` is needed, not the vector. When nothing but reshapes comes
    before the first Linear ``W`` (an MLP on raw inputs), ``||J^T v||^2 = a (W W^T) a^T`` with
    ``a`` the cotangent at that layer's output: for a wide input (784 -> 196 on MNIST) the
    ``(out, out)`` Gram matrix is cheaper than ``(B, in)`` products, their gradient and the
    gradient of ``a`` (see :func:`gram_pays` and :class:`GramQuadratic`).
    """
    first = None  # (a loop, not next(..., None): torch 2.5's compiler cannot trace that)
    for i, (op, _) in enumerate(tape):
        if op == "linear":
            first = i
            break
    if first is None or any(op != "reshape" for op, _ in tape[:first]):
        g = reverse(tape, cotangents)
        return g.flatten(2).pow(2).sum(-1)
    a = reverse(tape[first + 1 :], cotangents)
    w = tape[first][1]
    assert isinstance(w, Tensor)
    use_gram = gram_pays(a, w) if FORCE_GRAM is None else FORCE_GRAM
    # The reshapes below the first layer move entries around without changing the norm.
    sq = rowwise_gram_sq(a, w) if use_gram else (a @ w).pow(2).sum(-1)
    return sq.flatten(2).sum(-1) if sq.dim() > 2 else sq


def gram_pays(a: Tensor, w: Tensor) -> bool:
    """Whether ``a (W W^T) a^T`` costs fewer multiply-adds than ``||a W||^2`` (with the
    gradients that will be asked for: ``a W`` needs two more products of its size, the Gram
    form one ``(out, out, in)`` product for ``W`` and one ``(n, out, out)`` for ``a W W^T``)."""
    out_f, in_f = w.shape
    n = a.numel() // out_f
    grad = torch.is_grad_enabled()
    a_grad, w_grad = grad and a.requires_grad, grad and w.requires_grad
    direct = n * in_f * out_f * (1 + a_grad + w_grad)
    gram = (out_f * out_f * in_f + n * out_f * out_f) * (1 + w_grad)
    return gram < direct


def rowwise_gram_sq(a: Tensor, w: Tensor) -> Tensor:
    """``||a_r W||^2`` for every row ``a_r`` of ``a`` (..., out), via ``M = W W^T``."""
    return GramQuadratic.apply(a, w)[0]


def symmetric_gram(w: Tensor) -> Tensor:
    """``W W^T`` from its upper block triangle: row panels times the rows from the panel on.

    With p panels that is (p + 1) / 2p of the full product's multiply-adds; the lower
    blocks are copies. For (196, 784) on one CPU thread: 610 us in one product, 500 us in
    4 panels (smaller panels gain little more).
    """
    out = w.shape[0]
    panels = min(4, out // 32)
    if panels < 2:
        return w @ w.transpose(0, 1)
    edges = [round(i * out / panels) for i in range(panels + 1)]
    m = None
    for r0, r1 in zip(edges[:-1], edges[1:]):
        block = w[r0:r1] @ w[r0:].transpose(0, 1)
        if m is None:  # the products' dtype (autocast may have chosen a lower one)
            m = block.new_empty(out, out)
        m[r0:r1, r0:] = block
        m[r1:, r0:r1] = block[:, r1 - r0 :].transpose(0, 1)
    assert m is not None
    return m


class GramQuadratic(torch.autograd.Function):
    """``(q, y, M)`` with ``M = W W^T``, ``y = a M``, ``q = rowsum(y * a)``.

    Written out because autograd, seeing two independent factors in ``W W^T`` and
    ``(a M) * a``, would run two ``(out, out, in)`` products for ``W`` and one more
    ``(n, out, out)`` for ``a``, which is the whole saving. Here ``dq/da = 2 y`` needs no
    product and ``dW = (dM + dM^T) W`` one. ``y`` and ``M`` are outputs (unused by the
    caller) so that the backward, written in differentiable ops on inputs and outputs, is
    itself differentiable: second derivatives come out right too.
    """

    @staticmethod
    def forward(a: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = symmetric_gram(w)
        y = a @ m
        return (y * a).sum(-1), y, m

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, w = inputs
        _, y, m = output
        ctx.save_for_backward(a, w, y, m)
        # Gradients of the unused outputs stay None: no zero products on the first-order path.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gq, gy, gm):
        a, w, y, m = ctx.saved_tensors
        rows = a.reshape(-1, a.shape[-1])
        ga, dm = None, gm
        if gq is not None:
            ga = y * (2 * gq).unsqueeze(-1)  # doubling the (n,) factor, not the (n, out) one
            s = (gq.reshape(-1, 1) * rows).transpose(0, 1) @ rows
            dm = s if dm is None else dm + s
        if gy is not None:  # only reached by a second derivative
            t = gy @ m
            ga = t if ga is None else ga + t
            s = rows.transpose(0, 1) @ gy.reshape(-1, gy.shape[-1])
            dm = s if dm is None else dm + s
        gw = None
        if dm is not None:
            # Backward runs outside autocast: bring the (possibly bf16) products to W's dtype.
            gw = (dm + dm.transpose(0, 1)).to(w.dtype) @ w
        return (None if ga is None else ga.to(a.dtype)), gw


def output_shape(plan: Plan, in_shape: torch.Size) -> tuple[int, ...]:
    """The output shape of the fast path for an input shape; a mismatch with a Linear's
    in_features is refused here (the fast path runs the matmuls itself, so torch's own
    error would not say that the input was wrong)."""
    shape = list(in_shape)
    for m in plan:
        if type(m) is nn.Linear:
            if shape[-1] != m.in_features:
                raise ValueError(
                    f"x has shape {tuple(in_shape)}, which reaches {m} with {shape[-1]} "
                    f"features; it expects {m.in_features}"
                )
            shape[-1] = m.out_features
        elif type(m) is nn.Flatten:
            start, end = flatten_dims(m, len(shape))
            shape[start : end + 1] = [math.prod(shape[start : end + 1])]
    return tuple(shape)
