"""NeuralGrok's transform G_phi and its one vector-Jacobian product.

For each gradient tensor ``g`` the amplifier gives ``f = amplifier(g)`` elementwise and

    G_phi(g) = c * (w * g) / (||w * g|| + eps),    w = exp(f - max f)

(``w`` is the softmax of ``f`` without its normaliser, which the renormalisation cancels);
see docs/methods.md. :func:`amplify_gradients` computes it for plain tensors and for sharded
(DTensor, e.g. FSDP2) ones; :func:`amplify_gradients_vjp` gives its derivative in the
amplifier's weights without an autograd graph through the transform. Both that function and
the autograd Function of the piecewise-linear path use one written-out vector-Jacobian
product, :func:`_gphi_vjp`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import check_choice, check_float, check_int, check_type, describe
from ._compat import extremes
from ._distributed import is_dtensor, local_shard, shard_groups
from .amplifier import (
    Gains,
    Located,
    PiecewiseTable,
    amplifier_dtype_device,
    piecewise_plan,
    piecewise_table,
)

__all__ = ["CHUNK_SIZE", "PATHS", "amplify_gradients", "amplify_gradients_vjp", "piecewise_plan_for"]

PATHS = ("auto", "pwl", "exact")
CHUNK_SIZE = 1 << 18
"""Default entries per chunk of the no-grad paths and of the vector-Jacobian product."""

Groups = tuple[Any, ...]


def piecewise_plan_for(amplifier: nn.Module, path: str) -> list[tuple[str, Any]] | None:
    """The amplifier's piecewise plan if ``path`` uses the table, else None; ValueError if
    ``path="pwl"`` asks for a table that this amplifier does not have."""
    if path == "exact":
        return None
    plan = piecewise_plan(amplifier)
    if plan is None and path == "pwl":
        raise ValueError(
            "path must be 'auto' or 'exact' for this amplifier (path='pwl' needs one built only "
            "from nn.Linear, nn.ReLU, nn.LeakyReLU and nn.Identity, in nn.Sequential), got 'pwl'"
        )
    return plan


_UNSET = object()


def _check_arguments(grads: Any, amplifier: Any, c: Any, eps: Any, path: Any,
                     chunk_size: Any) -> tuple[list[Tensor], list[float]]:
    check_choice("path", path, PATHS)
    check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
    check_type("amplifier", amplifier, nn.Module, "an nn.Module mapping (n, 1) to (n, 1)")
    if isinstance(grads, Tensor) or not isinstance(grads, Iterable):
        raise TypeError(f"grads must be a sequence of tensors, got {describe(grads)}")
    grads = list(grads)
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor) or not g.is_floating_point():
            got = f"a {g.dtype} tensor" if isinstance(g, Tensor) else describe(g)
            raise TypeError(f"grads[{i}] must be a floating-point tensor, got {got}")
    cs = list(c) if isinstance(c, Sequence) and not isinstance(c, str) else [c] * len(grads)
    if len(cs) != len(grads):
        raise ValueError(
            f"c must be a float or a sequence of {len(grads)} floats (one per gradient), got "
            f"{len(cs)} values"
        )
    last: Any = _UNSET
    for value in cs:
        if value is not last:  # a group's c repeats: each object is checked once in a row
            check_float("c", value, minimum=0, min_open=True)
            last = value
    check_float("eps", eps, minimum=0)
    return grads, cs


def _work_dtype(g: Tensor, amp_dtype: torch.dtype) -> torch.dtype:
    """The wider of fp32, the gradient's dtype and the amplifier's."""
    return torch.promote_types(torch.promote_types(g.dtype, torch.float32), amp_dtype)


def _reduce(values: list[Tensor], groups: list[Groups], op: Any) -> list[Tensor]:
    """All-reduce ``values[i]`` (small tensors) over each process group in ``groups[i]``, one
    collective per distinct set of groups; untouched (and no host sync) when no tensor is
    sharded. The collectives run on fp64 host copies."""
    if not any(groups):
        return values
    stacked = torch.stack([v.detach().to(device="cpu", dtype=torch.float64) for v in values])
    buckets: dict[Groups, list[int]] = {}
    for i, gs in enumerate(groups):
        if gs:
            buckets.setdefault(gs, []).append(i)
    for gs, idx in buckets.items():
        part = stacked[idx]  # advanced indexing: a contiguous copy, safe to reduce in place
        for group in gs:
            dist.all_reduce(part, op=op, group=group)
        stacked[idx] = part
    return [s.to(device=v.device, dtype=v.dtype) for s, v in zip(stacked, values)]


def _table(plan: list[tuple[str, Any]] | None, grads: list[Tensor], locals_: list[Tensor],
           groups: list[Groups], dtype: torch.dtype, device: torch.device,
           runs: list[list[int]] | None = None) -> PiecewiseTable | None:
    """The piecewise table over the range of all gradients, over every shard (as in the
    unsharded run); differentiable in the amplifier while grad mode is on. ``runs``: the
    unsharded gradients' :func:`_buckets`, if the caller has them."""
    nonempty = [i for i, g in enumerate(grads) if g.numel()]
    if plan is None or not nonempty:
        return None
    if any(groups):
        # min and -max, so that one MIN reduction serves both ends
        ends = [extremes(x.detach()).to(device=device, dtype=dtype) * torch.tensor(
                    [1.0, -1.0], dtype=dtype, device=device) if x.numel()
                else torch.full((2,), math.inf, dtype=dtype, device=device) for x in locals_]
        ends = _reduce(ends, groups, dist.ReduceOp.MIN)
        lo, neg_hi = torch.stack([ends[i] for i in nonempty]).amin(0).tolist()
        hi = -neg_hi
    else:
        # Small tensors together (at most a chunk's entries at a time): one reduction each
        # run instead of a few small operations per tensor.
        ends = []
        for run in _buckets(locals_, CHUNK_SIZE) if runs is None else runs:
            x = (locals_[run[0]] if len(run) == 1
                 else torch.cat([locals_[i].reshape(-1) for i in run])).detach()
            ends.append(extremes(x).to(device=device, dtype=dtype))
        both = torch.stack(ends)
        lo, hi = torch.stack([both[:, 0].min(), both[:, 1].max()]).tolist()  # one host read
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo = hi = 0.0  # inf/NaN entries make the output NaN, as in the paper
    return piecewise_table(plan, lo, hi, dtype, device)


