"""NeuralGrok: a learned per-element gain on the gradient, trained by a one-step lookahead.

The method is described in docs/methods.md. For each gradient tensor ``g`` the amplifier
(a small MLP on one scalar) gives ``f = MLP(g)`` elementwise; the transform is

    G_phi(g) = c * (w * g) / (||w * g|| + eps),    w = exp(f - max f)

(``w`` is the softmax of ``f`` without its normaliser, which the renormalisation cancels).
The amplifier is trained every ``meta_every`` steps on a held-out batch by the exact gradient
of the outer loss at the lookahead parameters ``theta - lr * G_phi(g_hat)`` (``lr`` the base
learning rate by default).

Cost. The paper runs the MLP on every one of the P gradient entries (P x sum(hidden) floats of
activations, several plain steps of compute). A ReLU MLP of one scalar is a continuous
*piecewise-linear* function with at most ``h1 + (h1 + 1) * h2`` kinks, so this module finds
the kinks inside ``[min g, max g]``, evaluates one affine piece (intercept, slope) per interval
with the MLP, and then looks every entry up: ``f = a[k] + s[k] * g`` with ``k`` from a binary
search. That is the *same function* (not an approximation), its work is O(P log K) elementwise
plus a P-independent O(K * hidden^2), and the pieces are differentiable in the amplifier's
weights, so the meta-step's hypergradient is exact as well (see :func:`amplify_gradients`).
Amplifiers that are not ``Linear``/``ReLU``/``LeakyReLU`` stacks use the per-element path in
chunks (exact, memory O(chunk x hidden), compute O(P x hidden^2)).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ._nonfinite import check_mode, screen_step
from ._distributed import all_reduce_mean, is_dtensor, local_shard, shard_groups, unwrap_ddp
from .wrapper import SKIP_STEP, GradientTransform

__all__ = ["AmplifiedOptimizer", "amplify_gradients", "make_amplifier"]

_PATHS = ("auto", "pwl", "exact")
_G_HAT = ("recompute", "last")
_LOOKAHEAD_LR = ("base", "scheduled")
_CHUNK = 1 << 18

Forward = Callable[..., Any]


# ---------------------------------------------------------------------------- amplifier


def make_amplifier(
    hidden: Sequence[int] = (128, 128),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """The paper's amplifier: ``Linear(1, h1)-ReLU-...-Linear(hn, 1)``, PyTorch default init.

    Example:
        >>> amp = make_amplifier((16, 16))
        >>> amp(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(f"hidden must be a sequence of positive ints, got {type(hidden).__name__}: {hidden!r}")
    hidden = tuple(hidden)
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if device is not None:
        # An int, an unknown string or an absent accelerator fails here with the argument's
        # name instead of inside nn.Linear.
        try:
            torch.empty(0, device=device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"device {device!r} is not usable here: {exc}") from exc
    layers: list[nn.Module] = []
    width = 1
    for h in hidden:
        layers += [nn.Linear(width, h, device=device, dtype=dtype), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1, device=device, dtype=dtype))
    return nn.Sequential(*layers)


def _piecewise_plan(amplifier: nn.Module) -> list[tuple[str, Any]] | None:
    """The amplifier as [("linear", module) | ("act", negative_slope)], or None if it is not
    a stack the piecewise-linear path can represent exactly."""
    plan: list[tuple[str, Any]] = []

    def walk(m: nn.Module) -> bool:
        if type(m) is nn.Sequential:
            return all(walk(child) for child in m)
        if type(m) is nn.Linear:
            plan.append(("linear", m))
        elif type(m) is nn.ReLU:
            plan.append(("act", 0.0))
        elif type(m) is nn.LeakyReLU:
            plan.append(("act", float(m.negative_slope)))
        elif type(m) is not nn.Identity:
            return False
        return True

    if not walk(amplifier) or not plan or plan[0][0] != "linear":
        return None
    return plan


def _dual(plan: list[tuple[str, Any]], x: Tensor) -> tuple[Tensor, Tensor]:
    """Values and d/dx of the (sub)network at points x (K,), shape (K, width) each.

    The activation pattern is read off the values at x, so on an interval where no unit
    changes sign this is the network's exact affine piece, differentiable in its weights.
    """
    h = x[:, None]
    d = torch.ones_like(h)
    for kind, layer in plan:
        if kind == "linear":
            h = nn.functional.linear(h, layer.weight, layer.bias)
            d = nn.functional.linear(d, layer.weight)
        else:
            # Built in h's dtype: a float32 0.1 would be off by 1e-9 in an fp64 network.
            gain = torch.where(h.detach() > 0, h.new_ones(()), h.new_full((), layer))
            h = h * gain
            d = d * gain
    return h, d


