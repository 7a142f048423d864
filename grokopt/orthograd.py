"""⊥Grad: step on the part of the gradient orthogonal to the weights (Prieto et al. 2025).

Per parameter tensor, with ``w`` and ``g`` flattened::

    g_perp = g - (w.g) / (w.w + eps) * w
    g_out  = g_perp * ||g|| / (||g_perp|| + eps)

The component of ``g`` along ``w`` only grows or shrinks the weight norm ("naive loss
minimisation"); removing it lets a network grok without weight decay. The rescaling keeps
the gradient's length, so the inner optimizer's learning rate keeps its meaning.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checks import check_float
from ._compat import Tensors
from ._distributed import dtensor_type
from .wrapper import KEEP_SCRATCH_BYTES, GradientTransform

__all__ = ["OrthoGrad", "orthogonalize_"]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    # A dot product of a bf16 tensor in bf16 loses the small projection entirely.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reference(w: Tensor, g: Tensor, eps: float) -> None:
    acc = _accumulate_dtype(g.dtype)
    wf, gf = w.reshape(-1).to(acc), g.reshape(-1).to(acc)
    coef = torch.dot(wf, gf) / (torch.dot(wf, wf) + eps)
    perp = gf - coef * wf
    out = perp * (torch.linalg.vector_norm(gf) / (torch.linalg.vector_norm(perp) + eps))
    g.copy_(out.view_as(g))


class _Stack(NamedTuple):
    """Tensors of one size as the rows of two matrices (weights, gradients), each row also
    viewed in its tensor's shape; the transform's outputs replace the weights' rows."""

    key: tuple[Any, ...]  # what the stack was built for: (size, dtype, device, shapes)
    w: Tensor
    g: Tensor
    w_rows: list[Tensor]
    g_rows: list[Tensor]


def _stack_key(gs: list[Tensor], acc: torch.dtype) -> tuple[Any, ...]:
    return (gs[0].numel(), acc, gs[0].device, tuple(g.shape for g in gs))


def _new_stack(key: tuple[Any, ...]) -> _Stack:
    numel, dtype, device, shapes = key
    w, g = (torch.empty(len(shapes), numel, dtype=dtype, device=device) for _ in range(2))
    rows = [[r.view(s) for r, s in zip(m.unbind(0), shapes)] for m in (w, g)]
    return _Stack(key, w, g, *rows)


def _stacked(stack: _Stack, ws: list[Tensor], gs: list[Tensor], eps: float) -> list[Tensor]:
    """The transform of tensors of one size as the rows of a stack: batched norms and
    elementwise operations instead of a dozen operations per tensor, and no temporary of
    the stack's size. Returns the output rows, shaped (the weights' matrix, overwritten).

    The same arithmetic as :func:`_per_tensor`, so the same results bit for bit for
    contiguous tensors: the dot products are taken on the tensors themselves (a BLAS dot
    sums in an order that depends on where the data starts), the norms of rows reduce as
    the norms of the tensors do, and the rest is elementwise."""
    acc = stack.w.dtype
    dots = _dots(_as(ws, acc), _as(gs, acc))
    torch._foreach_copy_(stack.g_rows, gs)
    torch._foreach_copy_(stack.w_rows, ws)
    w, g = stack.w, stack.g
    w_norms = torch.linalg.vector_norm(w, dim=1)
    g_norms = torch.linalg.vector_norm(g, dim=1)
    coefs = dots / (w_norms * w_norms + eps)
    w.mul_(coefs.neg().unsqueeze(1)).add_(g)  # w * -c + g
    w.mul_((g_norms / (torch.linalg.vector_norm(w, dim=1) + eps)).unsqueeze(1))
    return stack.w_rows