# ---------------------------------------------------------------------------- the transform


def amplify_gradients(
    grads: Sequence[Tensor],
    amplifier: nn.Module,
    *,
    c: float | Sequence[float] = 1.0,
    eps: float = 1e-12,
    path: str = "auto",
    chunk_size: int | None = CHUNK_SIZE,
) -> list[Tensor]:
    """G_phi (docs/methods.md) for each tensor; new tensors, the inputs are not changed.

    ``f = amplifier(g)`` elementwise, ``w = exp(f - max f)`` and ``c * w*g / (||w*g|| + eps)``,
    in the wider of fp32 and the amplifier's dtype, returned in each gradient's dtype. An
    all-zero gradient gives zeros. While grad mode is on, the result is differentiable in
    the amplifier's parameters (the gradients themselves are treated as constants).

    Paths (the same function, up to rounding):

    - ``"pwl"``: the amplifier is a ``Linear``/``ReLU``/``LeakyReLU`` stack, hence exactly
      piecewise linear in its input. Its kinks inside ``[min g, max g]`` and one
      (intercept, slope) per piece are computed from the weights, and each entry's piece is
      found by binary search (on a CPU only for the entries off the piece that holds 0,
      which two comparisons find). No P x hidden activations exist at any time. Consecutive
      small tensors of one dtype and device, up to ``chunk_size`` entries in all, are looked up
      and normalised together as one flat vector (each over its own segment); without
      grad mode their outputs are views of one buffer per bucket, as ``torch.split``'s are.
    - ``"exact"``: the MLP on every entry (the paper's way); without grad mode it runs in
      chunks of ``chunk_size`` entries so that its memory is O(chunk_size x hidden).
    - ``"auto"``: ``"pwl"`` when the amplifier allows it, else ``"exact"``.

    Args:
        grads: gradient tensors (any float dtype).
        amplifier: a module mapping (n, 1) to (n, 1).
        c: target norm per tensor, one float or one per tensor.
        eps: added to the norm; keeps an all-zero gradient at zero.
        path: ``"auto"``, ``"pwl"`` or ``"exact"``.
        chunk_size: entries per chunk of the no-grad paths and per bucket of small tensors
            on the pwl path (None: all at once).

    Example:
        >>> from grokopt import make_amplifier
        >>> amp = make_amplifier((8,))
        >>> g = torch.tensor([3.0, -4.0])
        >>> out, = amplify_gradients([g], amp, c=2.0)
        >>> round(out.norm().item(), 5)
        2.0
    """
    grads, cs = _check_arguments(grads, amplifier, c, eps, path, chunk_size)
    if not grads:
        return []
    plan = piecewise_plan_for(amplifier, path)
    amp_dtype, amp_device = amplifier_dtype_device(amplifier, grads[0])
    differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in amplifier.parameters())
    if any(is_dtensor(g) for g in grads):
        if differentiable:
            raise NotImplementedError(
                "amplify_gradients is not differentiable for sharded (DTensor, e.g. FSDP2) "
                "gradients (its per-tensor max and norm span the ranks); call it under "
                "torch.no_grad() (as step() does), or use amplify_gradients_vjp for its "
                "derivative (as AmplifiedOptimizer.meta_step does)"
            )
        return _amplify_sharded(grads, amplifier, cs, eps, plan, chunk_size, amp_dtype, amp_device)

    detached = [g.detach() for g in grads]
    runs = _buckets(detached, chunk_size or CHUNK_SIZE)
    table = _table(plan, grads, detached, [()] * len(grads), amp_dtype, amp_device, runs)
    # With autograd on, chunks would all be kept for backward anyway.
    gains = Gains(amplifier, table, None if differentiable and table is None else chunk_size,
                  amp_dtype, amp_device)
    out: list[Tensor | None] = [None] * len(detached)
    if table is not None:
        # Small gradients together: a few flat operations per bucket instead of a dozen
        # per tensor (see _bucket_forward); the rest one by one below. A bucket holds at
        # most a chunk's entries even with chunk_size=None, which chunks nothing else.
        for bucket in runs:
            if len(bucket) < 2:
                continue
            members = [detached[i] for i in bucket]
            work = _work_dtype(members[0], amp_dtype)
            parts = [g.reshape(-1).to(amp_device) for g in members]
            bucket_cs = tuple(cs[i] for i in bucket)
            if differentiable:
                ys = _PiecewiseAmplifyBucket.apply(table.intercept, table.slope, table.kinks,
                                                   bucket_cs, eps, work, *parts)
            else:
                x = torch.cat(parts)
                seg = _Segments.of([part.numel() for part in parts], x.device)
                # Views of one buffer (as torch.split's): a bucket is at most one chunk.
                y = _bucket_forward(table, x, seg, _per_segment(bucket_cs, work, x.device), eps,
                                    work)[0]
                ys = seg.split(y)
            for i, y in zip(bucket, ys):
                g = detached[i]
                out[i] = y.view(g.shape).to(device=g.device, dtype=g.dtype)
    for i, (g, c_i) in enumerate(zip(detached, cs)):
        if out[i] is not None:
            continue
        out[i] = _amplify_one(g, c_i, eps, table, gains, differentiable, amp_dtype, amp_device,
                              chunk_size)
    return out  # type: ignore[return-value]