def _piecewise_table(
    plan: list[tuple[str, Any]], lo: float, hi: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Kinks (sorted, inside (lo, hi)), and intercept and slope of each of the K pieces.

    Kinks come layer by layer: once all kinks of the layers below are known, every unit of
    the next activation is affine on each interval, so its zero there is one division.
    """
    with torch.no_grad():
        kinks = torch.empty(0, dtype=dtype, device=device)
        ends = torch.tensor([lo, hi], dtype=dtype, device=device)
        for i, (kind, _) in enumerate(plan):
            if kind != "act":
                continue
            edges = torch.cat([ends[:1], kinks, ends[1:]])
            mids = (edges[:-1] + edges[1:]) / 2
            z, dz = _dual(plan[:i], mids)
            roots = mids[:, None] - z / dz  # dz == 0 gives inf/nan, dropped by the test below
            inside = (roots > edges[:-1, None]) & (roots < edges[1:, None])
            kinks = torch.unique(torch.cat([kinks, roots[inside]]))  # sorted
        edges = torch.cat([ends[:1], kinks, ends[1:]])
        mids = (edges[:-1] + edges[1:]) / 2
    value, slope = _dual(plan, mids)
    value, slope = value[:, 0], slope[:, 0]
    return kinks, value - slope * mids, slope


def _lookup(x: Tensor, kinks: Tensor, intercept: Tensor, slope: Tensor) -> Tensor:
    k = torch.searchsorted(kinks, x)  # int64: index_select is ~2x faster than with int32
    return torch.addcmul(intercept.index_select(0, k), slope.index_select(0, k), x)


class _PiecewiseAmplify(torch.autograd.Function):
    """G_phi of one flat tensor on the pwl path, differentiable in the pieces' (intercept,
    slope), keeping nothing P-sized for backward but the gradient itself.

    Autograd would save the indices, gathered slopes, w and u of every entry (about 35 bytes
    per entry at fp32, 1.8 GB at 50M parameters); backward recomputes them chunk by chunk
    from g and the K pieces instead, so its memory is O(chunk) beyond its input and output.
    """

    @staticmethod
    def forward(ctx: Any, intercept: Tensor, slope: Tensor, kinks: Tensor, g: Tensor,
                c: float, eps: float, work: torch.dtype, chunk: int) -> Tensor:
        y = torch.empty(g.numel(), dtype=work, device=intercept.device)
        for part, out in zip(g.split(chunk), y.split(chunk)):
            out.copy_(_lookup(part.to(intercept.dtype), kinks, intercept, slope))
        top = y.argmax()
        m = y[top].clone()
        for part, out in zip(g.split(chunk), y.split(chunk)):
            out.sub_(m).exp_().mul_(part.to(work))
        n = torch.linalg.vector_norm(y)
        y.mul_(c / (n + eps))
        ctx.save_for_backward(intercept, slope, kinks, g, m, n, top)
        ctx.c, ctx.eps, ctx.work, ctx.chunk = c, eps, work, chunk
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        intercept, slope, kinks, g, m, n, top = ctx.saved_tensors
        c, eps, work, chunk = ctx.c, ctx.eps, ctx.work, ctx.chunk

        def pieces(part: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            x = part.to(intercept.dtype)
            k = torch.searchsorted(kinks, x)
            f = torch.addcmul(intercept.index_select(0, k), slope.index_select(0, k), x).to(work)
            return x, k, f.sub_(m).exp_().mul_(part.to(work))  # u = w * g

        # y = c u / (n + eps), n = ||u||:  dL/du = c/(n+eps) (gy - u (u.gy) / (n (n+eps)))
        dot = sum((pieces(part)[2] * gp).sum() for part, gp in zip(g.split(chunk), gy.split(chunk)))
        coef = torch.where(n > 0, dot / (n * (n + eps)), torch.zeros_like(n))
        scale = c / (n + eps)
        grad_a = torch.zeros_like(intercept)
        grad_s = torch.zeros_like(slope)
        total = torch.zeros((), dtype=work, device=gy.device)
        for part, gp in zip(g.split(chunk), gy.split(chunk)):
            x, k, u = pieces(part)
            df = (gp - u * coef).mul_(scale).mul_(u)  # du/df = u
            total += df.sum()
            grad_a.index_add_(0, k, df.to(grad_a.dtype))
            grad_s.index_add_(0, k, (df * x).to(grad_s.dtype))
        # u = exp(f - max f) g: the max moves with the pieces too (it matters through eps).
        x_top = g.reshape(-1)[top].to(intercept.dtype)
        k_top = torch.searchsorted(kinks, x_top.reshape(1))
        grad_a.index_add_(0, k_top, (-total).reshape(1).to(grad_a.dtype))
        grad_s.index_add_(0, k_top, (-total * x_top).reshape(1).to(grad_s.dtype))
        return grad_a, grad_s, None, None, None, None, None, None


def _amplifier_dtype_device(amplifier: nn.Module, fallback: Tensor) -> tuple[torch.dtype, torch.device]:
    for p in amplifier.parameters():
        return p.dtype, p.device
    return torch.float32, fallback.device


def _check_amplifier(amplifier: Any, device: torch.device) -> None:
    if not isinstance(amplifier, nn.Module):
        raise TypeError(f"amplifier must be an nn.Module, got {type(amplifier).__name__}")
    dtype, dev = _amplifier_dtype_device(amplifier, torch.empty(0, device=device))
    probe = torch.linspace(-1.0, 1.0, 3, dtype=dtype, device=dev)[:, None]
    with torch.no_grad():
        try:
            out = amplifier(probe)
        except Exception as exc:
            raise ValueError(
                f"amplifier must map a (n, 1) tensor to a (n, 1) tensor; calling it on a "
                f"(3, 1) tensor raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(out, Tensor) or tuple(out.shape) != (3, 1):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"amplifier must map a (n, 1) tensor to a (n, 1) tensor (one gain per gradient "
            f"entry); on a (3, 1) input it returned {shape}"
        )


# ---------------------------------------------------------------------------- transform


def amplify_gradients(
    grads: Sequence[Tensor],
    amplifier: nn.Module,
    *,
    c: float | Sequence[float] = 1.0,
    eps: float = 1e-12,
    path: str = "auto",
    chunk_size: int | None = _CHUNK,
) -> list[Tensor]:
    """G_phi (docs/methods.md) for each tensor; new tensors, the inputs are not changed.

    ``f = amplifier(g)`` elementwise, ``w = exp(f - max f)`` and ``c * w*g / (||w*g|| + eps)``,
    in the wider of fp32 and the amplifier's dtype, returned in each gradient's dtype. An
    all-zero gradient gives zeros. While grad mode is on, the result is differentiable in
    the amplifier's parameters (the gradients themselves are treated as constants).

    Paths (the same function, up to rounding):

    - ``"pwl"``: the amplifier is a ``Linear``/``ReLU``/``LeakyReLU`` stack, hence exactly
      piecewise linear in its input. Its kinks inside ``[min g, max g]`` and one
      (intercept, slope) per piece are computed from the weights, and each entry is looked up
      by binary search. No P x hidden activations exist at any time.
    - ``"exact"``: the MLP on every entry (the paper's way); without grad mode it runs in
      chunks of ``chunk_size`` entries so that its memory is O(chunk_size x hidden).
    - ``"auto"``: ``"pwl"`` when the amplifier allows it, else ``"exact"``.

    Args:
        grads: gradient tensors (any float dtype).
        amplifier: a module mapping (n, 1) to (n, 1).
        c: target norm per tensor, one float or one per tensor.
        eps: added to the norm; keeps an all-zero gradient at zero.
        path: ``"auto"``, ``"pwl"`` or ``"exact"``.
        chunk_size: entries per chunk of the no-grad paths (None: all at once).

    Example:
        >>> amp = make_amplifier((8,))
        >>> g = torch.tensor([3.0, -4.0])
        >>> out, = amplify_gradients([g], amp, c=2.0)
        >>> round(out.norm().item(), 5)
        2.0
    """
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(amplifier, nn.Module):
        raise TypeError(f"amplifier must be an nn.Module, got {type(amplifier).__name__}")
    if isinstance(grads, Tensor) or not isinstance(grads, Iterable):
        raise TypeError(f"grads must be a sequence of tensors, got {type(grads).__name__}")
    grads = list(grads)
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor) or not g.is_floating_point():
            got = f"{g.dtype} tensor" if isinstance(g, Tensor) else type(g).__name__
            raise TypeError(f"grads[{i}] must be a floating-point tensor, got {got}")
    cs = list(c) if isinstance(c, Sequence) and not isinstance(c, str) else [c] * len(grads)
    if len(cs) != len(grads):
        raise ValueError(f"c has {len(cs)} entries for {len(grads)} gradients")
    for value in cs:
        _check_positive("c", value)
    _check_positive("eps", eps, allow_zero=True)
    if not grads:
        return []
    plan = _piecewise_plan(amplifier)
    if path == "pwl" and plan is None:
        raise ValueError(
            "path='pwl' needs an amplifier built only from nn.Linear, nn.ReLU, nn.LeakyReLU "
            "and nn.Identity (in nn.Sequential); use path='exact' or 'auto' for this one"
        )
    use_pwl = plan is not None and path != "exact"
    amp_dtype, amp_device = _amplifier_dtype_device(amplifier, grads[0])
    differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in amplifier.parameters())
    if any(is_dtensor(g) for g in grads):
        if differentiable:
            raise NotImplementedError(
                "amplify_gradients is not differentiable for sharded (DTensor, e.g. FSDP2) "
                "gradients (its per-tensor max and norm span the ranks); call it under "
                "torch.no_grad() (as step() does). AmplifiedOptimizer.meta_step computes the "
                "hypergradient for sharded parameters in its own way"
            )
        return _amplify_sharded(grads, amplifier, cs, eps, plan if use_pwl else None,
                                chunk_size, amp_dtype, amp_device)

    table = None
    if use_pwl:
        nonempty = [g.detach() for g in grads if g.numel()]
        if nonempty:
            bounds = torch.stack([torch.stack(torch.aminmax(g)).to(amp_dtype) for g in nonempty])
            lo, hi = bounds[:, 0].min().item(), bounds[:, 1].max().item()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                lo = hi = 0.0  # inf/NaN entries make the output NaN below, as in the paper
            table = _piecewise_table(plan, lo, hi, amp_dtype, amp_device)  # type: ignore[arg-type]

    def gains(x: Tensor) -> Tensor:
        if table is not None:
            if chunk_size is None:
                return _lookup(x, *table)
            return torch.cat([_lookup(part, *table) for part in x.split(chunk_size)])
        if differentiable or chunk_size is None:
            return amplifier(x[:, None]).reshape(-1)
        return torch.cat([amplifier(part[:, None]).reshape(-1) for part in x.split(chunk_size)])

    out = []
    for g, c_i in zip(grads, cs):
        g = g.detach()
        if g.numel() == 0:
            out.append(torch.zeros_like(g))
            continue
        work = torch.promote_types(torch.promote_types(g.dtype, torch.float32), amp_dtype)
        if differentiable and table is not None:
            kinks, intercept, slope = table
            y = _PiecewiseAmplify.apply(intercept, slope, kinks, g.reshape(-1).to(amp_device),
                                        c_i, eps, work, chunk_size or _CHUNK)
            out.append(y.view(g.shape).to(device=g.device, dtype=g.dtype))
            continue
        x = g.reshape(-1).to(device=amp_device, dtype=amp_dtype)
        f = gains(x).to(work)
        gw = g.reshape(-1).to(device=amp_device, dtype=work)
        if differentiable:
            u = torch.exp(f - f.max()) * gw
            y = u * (c_i / (torch.linalg.vector_norm(u) + eps))
        else:
            # In place: the only P-sized temporaries are f (and a cast of g if needed).
            y = f.sub_(f.max()).exp_().mul_(gw)
            y.mul_(c_i / (torch.linalg.vector_norm(y) + eps))
        out.append(y.view(g.shape).to(device=g.device, dtype=g.dtype))
    return out


def _reduce_per_tensor(values: Tensor, groups: list[tuple[Any, ...]], op: Any) -> Tensor:
    """All-reduce ``values[i]`` over ``groups[i]``, one collective per distinct group set."""
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, gs in enumerate(groups):
        if gs:
            buckets.setdefault(gs, []).append(i)
    for gs, idx in buckets.items():
        part = values[idx]  # advanced indexing: a contiguous copy, safe to reduce in place
        for group in gs:
            dist.all_reduce(part, op=op, group=group)
        values[idx] = part
    return values


def _sharded_table(
    grads: list[Tensor], locals_: list[Tensor], groups: list[tuple[Any, ...]],
    plan: list[tuple[str, Any]] | None, amp_dtype: torch.dtype, amp_device: torch.device,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The piecewise table over the *global* range of the gradients, as in the unsharded
    run (differentiable in the amplifier while grad mode is on)."""
    if plan is None:
        return None
    lo = torch.full((len(grads),), math.inf, dtype=torch.float64)
    hi = torch.full((len(grads),), -math.inf, dtype=torch.float64)
    for i, x in enumerate(locals_):
        if x.numel():
            a, b = torch.aminmax(x.to(amp_dtype))
            lo[i], hi[i] = a.item(), b.item()
    lo = _reduce_per_tensor(lo, groups, dist.ReduceOp.MIN)
    hi = _reduce_per_tensor(hi, groups, dist.ReduceOp.MAX)
    nonempty = [i for i, g in enumerate(grads) if g.numel()]
    if not nonempty:
        return None
    low, high = lo[nonempty].min().item(), hi[nonempty].max().item()
    if not (math.isfinite(low) and math.isfinite(high)):
        low = high = 0.0  # inf/NaN entries make the output NaN, as in the paper
    return _piecewise_table(plan, low, high, amp_dtype, amp_device)


def _amplify_sharded(
    grads: list[Tensor], amplifier: nn.Module, cs: list[float], eps: float,
    plan: list[tuple[str, Any]] | None, chunk_size: int | None,
    amp_dtype: torch.dtype, amp_device: torch.device,
) -> list[Tensor]:
    """G_phi for gradients of which some are DTensors (FSDP2 shards), equal to the unsharded
    result up to rounding.

    The transform is elementwise except for three reductions over each whole tensor: the
    range [min g, max g] that the piecewise table must cover, max f, and ||w*g||. Each is
    computed on the local shard and all-reduced over the mesh dimensions the tensor is
    sharded along; everything else runs on the local shard. Plain tensors in the list
    simply take no collective. Every rank must call this with the same list of tensors (as
    step() under FSDP2 does), since the collectives are matched by order.
    """
    from torch.distributed.tensor import DTensor

    locals_ = [(g.to_local() if is_dtensor(g) else g).detach().reshape(-1) for g in grads]
    groups = [shard_groups(g) for g in grads]
    table = _sharded_table(grads, locals_, groups, plan, amp_dtype, amp_device)

    def gains(x: Tensor) -> Tensor:
        if x.numel() == 0:
            return x.new_empty(0)
        parts = x.split(chunk_size) if chunk_size is not None else (x,)
        if table is not None:
            return torch.cat([_lookup(part, *table) for part in parts])
        return torch.cat([amplifier(part[:, None]).reshape(-1) for part in parts])

    fs, works = [], []
    maxima = torch.full((len(grads),), -math.inf, dtype=torch.float64)
    for i, (g, x) in enumerate(zip(grads, locals_)):
        work = torch.promote_types(torch.promote_types(g.dtype, torch.float32), amp_dtype)
        f = gains(x.to(device=amp_device, dtype=amp_dtype)).to(work)
        if f.numel():
            maxima[i] = f.max().item()
        fs.append(f)
        works.append(work)
    maxima = _reduce_per_tensor(maxima, groups, dist.ReduceOp.MAX)
    squares = torch.zeros(len(grads), dtype=torch.float64)
    us = []
    for i, (x, f, work) in enumerate(zip(locals_, fs, works)):
        u = f.sub_(maxima[i].to(work)).exp_().mul_(x.to(device=amp_device, dtype=work))
        squares[i] = u.pow(2).sum().item() if u.numel() else 0.0
        us.append(u)
    norms = _reduce_per_tensor(squares, groups, dist.ReduceOp.SUM).sqrt()
    out = []
    for i, (g, u) in enumerate(zip(grads, us)):
        local = g.to_local() if is_dtensor(g) else g
        y = u.mul_(cs[i] / (norms[i].item() + eps)).view(local.shape)
        y = y.to(device=local.device, dtype=local.dtype)
        if is_dtensor(g):
            y = DTensor.from_local(y, g.device_mesh, g.placements, run_check=False,  # type: ignore[attr-defined]
                                   shape=g.shape, stride=g.stride())
        out.append(y)
    return out


def _amplify_vjp_sharded(
    grads: list[Tensor], upstream: list[Tensor], amplifier: nn.Module, cs: list[float],
    eps: float, plan: list[tuple[str, Any]] | None, chunk_size: int | None,
) -> list[Tensor]:
    """d/dphi of sum_i <upstream_i, G_phi(grads_i)> for sharded (DTensor) gradients: the
    hypergradient of the meta-step under FSDP2, equal to the unsharded one up to rounding.

    Autograd cannot differentiate through the cross-shard max and norm, so the gradient on
    each entry's gain ``f`` is written out (``u = exp(f - m) g``, ``N = ||u||``,
    ``y = c u / (N + eps)``, ``v`` the upstream):

        dL/du = c/(N+eps) v - c (u.v) / ((N+eps)^2 N) u,    dL/df = dL/du * u,

    plus the path through ``m = max f`` (it matters only through ``eps``): ``dL/dm =
    -sum dL/df``, shared evenly among the entries that attain the max, as autograd's max
    does. The global dot products, max and tie count are all-reduced over the mesh
    dimensions each tensor is split along; autograd then carries ``dL/df`` from the local
    entries to the amplifier's weights, and those partial hypergradients are summed over the
    same groups. Plain tensors in the list are replicated: their part is not summed.
    """
    amp_params = list(amplifier.parameters())
    if not grads:
        return [torch.zeros_like(p) for p in amp_params]
    amp_dtype, amp_device = _amplifier_dtype_device(amplifier, grads[0])
    locals_ = [local_shard(g).detach().reshape(-1) for g in grads]
    ups = [local_shard(v).detach().reshape(-1) for v in upstream]
    groups = [shard_groups(g) for g in grads]
    n = len(grads)
    with torch.enable_grad():
        table = _sharded_table(grads, locals_, groups, plan, amp_dtype, amp_device)
        fs = []
        for x in locals_:
            xa = x.to(device=amp_device, dtype=amp_dtype)
            if table is not None:
                fs.append(_lookup(xa, *table))
            elif x.numel() == 0:
                fs.append(xa)
            else:
                parts = xa.split(chunk_size) if chunk_size is not None else (xa,)
                fs.append(torch.cat([amplifier(part[:, None]).reshape(-1) for part in parts]))
    works = [torch.promote_types(torch.promote_types(g.dtype, torch.float32), amp_dtype) for g in grads]
    with torch.no_grad():
        fds = [f.detach().to(w) for f, w in zip(fs, works)]
        maxima = torch.tensor([f.max().item() if f.numel() else -math.inf for f in fds], dtype=torch.float64)
        maxima = _reduce_per_tensor(maxima, groups, dist.ReduceOp.MAX)
        us = [torch.exp(f - maxima[i].to(w)) * x.to(device=amp_device, dtype=w)
              for i, (f, x, w) in enumerate(zip(fds, locals_, works))]
        vs = [v.to(device=amp_device, dtype=w) for v, w in zip(ups, works)]
        sums = torch.tensor([[u.pow(2).sum().item(), (u * v).sum().item()] for u, v in zip(us, vs)],
                            dtype=torch.float64).reshape(n, 2)
        sums = _reduce_per_tensor(sums, groups, dist.ReduceOp.SUM)
        gfs, ties = [], []
        for i, (u, v, f) in enumerate(zip(us, vs, fds)):
            norm, dot = sums[i, 0].sqrt().item(), sums[i, 1].item()
            coef = cs[i] * dot / ((norm + eps) ** 2 * norm) if norm > 0 else 0.0
            gfs.append((v * (cs[i] / (norm + eps)) - u * coef) * u)
            ties.append(f == maxima[i].to(f.dtype))
        extra = torch.tensor([[-gf.sum().item(), float(t.sum().item())] for gf, t in zip(gfs, ties)],
                             dtype=torch.float64).reshape(n, 2)
        extra = _reduce_per_tensor(extra, groups, dist.ReduceOp.SUM)
        for i, (gf, t) in enumerate(zip(gfs, ties)):
            if extra[i, 1] > 0:
                gf.add_(t.to(gf.dtype) * (extra[i, 0].item() / extra[i, 1].item()))
    # One backward per set of reduction groups (normally two: the sharded and the plain).
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, gs in enumerate(groups):
        buckets.setdefault(gs, []).append(i)
    total = [torch.zeros_like(p) for p in amp_params]
    for gs, idx in buckets.items():
        with torch.enable_grad():
            objective = sum((fs[i].to(works[i]) * gfs[i]).sum() for i in idx if fs[i].requires_grad)
        if not isinstance(objective, Tensor):
            continue
        parts = torch.autograd.grad(objective, amp_params, retain_graph=True, allow_unused=True)
        for t, part in zip(total, parts):
            if part is None:
                continue
            part = part.contiguous()
            for group in gs:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            t.add_(part)
    return total


# ---------------------------------------------------------------------------- optimizer


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}: {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")


_BufferSnapshot = list[tuple[nn.Module, str, Tensor | None, Tensor | None]]


def _snapshot_buffers(module: nn.Module) -> _BufferSnapshot:
    """Every buffer of ``module``: its owner, name, object and a copy of its value.

    A meta-step's forwards must not count as training: in train mode BatchNorm would move
    its running statistics and ``num_batches_tracked`` on each of them.
    """
    return [(m, name, b, None if b is None else b.clone())
            for m in module.modules() for name, b in m._buffers.items()]


def _restore_buffers(saved: _BufferSnapshot) -> None:
    """Put the buffers back as :func:`_snapshot_buffers` found them, object and bits. Only
    those that changed are written, so a buffer that some graph saved for backward (BatchNorm's
    running statistics in eval mode) keeps its version counter and that graph stays usable."""
    with torch.no_grad():
        for m, name, b, copy in saved:
            if m._buffers.get(name) is not b:  # a module may rebind a buffer, not update it
                m._buffers[name] = b
            if b is not None and copy is not None and not torch.equal(b, copy):
                b.copy_(copy)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module) -> Iterator[None]:
    saved = _snapshot_buffers(module)
    try:
        yield
    finally:
        _restore_buffers(saved)