def _as(xs: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [x if x.dtype == dtype else x.to(dtype) for x in xs]


def _dots(ws: list[Tensor], gs: list[Tensor]) -> Tensor:
    """w.g for each pair, one BLAS dot each (both routes: see :func:`_stacked`)."""
    return torch.stack([torch.dot(w.reshape(-1), g.reshape(-1)) for w, g in zip(ws, gs)])


#: A function from a stack's key to the stack to use (see :class:`_KeptStacks`).
Stacks = Callable[[tuple[Any, ...]], _Stack]


def _foreach(ws: list[Tensor], gs: list[Tensor], eps: float,
             outs: list[Tensor | None] | None = None, stacks: Stacks | None = None) -> list[Tensor]:
    """All tensors of one (device, dtype) at once. Returns the transformed gradients, shaped
    as the gradients and in the accumulation dtype: in ``outs[i]`` where that is given
    (that dtype), else in new tensors laid out as the weights or in rows of a stack. The
    gradients are not written.

    With ``stacks``, small contiguous tensors (under KEEP_SCRATCH_BYTES) of a size that
    several share go through in stacks (:func:`_stacked`, buffers from ``stacks``); the
    others one by one, in multi-tensor kernels plus a dot product per tensor
    (:func:`_per_tensor`). The two routes give the same results, bit for bit."""
    acc = _accumulate_dtype(gs[0].dtype)
    done: list[Tensor | None] = [None] * len(gs)
    if stacks is not None:
        sizes: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(gs):
            if ((outs is None or outs[i] is None)
                    and g.numel() * g.element_size() < KEEP_SCRATCH_BYTES
                    and g.is_contiguous() and ws[i].is_contiguous()):
                sizes[g.numel()].append(i)
        for idx in sizes.values():
            if len(idx) > 1:
                these = [gs[i] for i in idx]
                rows = _stacked(stacks(_stack_key(these, acc)), [ws[i] for i in idx], these, eps)
                for i, row in zip(idx, rows):
                    done[i] = row
    rest = [i for i, d in enumerate(done) if d is None]
    if rest:
        found = _per_tensor([ws[i] for i in rest], [gs[i] for i in rest], eps, acc,
                            None if outs is None else [outs[i] for i in rest])
        for i, d in zip(rest, found):
            done[i] = d
    return done  # type: ignore[return-value]


def _per_tensor(ws: list[Tensor], gs: list[Tensor], eps: float, acc: torch.dtype,
                outs: list[Tensor | None] | None) -> Tensors:
    """The transform one tensor at a time: multi-tensor kernels plus a dot product per
    tensor; into ``outs[i]`` where given, else new tensors laid out as the weights."""
    wa, ga = _as(ws, acc), _as(gs, acc)
    dots = _dots(wa, ga)
    w_norms = torch.stack(torch._foreach_norm(wa))
    g_norms = torch.stack(torch._foreach_norm(ga))
    coefs = dots / (w_norms * w_norms + eps)
    neg = list(coefs.neg().unbind())
    perp: Tensors
    if outs is None or all(o is None for o in outs):
        perp = torch._foreach_mul(wa, neg)
    else:
        # The given outputs one by one (few and large), the rest in one multi-tensor op.
        fresh = [i for i, o in enumerate(outs) if o is None]
        made = iter(torch._foreach_mul([wa[i] for i in fresh], [neg[i] for i in fresh])
                    if fresh else ())
        perp = [torch.mul(w, c, out=o) if o is not None else next(made)
                for w, c, o in zip(wa, neg, outs)]
    torch._foreach_add_(perp, ga)
    scales = g_norms / (torch.stack(torch._foreach_norm(perp)) + eps)
    torch._foreach_mul_(perp, list(scales.unbind()))
    return perp


def orthogonalize_(
    params: list[Tensor], grads: list[Tensor], *, eps: float = 1e-30, foreach: bool | None = None
) -> None:
    """Replace each ``grads[i]`` in place by its ⊥Grad transform against ``params[i]``.

    Args:
        params: the weights ``w`` (read only).
        grads: their gradients, changed in place (same shapes as ``params``).
        eps: added to ``w.w`` and to ``||g_perp||``; keeps an all-zero weight or gradient
            from dividing by zero (default 1e-30, the paper's).
        foreach: multi-tensor kernels (default) or the plain per-tensor reference.

    Example:
        >>> w, g = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
        >>> orthogonalize_([w], [g])
        >>> g  # the part along w removed, the length sqrt(2) kept
        tensor([0.0000, 1.4142])
    """
    _check_pairs(params, grads, eps)
    if foreach is False:
        for w, g in zip(params, grads):
            if g.numel():
                _reference(w, g, eps)
        return
    for ws, gs in _buckets(params, grads).values():
        torch._foreach_copy_(gs, _foreach(ws, gs, eps))


def _check_pairs(params: list[Tensor], grads: list[Tensor], eps: Any) -> None:
    _check_eps(eps)
    if len(params) != len(grads):
        raise ValueError(f"params has {len(params)} tensors, grads has {len(grads)}")
    dtensor = dtensor_type()  # (one lookup: this runs every step, over every gradient)
    for i, (w, g) in enumerate(zip(params, grads)):
        if w.shape != g.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, params[{i}] {tuple(w.shape)}")
        if dtensor is not None and (isinstance(w, dtensor) or isinstance(g, dtensor)):
            # A shard-local dot product and norms would give a wrong, rank-dependent result.
            raise NotImplementedError(
                f"OrthoGrad needs whole tensors: params[{i}] or grads[{i}] is sharded "
                f"(DTensor, e.g. FSDP2), which is not supported"
            )


def _buckets(params: list[Tensor], grads: list[Tensor]) -> dict[Any, tuple[list[Tensor], list[Tensor]]]:
    """The nonempty (weight, gradient) pairs by the gradients' (device, dtype)."""
    buckets: dict[Any, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for w, g in zip(params, grads):
        if g.numel():
            bucket = buckets[(g.device, g.dtype)]
            bucket[0].append(w)
            bucket[1].append(g)
    return buckets


def _check_eps(eps: Any) -> None:
    check_float("eps", eps, minimum=0)


class OrthoGrad(GradientTransform):
    """Wrap any optimizer so that it steps on ⊥Grad gradients (orthogonal to the weights).

    Every parameter tensor's gradient loses its component along the tensor's own weights
    and is rescaled to its original length; the inner optimizer then steps as usual. Meant
    for training without weight decay (the paper's setting), often with
    :func:`stablemax_cross_entropy`. The formula, defaults and references: docs/methods.md.

    Sharded (FSDP2) parameters are not supported: the dot product and norms would span ranks.

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``).
        eps: guard added to ``w.w`` and ``||g_perp||`` (default 1e-30).
        foreach: batched kernels (default) or the per-tensor reference loop. Batched,
            under ``restore_grad``, contiguous gradients under 256 KiB that share their
            number of entries with others of the group (same device and dtype) are
            transformed as the rows of a stack (two buffers of their size, weights and
            gradients): batched norms and elementwise operations instead of a dozen
            operations per tensor, with the same results bit for bit. The other gradients
            go through multi-tensor kernels one by one.
        restore_grad: ``True`` (default): after ``step()`` each ``p.grad`` is the gradient
            backward produced, as with any torch optimizer: the transform writes into new
            tensors (or a stack's rows), which the inner optimizer steps on. On CPU these
            are kept from one step to the next (fresh memory of that size costs a page
            fault per 4 KiB) for fp32/fp64 gradients of 256 KiB and more (one buffer of
            their size) and for the stacks (two buffers of theirs); elsewhere they are
            freed when the step ends. What the inner optimizer was handed as ``p.grad``
            may thus be overwritten at the next step: an inner optimizer or hook that keeps
            a reference to it across steps must copy it. ``False``: the transformed
            gradient is written into ``p.grad`` in place, one tensor at a time, nothing
            kept between steps; both modes give the same parameters, bit for bit.

    Example:
        >>> import torch
        >>> from grokopt import OrthoGrad
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = OrthoGrad(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0))
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    _prefix = "orthograd_"

    def __init__(
        self, optimizer: Optimizer, *, eps: float = 1e-30, foreach: bool | None = None,
        restore_grad: bool = True,
    ) -> None:
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be None or a bool, got {foreach!r}")
        self.foreach = foreach
        super().__init__(optimizer, dict(eps=eps), restore_grad=restore_grad)

    def _validate_group(self, options: dict[str, Any]) -> None:
        if "orthograd_eps" in options:
            _check_eps(options["orthograd_eps"])

    #: Under ``restore_grad`` the transformed gradients are written into new tensors (or
    #: stack rows), which the inner optimizer steps on (the base copies nothing first). On
    #: CPU those of large gradients are kept from one step to the next (see
    #: ``KEEP_SCRATCH_BYTES``), as are the stacks; in place, nothing is kept and nothing
    #: is stacked.
    _makes_scratch = True

    def _transform_gradients(self) -> None:
        scratch = self._making_scratch()
        before = self.__dict__.pop("_kept_scratch", {})
        kept: dict[int, Tensor] = {}
        # Stacks (kept from step to step on CPU) only where restore_grad already holds a
        # buffer: they change no result, and in place they would cost memory.
        kept_stacks = _KeptStacks(self.__dict__.pop("_kept_stacks", None))
        stacks = kept_stacks if scratch else None
        for group in self.param_groups:
            pairs = list(self._grads(group))
            ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
            ws = [p.detach() for p in ps]
            eps = group["orthograd_eps"]
            if not scratch:  # in place, one tensor at a time
                orthogonalize_(ws, gs, eps=eps, foreach=self.foreach)
                continue
            _check_pairs(ws, gs, eps)
            if self.foreach is False:
                for p, w, g in zip(ps, ws, gs):
                    if g.numel():
                        p.grad = out = g.clone()
                        _reference(w, out, eps)
                continue
            kinds: dict[Any, list[int]] = defaultdict(list)
            for i, g in enumerate(gs):
                if g.numel():
                    kinds[(g.device, g.dtype)].append(i)
            for idx in kinds.values():
                outs = [_scratch(ps[i], ws[i], gs[i], before, kept) for i in idx]
                done = _foreach([ws[i] for i in idx], [gs[i] for i in idx], eps, outs, stacks)
                for i, out in zip(idx, done):
                    # (the output is laid out as the weight, as in place, so that both
                    # modes round alike; the inner optimizer gets the gradient's layout)
                    ps[i].grad = self._as_gradient(out, gs[i])
        self._kept_scratch = kept
        self._kept_stacks = kept_stacks.now


class _KeptStacks:
    """The stacks of one step, as :func:`_foreach` asks for them: on CPU those of the last
    step reused where a stack of the same key was asked for as often (fresh CPU memory of a
    stack's size costs a page fault per 4 KiB); fresh ones elsewhere."""

    def __init__(self, before: dict[tuple[Any, ...], list[_Stack]] | None) -> None:
        self.before = before or {}
        self.now: dict[tuple[Any, ...], list[_Stack]] = {}

    def __call__(self, key: tuple[Any, ...]) -> _Stack:
        taken = self.now.setdefault(key, [])
        last = self.before.get(key, [])
        stack = last[len(taken)] if len(taken) < len(last) else _new_stack(key)
        if key[2].type == "cpu":
            taken.append(stack)
        return stack


def _scratch(p: Tensor, w: Tensor, g: Tensor, before: dict[int, Tensor],
             kept: dict[int, Tensor]) -> Tensor | None:
    """Scratch for the transform of parameter ``p``'s gradient ``g`` that outlives the step
    (on CPU, for large gradients the transform computes in their own dtype), laid out as
    the weight ``w`` (as :func:`_foreach`'s new outputs are), the last step's reused; None
    for a new tensor instead."""
    if (g.numel() * g.element_size() < KEEP_SCRATCH_BYTES or g.device.type != "cpu"
            or _accumulate_dtype(g.dtype) != g.dtype):
        return None
    out = before.get(id(p))
    if out is None or (out.shape, out.stride(), out.dtype, out.device) != (
            w.shape, w.stride(), g.dtype, g.device):
        out = torch.empty_like(w, dtype=g.dtype)
        if out.stride() != w.stride():  # not dense: left to the multi-tensor op's layout
            return None
    kept[id(p)] = out
    return out