def _amplify_one(g: Tensor, c_i: float, eps: float, table: PiecewiseTable | None, gains: Gains,
                 differentiable: bool, amp_dtype: torch.dtype, amp_device: torch.device,
                 chunk_size: int | None) -> Tensor:
    """G_phi of one (detached) gradient tensor, the per-tensor route of amplify_gradients."""
    if g.numel() == 0:
        return torch.zeros_like(g)
    work = _work_dtype(g, amp_dtype)
    if differentiable and table is not None:
        y = _PiecewiseAmplify.apply(table.intercept, table.slope, table.kinks,
                                    g.reshape(-1).to(amp_device), c_i, eps, work,
                                    chunk_size or CHUNK_SIZE)
        return y.view(g.shape).to(device=g.device, dtype=g.dtype)
    f = gains(g.reshape(-1)).to(work)
    gw = g.reshape(-1).to(device=amp_device, dtype=work)
    if differentiable:
        u = torch.exp(f - f.max()) * gw
        y = u * (c_i / (torch.linalg.vector_norm(u) + eps))
    else:
        # In place: the only P-sized temporaries are f (and a cast of g if needed).
        y = f.sub_(f.max()).exp_().mul_(gw)
        y.mul_(c_i / (torch.linalg.vector_norm(y) + eps))
    return y.view(g.shape).to(device=g.device, dtype=g.dtype)


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

    locals_ = [local_shard(g).detach().reshape(-1) for g in grads]
    groups = [shard_groups(g) for g in grads]
    table = _table(plan, grads, locals_, groups, amp_dtype, amp_device)
    gains = Gains(amplifier, table, chunk_size, amp_dtype, amp_device)
    fs = [gains(x).to(_work_dtype(g, amp_dtype)) for g, x in zip(grads, locals_)]
    maxima = _reduce([f.max() if f.numel() else f.new_full((), -math.inf) for f in fs],
                     groups, dist.ReduceOp.MAX)
    us = [f.sub_(m).exp_().mul_(x.to(device=amp_device, dtype=f.dtype))
          for f, m, x in zip(fs, maxima, locals_)]
    squares = _reduce([u.pow(2).sum() for u in us], groups, dist.ReduceOp.SUM)
    out = []
    for g, u, c_i, sq in zip(grads, us, cs, squares):
        local = local_shard(g)
        y = u.mul_(c_i / (sq.sqrt() + eps)).view(local.shape)
        y = y.to(device=local.device, dtype=local.dtype)
        if is_dtensor(g):
            y = DTensor.from_local(y, g.device_mesh, g.placements, run_check=False,  # type: ignore[attr-defined]
                                   shape=g.shape, stride=g.stride())
        out.append(y)
    return out