class AmplifiedOptimizer(GradientTransform):
    """NeuralGrok: step on amplified gradients G_phi(g); learn the amplifier by meta-steps.

    ``step()`` replaces every gradient by G_phi(g) (no autograd graph) and steps the inner
    optimizer. :meth:`meta_step` (or :meth:`maybe_meta_step`, every ``meta_every`` steps)
    trains the amplifier on a held-out batch: it evaluates the model at the lookahead
    parameters ``theta - lr * G_phi(g_hat)`` (plain SGD: no clip, no weight decay; ``lr``
    as chosen by ``lookahead_lr``) through :func:`torch.func.functional_call`, so the
    module's own parameters are untouched, and steps the meta-optimizer with the exact
    gradient of that outer loss w.r.t. the amplifier's weights. The meta-step's forwards run
    in the module's current mode (in train mode BatchNorm normalises with the batch's
    statistics) but leave every buffer as it was, bit for bit: running statistics and
    ``num_batches_tracked`` move only in training steps. Under DDP the hypergradient (and a
    recomputed g_hat) is averaged across ranks here, since ``autograd.grad`` bypasses DDP's
    own averaging. With sharded
    (FSDP2) parameters the meta-step instead writes the lookahead into the shards, runs the
    module's own forward and backward there, restores the parameters and their ``.grad``
    exactly, and forms the hypergradient as a vector-Jacobian product reduced across shards
    (the same value); :meth:`meta_loss` alone is not available for them.

    ``g_hat`` (what the lookahead steps along):

    - ``"recompute"`` (the paper's): the gradient of ``inner_loss`` (passed to the meta-step,
      normally the step's own batch) at the current, just-updated parameters. One extra
      forward/backward per meta-step; the lookahead starts where the model is.
    - ``"last"``: the raw gradient of the last ``step()`` (before G_phi), stored each step
      (one extra copy of the gradients in memory and in the state_dict). No extra
      backward, but it was taken one step earlier than the parameters it is applied to.

    Args:
        optimizer: any optimizer, including a grokopt wrapper (``AmplifiedOptimizer(
            Grokfast(AdamW(...)))`` amplifies and then filters).
        amplifier: a module mapping (n, 1) to (n, 1); default :func:`make_amplifier` with
            ``hidden`` on the parameters' device, fp32.
        hidden: widths of the default amplifier (paper: (128, 128) for mod-97 tasks).
        c: norm of every amplified gradient tensor, > 0 (paper 1.0; later code 0.2). Stored
            per group as ``neuralgrok_c``.
        meta_lr: learning rate of the default meta-optimizer, Adam(betas=(0.9, 0.98),
            weight_decay=1e-3); ignored when ``meta_optimizer`` is given.
        meta_optimizer: an optimizer over exactly the amplifier's parameters.
        meta_every: :meth:`maybe_meta_step` runs a meta-step every this many steps (>= 1).
        g_hat: ``"recompute"`` or ``"last"`` (above).
        lookahead_lr: the lookahead's step size. ``"base"`` (the reference's): each group's
            ``initial_lr`` where an LR scheduler has set one, else its ``lr``, so a warmup
            or decay leaves the meta-objective alone (a schedule that decays to 0 would
            otherwise switch the meta-step off). ``"scheduled"``: the group's current ``lr``.
        eps: added to each tensor's norm (>= 0).
        path: ``"auto"``, ``"pwl"`` or ``"exact"`` (see :func:`amplify_gradients`).
        chunk_size: entries per chunk of the no-grad transform (None: all at once).
        max_grad_norm: if set, clip the amplified gradients to this global norm before the
            inner step (the reference pipeline uses 1.0). Not applied in the lookahead.
        nonfinite: what a step with an inf/NaN gradient does (decided on the host, one
            sync): ``"error"`` (default) raises :class:`~grokopt.NonFiniteGradientError`,
            naming the parameter, before anything changes; ``"skip"`` skips the whole step
            (parameters, the inner optimizer's state, ``g_hat="last"``'s stored gradient and
            the step counter stay as if ``step()`` had not been called).
        restore_grad: ``True`` (default): after ``step()`` each ``p.grad`` is the gradient
            backward produced, as with any torch optimizer (G_phi and the clip work on a
            scratch copy: one extra gradient-sized buffer during the step). ``False``: the
            amplified (and clipped) gradient is written into ``p.grad`` in place, with no
            extra buffer.

    Defaults and the paper's pipeline. The paper trains with G_phi, then a clip to global
    norm 1.0, then Adam(lr 1e-3, betas (0.9, 0.98), weight_decay 1e-3 as coupled L2), an
    amplifier (128, 128), c = 1.0, a meta-step every 4 steps (its mod-97 tasks) with
    Adam(lr 1e-4, betas (0.9, 0.98), weight_decay 1e-3), g_hat recomputed and the lookahead
    at the base lr. The defaults here are the same, except:

    - ``max_grad_norm=None``: no clip. The clip belongs to the paper's training pipeline,
      not to the method, and on its own it changes how fast even a plain baseline groks;
      a wrapper should not add it to someone else's optimizer unasked.
    - ``eps=1e-12`` in each norm, where the paper has none: it matters only for a tensor
      whose gradient is (nearly) all zero, which the paper turns into NaN.
    - the inner optimizer is yours (the paper's is ``torch.optim.Adam`` with coupled
      ``weight_decay``, not AdamW).

    ``c`` is the paper's 1.0; the authors' later code uses 0.2 (values in [0.2, 1] behave
    alike). With the clip on, ``c`` hardly reaches the training step (whenever
    ``c * sqrt(number of tensors) >= 1`` the clip scales the total back to norm 1) but it
    still sets the lookahead's length. ``meta_every=4`` and ``hidden=(128, 128)`` are the
    paper's values for its mod-97 tasks (its mod-7 task uses 1 and ``(1152,)``). The
    meta-optimizer's weight decay, 1e-3, is the paper's. See docs/methods.md.

    Example:
        >>> import torch
        >>> from grokopt.neuralgrok import AmplifiedOptimizer
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = AmplifiedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
        ...                          hidden=(16, 16), meta_every=2)
        >>> x, y, x_out, y_out = torch.randn(8, 3), torch.randn(8, 2), torch.randn(4, 3), torch.randn(4, 2)
        >>> mse = torch.nn.functional.mse_loss
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     mse(model(x), y).backward()
        ...     opt.step()
        ...     _ = opt.maybe_meta_step(model, lambda fwd: mse(fwd(x_out), y_out),
        ...                             inner_loss=lambda fwd: mse(fwd(x), y))
        >>> opt.meta_steps
        2

        The paper's pipeline (up to ``eps``, above; call ``maybe_meta_step`` after each step
        with the step's batch as ``inner_loss`` and the held-out split as ``outer_loss``):

        >>> paper = AmplifiedOptimizer(
        ...     torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1e-3),
        ...     hidden=(128, 128), c=1.0, meta_every=4, meta_lr=1e-4, max_grad_norm=1.0)
    """

    _prefix = "neuralgrok_"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        amplifier: nn.Module | None = None,
        hidden: Sequence[int] = (128, 128),
        c: float = 1.0,
        meta_lr: float = 1e-4,
        meta_optimizer: Optimizer | None = None,
        meta_every: int = 4,
        g_hat: str = "recompute",
        lookahead_lr: str = "base",
        eps: float = 1e-12,
        path: str = "auto",
        chunk_size: int | None = _CHUNK,
        max_grad_norm: float | None = None,
        nonfinite: str = "error",
        restore_grad: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            super().__init__(optimizer, {})  # the base class's TypeError names the argument
        check_mode(nonfinite)
        if isinstance(meta_every, bool) or not isinstance(meta_every, int) or meta_every < 1:
            raise ValueError(f"meta_every must be an int >= 1, got {meta_every!r}")
        if g_hat not in _G_HAT:
            raise ValueError(f"g_hat must be one of {_G_HAT}, got {g_hat!r}")
        if not isinstance(lookahead_lr, str) or lookahead_lr not in _LOOKAHEAD_LR:
            raise ValueError(f"lookahead_lr must be one of {_LOOKAHEAD_LR}, got {lookahead_lr!r}")
        if path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        _check_positive("c", c)
        _check_positive("eps", eps, allow_zero=True)
        _check_positive("meta_lr", meta_lr)
        if max_grad_norm is not None:
            _check_positive("max_grad_norm", max_grad_norm)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        if amplifier is None:
            amplifier = make_amplifier(hidden, device=device)
        _check_amplifier(amplifier, device)
        if path == "pwl" and _piecewise_plan(amplifier) is None:
            raise ValueError(
                "path='pwl' needs an amplifier built only from nn.Linear, nn.ReLU, "
                "nn.LeakyReLU and nn.Identity; use path='exact' or 'auto' for this amplifier"
            )
        amp_params = list(amplifier.parameters())
        if meta_optimizer is None:
            if not amp_params:
                raise ValueError("amplifier has no parameters to learn; give one with parameters")
            meta_optimizer = torch.optim.Adam(
                amp_params, lr=meta_lr, betas=(0.9, 0.98), weight_decay=1e-3
            )
        elif not isinstance(meta_optimizer, Optimizer):
            raise TypeError(
                f"meta_optimizer must be a torch.optim.Optimizer or None, got "
                f"{type(meta_optimizer).__name__}"
            )
        else:
            owned = {id(p) for g in meta_optimizer.param_groups for p in g["params"]}
            if owned != {id(p) for p in amp_params}:
                raise ValueError(
                    "meta_optimizer must optimise exactly the amplifier's parameters, "
                    "e.g. torch.optim.Adam(amplifier.parameters())"
                )
        super().__init__(optimizer, {"c": c}, restore_grad=restore_grad)
        self.amplifier = amplifier
        self.meta_optimizer = meta_optimizer
        self.meta_every = meta_every
        self.g_hat = g_hat
        self.lookahead_lr = lookahead_lr
        self.eps = eps
        self.path = path
        self.chunk_size = chunk_size
        self.max_grad_norm = max_grad_norm
        self.nonfinite = nonfinite
        self._counters = {"steps": 0, "meta_steps": 0, "last_meta_at": 0}

    @property
    def steps(self) -> int:
        """Number of completed ``step()`` calls."""
        return self._counters["steps"]

    def _has_state(self) -> bool:
        # With g_hat="recompute" and a stateless inner optimizer (plain SGD) nothing
        # per-parameter is kept, but the step counter (the meta-step schedule) still is.
        counters = self.__dict__.get("_counters")
        return super()._has_state() or bool(counters and counters["steps"] > 0)

    @property
    def meta_steps(self) -> int:
        """Number of completed meta-steps."""
        return self._counters["meta_steps"]

    def _validate_group(self, options: dict[str, Any]) -> None:
        merged = {**self._own_defaults(), **options} if hasattr(self, "defaults") else options
        _check_positive("c", merged.get("neuralgrok_c"))

    # ------------------------------------------------------------------ step

    def _transform_gradients(self) -> object | None:
        if not screen_step(self, self.nonfinite):
            return SKIP_STEP
        pairs = [(p, g, group["neuralgrok_c"]) for group in self.param_groups
                 for p, g in self._grads(group)]
        if self.g_hat == "last":
            for p, g, _ in pairs:
                saved = self.own_state[p].get("last_grad")
                if saved is None or saved.shape != g.shape or saved.dtype != g.dtype:
                    self.own_state[p]["last_grad"] = g.detach().clone()
                else:
                    saved.copy_(g)
        if pairs:
            grads = [g for _, g, _ in pairs]
            new = amplify_gradients(grads, self.amplifier, c=[c for _, _, c in pairs],
                                    eps=self.eps, path=self.path, chunk_size=self.chunk_size)
            for g, n in zip(grads, new):
                g.copy_(n)
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p, _, _ in pairs], self.max_grad_norm)
        self._counters["steps"] += 1

    # ------------------------------------------------------------------ meta-step

    def meta_loss(
        self,
        model: nn.Module,
        outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None = None,
    ) -> Tensor:
        """The outer loss at the one-step lookahead, differentiable in the amplifier only.

        Nothing is changed: not the model (its buffers included: in train mode BatchNorm
        normalises with the batch's statistics but its running statistics stay put), not the
        amplifier, not the optimizers.

        Args:
            model: the module whose parameters this optimizer updates (a DDP wrapper is
                unwrapped); every parameter of the optimizer must be one of its parameters.
            outer_loss: called with ``forward``, the model evaluated at the lookahead
                parameters (``forward(*args, **kwargs)`` is ``model(*args, **kwargs)`` there),
                returns a scalar loss on the held-out batch.
            inner_loss: called with the model itself at its current parameters, returns the
                training loss whose gradient is g_hat. Required with ``g_hat="recompute"``;
                with ``g_hat="last"`` it overrides the stored gradient.
        """
        module, names, entries = self._meta_setup(model, outer_loss, inner_loss)
        sharded = [tuple(p.shape) for p, _ in entries if is_dtensor(p)]
        if sharded:
            # The lookahead here goes through functional_call with substituted parameters,
            # which FSDP2's unshard hooks would override; meta_step() takes another route.
            raise NotImplementedError(
                f"meta_loss is not available for sharded (DTensor, e.g. FSDP2) parameters "
                f"({len(sharded)} sharded parameters, shapes {sharded[:3]}): the outer loss "
                f"cannot be returned differentiable in the amplifier there. meta_step() and "
                f"maybe_meta_step() support them"
            )
        return self._meta_loss_plain(module, names, entries, outer_loss, inner_loss)

    def _meta_setup(
        self, model: nn.Module, outer_loss: Any, inner_loss: Any,
    ) -> tuple[nn.Module, dict[int, str], list[tuple[Tensor, dict[str, Any]]]]:
        """Checks shared by the meta-step paths; the module, its parameter names and the
        (parameter, group) pairs the lookahead moves."""
        if self.steps == 0:
            raise RuntimeError(
                "meta-step before any step(): there is no gradient to look ahead along; "
                "call step() first"
            )
        if not callable(outer_loss):
            raise TypeError(f"outer_loss must be callable, got {type(outer_loss).__name__}")
        if inner_loss is None and self.g_hat == "recompute":
            raise ValueError(
                "inner_loss is required with g_hat='recompute' (the paper's g_hat: the "
                "gradient of the training batch at the updated parameters); pass e.g. "
                "inner_loss=lambda model: loss_fn(model(x), y), or build the optimizer "
                "with g_hat='last'"
            )
        if inner_loss is not None and not callable(inner_loss):
            raise TypeError(f"inner_loss must be callable or None, got {type(inner_loss).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        module = unwrap_ddp(model)
        names = {id(p): n for n, p in module.named_parameters()}
        entries = [(p, group) for group in self.param_groups for p in group["params"]
                   if p.requires_grad]
        missing = [tuple(p.shape) for p, _ in entries if id(p) not in names]
        if missing:
            raise ValueError(
                f"model does not hold {len(missing)} of this optimizer's parameters (shapes "
                f"{missing[:3]}{'...' if len(missing) > 3 else ''}); pass the module whose "
                f"parameters the optimizer updates"
            )
        return module, names, entries

    def _meta_loss_plain(
        self, module: nn.Module, names: dict[int, str],
        entries: list[tuple[Tensor, dict[str, Any]]], outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None,
    ) -> Tensor:
        if inner_loss is not None:
            with torch.enable_grad(), _buffers_restored(module):
                loss_in = inner_loss(module)
                _check_scalar("inner_loss", loss_in)
                found = torch.autograd.grad(
                    loss_in, [p for p, _ in entries], allow_unused=True
                )
            g_hats = [None if g is None else g.detach() for g in found]
            all_reduce_mean(g for g in g_hats if g is not None)
        else:
            g_hats = [self.own_state.get(p, {}).get("last_grad") for p, _ in entries]

        chosen = [(p, group, g) for (p, group), g in zip(entries, g_hats) if g is not None]
        with torch.enable_grad():
            moved = amplify_gradients(
                [g for _, _, g in chosen], self.amplifier,
                c=[group["neuralgrok_c"] for _, group, _ in chosen],
                eps=self.eps, path=self.path, chunk_size=self.chunk_size,
            )
            params = {n: p.detach() for n, p in module.named_parameters()}
            for (p, group, _), step in zip(chosen, moved):
                lr = self._lookahead_step_size(group)
                params[names[id(p)]] = (p.detach() - lr * step).to(p.dtype)
            # The forwards update copies of the buffers, never the module's own: restoring
            # those afterwards would bump the version of tensors this graph saved.
            params.update((n, b.clone()) for n, b in module.named_buffers())

            def forward(*args: Any, **kwargs: Any) -> Any:
                return torch.func.functional_call(module, params, args, kwargs)

            loss = outer_loss(forward)
            _check_scalar("outer_loss", loss)
        return loss

    def _lookahead_step_size(self, group: dict[str, Any]) -> float | Tensor:
        if self.lookahead_lr == "base":
            lr = group.get("initial_lr", group["lr"])  # set by torch's LR schedulers
        else:
            lr = group["lr"]
        return lr.detach() if isinstance(lr, Tensor) else lr

    def meta_step(
        self,
        model: nn.Module,
        outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None = None,
    ) -> Tensor:
        """One meta-step: the hypergradient of :meth:`meta_loss`, averaged across DDP ranks,
        then one step of the meta-optimizer. Returns the outer loss (detached).

        Example:
            >>> import torch
            >>> from grokopt.neuralgrok import AmplifiedOptimizer
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                          hidden=(4,), g_hat="last")
            >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
            >>> loss = opt.meta_step(model, lambda fwd: fwd(torch.ones(1, 2)).pow(2).sum())
            >>> opt.meta_steps
            1
        """
        module, names, entries = self._meta_setup(model, outer_loss, inner_loss)
        amp_params = [p for g in self.meta_optimizer.param_groups for p in g["params"]]
        if any(is_dtensor(p) for p, _ in entries):
            loss, grads = self._sharded_hypergradient(module, entries, outer_loss, inner_loss)
            for p, g in zip(amp_params, grads):
                p.grad = g
        else:
            loss = self._meta_loss_plain(module, names, entries, outer_loss, inner_loss)
            found = torch.autograd.grad(loss, amp_params, allow_unused=True)
            for p, g in zip(amp_params, found):
                p.grad = torch.zeros_like(p) if g is None else g
            all_reduce_mean(p.grad for p in amp_params)
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self._counters["meta_steps"] += 1
        self._counters["last_meta_at"] = self.steps
        return loss.detach()

    def _sharded_hypergradient(
        self, module: nn.Module, entries: list[tuple[Tensor, dict[str, Any]]],
        outer_loss: Callable[[Forward], Tensor], inner_loss: Callable[[Forward], Tensor] | None,
    ) -> tuple[Tensor, list[Tensor]]:
        """The meta-step's outer loss and hypergradient with sharded (FSDP2) parameters.

        FSDP2 runs its module only on its own parameters (its hooks all-gather the shards),
        so the lookahead cannot be substituted as on one process. Instead, by the chain rule
        through ``theta' = theta - lr * G_phi(g_hat)``, the hypergradient is the
        vector-Jacobian product of G_phi with ``-lr * grad L_outer(theta')``: the lookahead
        is written into the shards in place (no grad), one ordinary forward/backward of the
        module gives ``grad L_outer(theta')`` (averaged over ranks by FSDP2, as the
        reference's mean over the combined batch), the parameters are restored exactly, and
        :func:`_amplify_vjp_sharded` does the product with cross-shard reductions.
        g_hat is recomputed the same way (one ordinary backward). Every parameter's
        ``.grad`` and every buffer are put back as they were.
        """
        params = [p for p, _ in entries]
        saved = [p.grad for p in params]
        buffers = _snapshot_buffers(module)  # unsharded: each rank keeps its own copy
        originals: list[tuple[Tensor, Tensor]] = []
        try:
            for p in params:
                p.grad = None
            if inner_loss is not None:
                with torch.enable_grad():
                    loss_in = inner_loss(module)
                    _check_scalar("inner_loss", loss_in)
                    loss_in.backward()
                g_hats = [None if p.grad is None else p.grad.detach() for p in params]
                # FSDP2 averaged the sharded gradients; parameters it does not manage
                # are averaged here, as under DDP.
                all_reduce_mean(g for g in g_hats if g is not None and not is_dtensor(g))
                for p in params:
                    p.grad = None
            else:
                g_hats = [self.own_state.get(p, {}).get("last_grad") for p in params]
            chosen = [(p, group, g) for (p, group), g in zip(entries, g_hats) if g is not None]
            cs = [group["neuralgrok_c"] for _, group, _ in chosen]
            lrs = [self._lookahead_step_size(group) for _, group, _ in chosen]
            g_list = [g for _, _, g in chosen]
            with torch.no_grad():
                moved = amplify_gradients(g_list, self.amplifier, c=cs, eps=self.eps,
                                          path=self.path, chunk_size=self.chunk_size)
                for (p, _, _), step, lr in zip(chosen, moved, lrs):
                    local = local_shard(p)
                    originals.append((local, local.clone()))
                    local.copy_((local - lr * local_shard(step)).to(p.dtype))
            with torch.enable_grad():
                loss = outer_loss(module)
                _check_scalar("outer_loss", loss)
                loss.backward()
            outer_grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach()
                           for p, _, _ in chosen]
            all_reduce_mean(g for g in outer_grads if not is_dtensor(g))
        finally:
            with torch.no_grad():
                for local, original in originals:
                    local.copy_(original)
            for p, g in zip(params, saved):
                p.grad = g
            _restore_buffers(buffers)
        plan = _piecewise_plan(self.amplifier) if self.path != "exact" else None
        upstream = [g * -lr for g, lr in zip(outer_grads, lrs)]
        grads = _amplify_vjp_sharded(g_list, upstream, self.amplifier, cs, self.eps, plan,
                                     self.chunk_size)
        return loss, grads

    def maybe_meta_step(
        self,
        model: nn.Module,
        outer_loss: Callable[[Forward], Tensor],
        inner_loss: Callable[[Forward], Tensor] | None = None,
    ) -> Tensor | None:
        """:meth:`meta_step` if ``steps`` is a positive multiple of ``meta_every`` and no
        meta-step was taken since the last step; returns its loss, or None.

        Example:
            >>> import torch
            >>> from grokopt.neuralgrok import AmplifiedOptimizer
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = AmplifiedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                          hidden=(4,), meta_every=2, g_hat="last")
            >>> outer = lambda fwd: fwd(torch.ones(1, 2)).pow(2).sum()
            >>> done = []
            >>> for _ in range(4):
            ...     model(torch.ones(1, 2)).sum().backward(); opt.step(); opt.zero_grad()
            ...     done.append(opt.maybe_meta_step(model, outer) is not None)
            >>> done
            [False, True, False, True]
        """
        steps = self.steps
        if steps == 0 or steps % self.meta_every or self._counters["last_meta_at"] == steps:
            return None
        return self.meta_step(model, outer_loss, inner_loss)

    # ------------------------------------------------------------------ state dict

    def _validate_param_state(self, param: Tensor, state: dict[str, Any]) -> None:
        saved = state.get("last_grad")
        if saved is not None and (not isinstance(saved, Tensor) or tuple(saved.shape) != tuple(param.shape)):
            shape = tuple(saved.shape) if isinstance(saved, Tensor) else type(saved).__name__
            raise ValueError(
                f"state_dict's neuralgrok_last_grad has shape {shape}, the parameter has "
                f"{tuple(param.shape)}"
            )

    def _extra_keys(self) -> tuple[str, ...]:
        return ("neuralgrok_amplifier", "neuralgrok_meta_optimizer", "neuralgrok_counters")

    def _extra_state_dict(self) -> dict[str, Any]:
        # Kept in a form that torch.distributed.checkpoint's flattened layout carries:
        # str keys without ".", and tensors, ints and floats as leaves.
        meta = self.meta_optimizer.state_dict()
        started = bool(meta["state"])
        if not started:
            # torch.distributed.checkpoint loads only the entries its target already has,
            # and a fresh meta-optimizer has none until its first step: show the entries
            # it will have (taken from a copy stepped once), flagged as not started.
            meta = {**meta, "state": _state_structure(self.meta_optimizer)}
        return {
            "neuralgrok_amplifier": {
                k.replace(".", "/"): v for k, v in self.amplifier.state_dict().items()
            },
            "neuralgrok_meta_optimizer": {
                "started": int(started),
                "state": {str(i): dict(v) for i, v in meta["state"].items()},
                "groups": {
                    str(i): {k: v for k, v in g.items()
                             if isinstance(v, (Tensor, int, float)) and k != "params"}
                    for i, g in enumerate(meta["param_groups"])
                },
            },
            "neuralgrok_counters": dict(self._counters),
        }

    def _meta_state_dict(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """The meta-optimizer's state_dict rebuilt from its saved form (see above): the
        saved state and numeric hyperparameters over the live optimizer's groups."""
        live = self.meta_optimizer.state_dict()
        state = saved.get("state", {}) if saved.get("started", 1) else {}  # DCP drops empty dicts
        groups = saved.get("groups", {})
        return {
            "state": {int(i): dict(v) for i, v in state.items()},
            "param_groups": [{**g, **groups.get(str(i), {})}
                             for i, g in enumerate(live["param_groups"])],
        }

    def _check_extra_state_dict(self, extra: Mapping[str, Any]) -> None:
        for key in self._extra_keys():
            if key not in extra:
                raise ValueError(
                    f"state_dict lacks {key!r} (NeuralGrok's amplifier, meta-optimizer and "
                    f"counters, kept in the state of the first parameter that requires grad)"
                )
        saved = extra["neuralgrok_amplifier"]
        own = {k.replace(".", "/"): v for k, v in self.amplifier.state_dict().items()}
        if not isinstance(saved, Mapping) or set(saved) != set(own):
            raise ValueError(
                f"state_dict's neuralgrok_amplifier has keys "
                f"{sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__}, this "
                f"amplifier has {sorted(own)}"
            )
        for k, v in own.items():
            if not isinstance(saved[k], Tensor) or saved[k].shape != v.shape:
                raise ValueError(
                    f"state_dict's neuralgrok_amplifier[{k!r}] does not match this amplifier's "
                    f"shape {tuple(v.shape)}"
                )
        meta = extra["neuralgrok_meta_optimizer"]
        n_params = len([p for g in self.meta_optimizer.param_groups for p in g["params"]])
        if (
            not isinstance(meta, Mapping) or not set(meta) <= {"started", "state", "groups"}
            or not isinstance(meta.get("state", {}), Mapping)
            or not isinstance(meta.get("groups", {}), Mapping)
            or any(not str(i).isdigit() or int(i) >= n_params for i in meta.get("state", {}))
            or any(not str(i).isdigit() or int(i) >= len(self.meta_optimizer.param_groups)
                   for i in meta.get("groups", {}))
        ):
            raise ValueError(
                "state_dict's neuralgrok_meta_optimizer does not fit this meta-optimizer "
                "(different parameters or groups)"
            )
        counters = extra["neuralgrok_counters"]
        if (
            not isinstance(counters, Mapping) or set(counters) != set(self._counters)
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counters.values())
        ):
            raise ValueError(
                f"state_dict's neuralgrok_counters must hold non-negative ints under "
                f"{sorted(self._counters)}, got {counters!r}"
            )

    def _load_extra_state_dict(self, extra: Mapping[str, Any]) -> None:
        self.amplifier.load_state_dict(
            {k.replace("/", "."): v for k, v in extra["neuralgrok_amplifier"].items()}
        )
        self.meta_optimizer.load_state_dict(self._meta_state_dict(extra["neuralgrok_meta_optimizer"]))
        self._counters = dict(extra["neuralgrok_counters"])

    def __repr__(self) -> str:
        base = super().__repr__()
        head, _, rest = base.partition(",\n")
        return (f"{head}, meta_every={self.meta_every}, g_hat={self.g_hat!r}, "
                f"lookahead_lr={self.lookahead_lr!r}, path={self.path!r},\n{rest}")


def _state_structure(optimizer: Optimizer) -> dict[int, dict[str, Any]]:
    """The per-parameter state ``optimizer`` will hold after its first step: a copy of it,
    stepped once with zero gradients and learning rate 0, gives the entries' names, shapes
    and types (their values are not used)."""
    probe = copy.deepcopy(optimizer)
    for group in probe.param_groups:
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], Tensor) else 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    with torch.no_grad():
        probe.step()
    return probe.state_dict()["state"]


def _check_scalar(name: str, loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{name} must return a scalar tensor, got {got}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name} returned a loss that does not depend on the model's parameters; "
            f"compute it from the forward it is given"
        )