# ---------------------------------------------------------------------------- its derivative


def _gphi_vjp(
    xs: list[Tensor], vs: list[Tensor], cs: list[float], eps: float, works: list[torch.dtype],
    gains: Gains, groups: list[Groups], chunk: int, maxima: list[Tensor] | None = None,
) -> dict[Groups, list[Tensor]]:
    """The vector-Jacobian product of G_phi: d/dtheta of sum_i <v_i, G_phi(x_i)>, theta the
    parameters of ``gains`` (:meth:`Gains.params`), per set of reduction groups and not yet
    summed over those groups.

    ``xs[i]``, ``vs[i]``: flat (local shards of) a gradient and its cotangent. Write
    ``u = exp(f - m) x``, ``m = max f``, ``N = ||u||``, ``y = c u / (N + eps)``. Then the
    cotangent of each gain is

        dL/df = (alpha v - beta u) u + gamma [f = m],
        alpha = c / (N+eps),  beta = c (u.v) / ((N+eps)^2 N),  gamma = -c (u.v) eps / ((N+eps)^2 T),

    the last term being the path through ``m`` (``dL/dm = -sum dL/df`` in closed form; it
    matters only through ``eps``), shared evenly among the T entries that attain the max, as
    autograd's max does. ``m``, ``N``, ``u.v`` and ``T`` are all-reduced over ``groups[i]``;
    everything else is local and runs in chunks of ``chunk`` entries, recomputing the gains,
    so that memory is O(chunk) beyond the inputs. ``maxima`` skips the pass that finds ``m``.
    """
    device = gains.device

    def chunks(i: int) -> Iterable[tuple[Tensor, Tensor | Located | None, Tensor, Tensor, Tensor]]:
        """(x, its pieces, [f = m], u, v) per chunk of tensor i."""
        for x, v in zip(xs[i].split(chunk), vs[i].split(chunk)):
            if x.numel() == 0:
                continue
            where = gains.locate(x)
            f = gains(x, where).to(works[i])
            top = f == maxima[i]  # type: ignore[index]
            u = f.sub_(maxima[i]).exp_().mul_(x.to(device=device, dtype=works[i]))  # type: ignore[index]
            yield x, where, top, u, v.to(device=device, dtype=works[i])

    if maxima is None:
        maxima = []
        for x, work in zip(xs, works):
            m = torch.full((), -math.inf, dtype=work, device=device)
            for part in x.split(chunk):
                if part.numel():
                    m = torch.maximum(m, gains(part).max().to(work))
            maxima.append(m)
        maxima = _reduce(maxima, groups, dist.ReduceOp.MAX)
    stats = []
    for i, work in enumerate(works):
        s = torch.zeros(3, dtype=work, device=device)  # ||u||^2, u.v, T
        for _, _, top, u, v in chunks(i):
            s += torch.stack([u.pow(2).sum(), (u * v).sum(), top.sum().to(work)])
        stats.append(s)
    stats = _reduce(stats, groups, dist.ReduceOp.SUM)

    buckets: dict[Groups, list[Tensor]] = {}
    for i, (c, s) in enumerate(zip(cs, stats)):
        acc = buckets.setdefault(groups[i], [torch.zeros_like(p) for p in gains.params()])
        square, dot, ties = s.unbind()
        alpha, beta, gamma = _vjp_coefficients(c, square.sqrt(), dot, ties, eps)
        for x, where, top, u, v in chunks(i):
            df = (v * alpha - u * beta).mul_(u).add_(top * gamma)
            gains.pullback(x, df, acc, where)
    return buckets


def _vjp_coefficients(c: float | Tensor, norm: Tensor, dot: Tensor, ties: Tensor,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """alpha, beta and gamma of :func:`_gphi_vjp`'s cotangent of the gains, from c, N = ||u||,
    u.v and the number T of entries tied for the max (per tensor, or per segment as
    tensors)."""
    inv = 1 / (norm + eps)
    live = norm > 0
    alpha = c * inv
    beta = torch.where(live, c * dot * inv * inv / norm, 0.0)
    gamma = torch.where(live & (ties > 0), -c * dot * eps * inv * inv / ties, 0.0)
    return alpha, beta, gamma


class _PiecewiseAmplify(torch.autograd.Function):
    """G_phi of one flat tensor on the pwl path, differentiable in the pieces' (intercept,
    slope), keeping nothing P-sized for backward but the gradient itself.

    Autograd would save the indices, gathered slopes, w and u of every entry (about 35 bytes
    per entry at fp32, 1.8 GB at 50M parameters); backward (:func:`_gphi_vjp`) recomputes
    them chunk by chunk from g and the K pieces instead, so its memory is O(chunk) beyond its
    input and output.
    """

    @staticmethod
    def forward(ctx: Any, intercept: Tensor, slope: Tensor, kinks: Tensor, g: Tensor,
                c: float, eps: float, work: torch.dtype, chunk: int) -> Tensor:
        table = PiecewiseTable(kinks, intercept, slope)
        y = torch.empty(g.numel(), dtype=work, device=intercept.device)
        for part, out in zip(g.split(chunk), y.split(chunk)):
            out.copy_(table.lookup(part.to(intercept.dtype)))
        m = y.max()
        for part, out in zip(g.split(chunk), y.split(chunk)):
            out.sub_(m).exp_().mul_(part.to(work))
        y.mul_(c / (torch.linalg.vector_norm(y) + eps))
        ctx.save_for_backward(intercept, slope, kinks, g, m)
        ctx.c, ctx.eps, ctx.work, ctx.chunk = c, eps, work, chunk
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        intercept, slope, kinks, g, m = ctx.saved_tensors
        gains = Gains(None, PiecewiseTable(kinks, intercept, slope), None, intercept.dtype,
                      intercept.device)
        (grad_a, grad_s), = _gphi_vjp([g], [gy], [ctx.c], ctx.eps, [ctx.work], gains, [()],
                                      ctx.chunk, maxima=[m]).values()
        return grad_a, grad_s, None, None, None, None, None, None


# ---------------------------------------------------------------------------- buckets
#
# A model has many small gradient tensors (biases, norms, embeddings): per tensor, the
# transform and its derivative are a dozen small kernels and as many Python calls each. On
# the piecewise-linear path the small ones are concatenated instead, at most a chunk's
# entries per bucket, so that memory stays O(chunk), and each bucket takes a few flat
# operations; the per-tensor max, norm and dot products become segment reductions.


def _buckets(grads: Sequence[Tensor], limit: int) -> list[list[int]]:
    """Indices of the nonempty tensors of ``grads`` in runs of consecutive ones that share a
    dtype and a device and hold at most ``limit`` entries together (a larger tensor is a run
    alone)."""
    runs: list[list[int]] = []
    size = 0
    for i, g in enumerate(grads):
        n = g.numel()
        if n == 0:
            continue
        last = grads[runs[-1][-1]] if runs else None
        if last is None or size + n > limit or (last.dtype, last.device) != (g.dtype, g.device):
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += n
    return runs


SEGMENT_KERNELS: bool | None = None
"""How a bucket's per-segment shifts and scales run. On a CPU (None, the default) as one
kernel per segment, each taking its 0-dim factor as a scalar (a multi-tensor op over the
segments' views): ~4x faster there than repeating the factors over the entries and one
multiply, which is what other devices do (one kernel per segment would be a launch each
there). True or False forces one way: the tests check each."""


def _per_segment_kernels(device: torch.device) -> bool:
    return SEGMENT_KERNELS if SEGMENT_KERNELS is not None else device.type == "cpu"


class _Segments(NamedTuple):
    """Consecutive segments of a flat tensor: one per gradient of a bucket."""

    sizes: tuple[int, ...]
    lengths: Tensor  # int64, on the bucket's device
    total: int

    @classmethod
    def of(cls, sizes: Sequence[int], device: torch.device) -> _Segments:
        return cls(tuple(sizes), _on_device(torch.tensor(sizes, dtype=torch.int64), device),
                   sum(sizes))

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self.sizes)

    def spread(self, per_segment: Tensor) -> Tensor:
        """Each segment's value repeated over its entries."""
        return per_segment.repeat_interleave(self.lengths, output_size=self.total)

    def shift_(self, x: Tensor, per_segment: Tensor) -> Tensor:
        """``x`` less each segment's value over that segment, in place."""
        if _per_segment_kernels(x.device):
            torch._foreach_sub_(self.split(x), per_segment.unbind())
            return x
        return x.sub_(self.spread(per_segment))

    def scale_(self, x: Tensor, per_segment: Tensor) -> Tensor:
        """``x`` times each segment's value over that segment, in place."""
        if _per_segment_kernels(x.device):
            torch._foreach_mul_(self.split(x), per_segment.unbind())
            return x
        return x.mul_(self.spread(per_segment))

    def maxima(self, x: Tensor) -> Tensor:
        return torch.stack(torch._foreach_max(self.split(x)))

    def norms(self, x: Tensor) -> Tensor:
        return torch.stack(torch._foreach_norm(self.split(x)))

    def sums(self, x: Tensor) -> Tensor:
        # unsafe: the lengths are valid by construction, and checking them syncs a GPU
        return torch.segment_reduce(x, "sum", lengths=self.lengths, unsafe=True)


def _on_device(host: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without waiting for the device (a blocking copy to a
    GPU synchronises its stream first)."""
    return host.to(device, non_blocking=True)


def _per_segment(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _on_device(torch.tensor(values, dtype=dtype), device)


def _bucket_forward(table: PiecewiseTable, x: Tensor, seg: _Segments, cs: Tensor, eps: float,
                    work: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """G_phi of every segment of the flat ``x`` at once (flat, in ``work``), each segment's
    max f and each segment's norm of u = exp(f - max f) x."""
    f = table.lookup(x.to(table.intercept.dtype)).to(work)
    m = seg.maxima(f)
    y = seg.shift_(f, m).exp_().mul_(x.to(work))
    norm = seg.norms(y)
    seg.scale_(y, cs / (norm + eps))
    return y, m, norm


def _bucket_vjp(table: PiecewiseTable, x: Tensor, v: Tensor, seg: _Segments, cs: Tensor,
                eps: float, work: torch.dtype, m: Tensor, norm: Tensor) -> list[Tensor]:
    """d/d(intercept, slope) of <v, G_phi(x)> over the segments of a bucket: the same
    written-out product as :func:`_gphi_vjp`, with its per-tensor statistics as segment
    reductions (``m`` and ``norm`` as :func:`_bucket_forward` gave them)."""
    xt = x.to(table.intercept.dtype)
    where = table.locate(xt)
    d = seg.shift_(table.lookup(xt, where).to(work), m)  # f - m: 0 exactly where f = m
    top = (d == 0).to(work)
    u = d.exp_().mul_(x.to(work))
    uv = u * v.to(work)
    alpha, beta, gamma = _vjp_coefficients(cs, norm, seg.sums(uv), seg.sums(top), eps)
    # (alpha v - beta u) u + gamma [f = m], as alpha uv - beta u^2 + gamma [f = m]
    df = seg.scale_(uv, alpha).sub_(seg.scale_(u.square_(), beta)).add_(seg.scale_(top, gamma))
    out = [torch.zeros_like(table.intercept), torch.zeros_like(table.slope)]
    table.pullback(xt, df, out, where)
    return out


class _PiecewiseAmplifyBucket(torch.autograd.Function):
    """G_phi of a bucket of flat gradients (``parts``) on the pwl path, one output per
    gradient, differentiable in the pieces' (intercept, slope). As :class:`_PiecewiseAmplify`
    it keeps only its inputs and per-gradient scalars for backward, which recomputes the rest; the
    concatenation lives only inside forward and backward, one chunk at most."""

    @staticmethod
    def forward(ctx: Any, intercept: Tensor, slope: Tensor, kinks: Tensor,
                cs: tuple[float, ...], eps: float, work: torch.dtype,
                *parts: Tensor) -> tuple[Tensor, ...]:
        x = torch.cat(parts)
        seg = _Segments.of([part.numel() for part in parts], x.device)
        c = _per_segment(cs, work, x.device)
        y, m, norm = _bucket_forward(PiecewiseTable(kinks, intercept, slope), x, seg, c, eps, work)
        ctx.save_for_backward(intercept, slope, kinks, c, m, norm, *parts)
        ctx.seg, ctx.eps, ctx.work = seg, eps, work
        # Separate tensors: views of one output could not be changed in place by a caller.
        return tuple(part.clone() for part in seg.split(y))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        intercept, slope, kinks, c, m, norm, *parts = ctx.saved_tensors
        grad_a, grad_s = _bucket_vjp(PiecewiseTable(kinks, intercept, slope), torch.cat(parts),
                                     torch.cat(grads), ctx.seg, c, ctx.eps, ctx.work, m, norm)
        return (grad_a, grad_s, None, None, None, None) + (None,) * len(parts)


def amplify_gradients_vjp(
    grads: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    amplifier: nn.Module,
    *,
    c: float | Sequence[float] = 1.0,
    eps: float = 1e-12,
    path: str = "auto",
    chunk_size: int | None = CHUNK_SIZE,
) -> list[Tensor]:
    """d/dphi of ``sum_i <cotangents[i], amplify_gradients(grads, amplifier, ...)[i]>``, one
    tensor per parameter of the amplifier, for plain and for sharded (DTensor) gradients.

    No autograd graph spans the transform: the derivative is written out (the same one the
    pwl path's backward uses), its per-tensor max, norm and dot products all-reduced over the
    mesh dimensions each DTensor is split along, and only the gains are differentiated, in
    chunks of ``chunk_size`` entries (None: all at once). This is the meta-step's
    hypergradient under FSDP2, equal to the unsharded one up to rounding. Plain tensors in
    the list are replicated: their part is not summed over ranks. Every rank must call it
    with the same list of tensors, since the collectives are matched by order.

    Example:
        >>> from grokopt import make_amplifier
        >>> amp = make_amplifier((4,))
        >>> g, v = [torch.tensor([3.0, -4.0])], [torch.tensor([1.0, 0.0])]
        >>> grads = amplify_gradients_vjp(g, v, amp)
        >>> [t.shape for t in grads] == [p.shape for p in amp.parameters()]
        True
    """
    grads, cs = _check_arguments(grads, amplifier, c, eps, path, chunk_size)
    if isinstance(cotangents, Tensor) or not isinstance(cotangents, Iterable):
        raise TypeError(f"cotangents must be a sequence of tensors, got {describe(cotangents)}")
    cotangents = list(cotangents)
    shapes = [tuple(g.shape) for g in grads]
    if [tuple(v.shape) if isinstance(v, Tensor) else None for v in cotangents] != shapes:
        raise ValueError(f"cotangents must be tensors of the gradients' shapes {shapes}, got "
                         f"{[tuple(v.shape) if isinstance(v, Tensor) else describe(v) for v in cotangents]}")
    amp_params = list(amplifier.parameters())
    if not grads:
        return [torch.zeros_like(p) for p in amp_params]
    plan = piecewise_plan_for(amplifier, path)
    amp_dtype, amp_device = amplifier_dtype_device(amplifier, grads[0])
    xs = [local_shard(g).detach().reshape(-1) for g in grads]
    vs = [local_shard(v).detach().reshape(-1) for v in cotangents]
    groups = [shard_groups(g) for g in grads]
    with torch.enable_grad():
        table = _table(plan, grads, xs, groups, amp_dtype, amp_device)
    detached = None if table is None else PiecewiseTable(*(t.detach() for t in table))
    gains = Gains(amplifier, detached, chunk_size, amp_dtype, amp_device)
    works = [_work_dtype(g, amp_dtype) for g in grads]
    with torch.no_grad():
        buckets = _gphi_vjp(xs, vs, cs, eps, works, gains, groups, chunk_size or CHUNK_SIZE)
    total = [torch.zeros_like(p) for p in amp_params]
    # The table is mapped to the amplifier's weights before the sum over ranks: the weights
    # are the same on every rank, the number of pieces could differ by rounding.
    for gs, acc in buckets.items():
        if table is not None:
            found = torch.autograd.grad([table.intercept, table.slope], amp_params, acc,
                                        retain_graph=True, allow_unused=True)
            acc = [torch.zeros_like(p) if g is None else g for p, g in zip(amp_params, found)]
        for t, part in zip(total, acc):
            part = part.contiguous()
            for group in gs:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            t.add_(part)
    return total
