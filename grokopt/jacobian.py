"""Batched Jacobian-vector kernels: per-sample JVP, VJP, Frobenius-norm estimators and the
exact per-sample Jacobian, each for a whole batch in one call.

Every kernel takes ``model``, any callable mapping a batch ``x`` of shape ``(B, *in)`` to
outputs ``(B, *out)`` in which sample ``b``'s output depends only on sample ``b``'s input, and
returns ``(outputs, result)`` so the caller can reuse the forward pass (for a task loss).
Results are differentiable w.r.t. the model's parameters (and ``x``, when it requires grad),
with one exception torch imposes: through layer norm, forward mode (``jvp``,
``per_sample_jacobian(mode="fwd")``) gives right values but wrong parameter gradients, so
those kernels warn when they see a layer-norm call with grad enabled, and the "jvp" norm
estimator refuses it.

Two implementations sit behind each kernel:

* a fast path for piecewise-linear networks (an ``nn.Sequential`` of ``Linear``, ``ReLU``,
  ``LeakyReLU``, ``ReLU6``, ``Hardtanh``, ``Flatten``, ``Identity`` and inactive ``Dropout``):
  the Jacobian of such a network at ``x`` is ``W_L D_{L-1} ... D_1 W_1`` with ``D_l`` the
  activation slopes at ``x``, so tangents ride in the same matmuls as the primal (stacked on a
  new leading axis) and cotangents go down the same chain of masks recorded by the primal
  pass; plain first-order autograd, no double backward, compiles with ``torch.compile``
  (:mod:`grokopt._pl_chain`);
* ``torch.func`` / ``torch.autograd`` for anything else (:mod:`grokopt._func_path`).

This module checks the arguments, picks the path and builds the estimators on top.
``fast_path=None`` picks the fast path when the model qualifies, ``True`` demands it and
``False`` forbids it (handy to compare the two).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _pl_chain as pl
from ._checks import (
    check_batch,
    check_bool,
    check_choice,
    check_generator,
    check_int,
    check_model,
    describe,
)
from ._func_path import (
    LAYER_NORM_REASON,
    autograd_vjp,
    func_jacobian,
    func_jvp,
    grad_ready,
    higher_order_attention,
)

__all__ = [
    "ESTIMATORS",
    "FrobeniusEstimate",
    "check_samples_independent",
    "is_piecewise_linear",
    "jacobian_frobenius_norm",
    "jvp",
    "per_sample_jacobian",
    "vjp",
]

Model = Callable[[Tensor], Tensor]

#: Accepted values of ``estimator``.
ESTIMATORS = ("auto", "vjp", "jvp", "exact")

# The reference code clamps the squared estimate before the square root, which keeps the
# gradient of the root finite at a zero Jacobian.
_NORM_FLOOR = 1e-8


# --------------------------------------------------------------------------------------
# validation


def _check_output(out: object, batch: int, name: str = "model output") -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(out)}")
    if not out.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {out.dtype}")
    if out.dim() < 1 or out.shape[0] != batch:
        raise ValueError(
            f"{name} must have the batch size {batch} as its first dim, got shape {tuple(out.shape)}"
        )
    return out


def _check_vectors(v: object, x_or_out_shape: torch.Size, name: str) -> Tensor:
    """Accept ``(B, *s)`` (one vector per sample) or ``(k, B, *s)``; return ``(k, B, *s)``."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(v)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {v.dtype}")
    shape = tuple(x_or_out_shape)
    if tuple(v.shape) == shape:
        return v.unsqueeze(0)
    if v.dim() == len(shape) + 1 and tuple(v.shape[1:]) == shape and v.shape[0] >= 1:
        return v
    raise ValueError(f"{name} must have shape {shape} or (k, *{shape}) with k >= 1, got {tuple(v.shape)}")


def _module_of(model: object) -> nn.Module | None:
    """The nn.Module behind ``model``: itself, or the owner of a bound method such as a
    transformer's ``forward_embeddings`` (other callables cannot be inspected)."""
    if isinstance(model, nn.Module):
        return model
    owner = getattr(model, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _check_forward_mode_safe(model: object) -> None:
    """Refuse the "jvp" estimator up front for a model that visibly holds ``nn.LayerNorm``.

    Reverse-over-forward through layer norm (torch's native forward-mode rule) gives wrong
    parameter gradients in torch 2.13: against central differences in float64 they are off
    by 45-116%, while the same normalisation written with elementwise ops, RMSNorm,
    GroupNorm and every other layer we use are right to 1e-10 (tests/test_jacobian.py pins
    both facts). Training on such gradients would be silently wrong. Only a module (or a
    bound method of one) can be inspected here; for any other callable the layer-norm calls
    are caught while the product runs (:class:`grokopt._func_path.LayerNormWatch`).
    """
    module = _module_of(model)
    if module is None:
        return
    for name, sub in module.named_modules():
        if isinstance(sub, nn.LayerNorm):
            raise ValueError(
                f"estimator='jvp' is refused for models with nn.LayerNorm ({name or 'model'}): "
                f"{LAYER_NORM_REASON}; use estimator='vjp' (the default) or 'exact'"
            )


def check_samples_independent(model: object) -> None:
    """Refuse models whose per-sample outputs depend on other samples of the batch.

    A batched Jacobian product equals the per-sample ones only when the batch Jacobian is
    block-diagonal. Batch normalisation that uses batch statistics (training mode, or
    ``track_running_stats=False``) mixes samples, so it is refused here. Only ``nn.Module``
    models can be inspected; for other callables the caller vouches for independence.

    Raises:
        ValueError: naming the offending submodule.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from grokopt.jacobian import check_samples_independent
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> check_samples_independent(net.eval())  # running statistics: samples independent
        >>> try:
        ...     check_samples_independent(net.train())
        ... except ValueError as err:
        ...     print("refused")
        refused
    """
    owner = _module_of(model)
    if owner is None:
        return
    for name, module in owner.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            uses_batch_stats = module.training or (
                module.running_mean is None and module.running_var is None
            )
            if uses_batch_stats:
                raise ValueError(
                    f"model submodule {name or '<root>'!r} ({type(module).__name__}) normalises with "
                    "batch statistics, so each sample's output depends on the whole batch and a "
                    "per-sample Jacobian is not defined by one batched pass; call model.eval() "
                    "(running statistics) or use a per-sample normalisation (LayerNorm, GroupNorm)"
                )


# --------------------------------------------------------------------------------------
# dispatch


def is_piecewise_linear(model: object) -> bool:
    """Whether ``model`` qualifies for the piecewise-linear fast path.

    It qualifies when it is an ``nn.Sequential`` (possibly nested) of ``Linear``, ``ReLU``,
    ``LeakyReLU``, ``ReLU6``, ``Hardtanh``, ``Identity``, ``Flatten`` (keeping the batch dim)
    and ``Dropout`` that is inactive (eval mode or ``p=0``), with no forward hooks. Exact types
    are required: a subclass may change ``forward``.

    Example:
        >>> from torch import nn
        >>> from grokopt.jacobian import is_piecewise_linear
        >>> is_piecewise_linear(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        True
        >>> is_piecewise_linear(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)))
        False
    """
    return pl.plan_of(model) is not None


def _resolve_plan(model: object, fast_path: bool | None, x: Tensor) -> pl.Plan | None:
    if fast_path is False:
        return None
    plan = pl.plan_of(model)
    if plan is None and fast_path is True:
        raise ValueError(
            "fast_path=True needs an nn.Sequential of Linear / ReLU-family / Flatten / Identity / "
            f"inactive Dropout layers without hooks, got {type(model).__name__}; "
            "use fast_path=None to fall back to torch.func"
        )
    if plan is not None:
        pl.output_shape(plan, x.shape)  # refuses an input the layers cannot take
    return plan


def _forward_for_reverse(model: Model, x: Tensor, plan: pl.Plan | None) -> tuple[Tensor, Tensor, pl.Tape | None]:
    """``(model(x), the x to differentiate by, the fast path's tape)``, ready for
    :func:`_reverse`; on the general path ``x`` is a fresh graph node."""
    if plan is not None:
        out, tape = pl.forward_record(plan, x)
        return out, x, tape
    x_ = grad_ready(x)
    with torch.enable_grad(), higher_order_attention():
        out = model(x_)
    return out, x_, None


def _reverse(out: Tensor, x_: Tensor, tape: pl.Tape | None, cotangents: Tensor, create_graph: bool) -> Tensor:
    """``J^T v`` for cotangents ``(k, B, *out)`` after :func:`_forward_for_reverse`."""
    if tape is not None:
        return pl.reverse(tape, cotangents)
    with higher_order_attention():
        return autograd_vjp(out, x_, cotangents, create_graph)


# --------------------------------------------------------------------------------------
# public kernels


def jvp(model: Model, x: Tensor, tangents: Tensor, *, fast_path: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample Jacobian-vector products ``J_{x_b} u_b`` for a whole batch.

    Args:
        model: a callable ``(B, *in) -> (B, *out)`` whose samples do not interact.
        x: the batch, floating point, shape ``(B, *in)``.
        tangents: ``(B, *in)`` (one tangent per sample) or ``(k, B, *in)`` (k per sample).
        fast_path: None picks the piecewise-linear path when the model qualifies.

    Returns:
        ``(outputs, jvps)`` with ``outputs = model(x)`` of shape ``(B, *out)`` and ``jvps`` of
        shape ``(B, *out)`` or ``(k, B, *out)`` following ``tangents``. Both are differentiable
        (reverse over forward) w.r.t. the parameters and ``x``.

    Example:
        >>> import torch
        >>> from grokopt.jacobian import jvp
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> out, tan = jvp(lambda x: x @ W.T, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
        >>> tan  # J = W: the first column
        tensor([[1., 3., 5.]])
    """
    check_model("model", model)
    check_batch("x", x)
    check_bool("fast_path", fast_path, allow_none=True)
    single = isinstance(tangents, Tensor) and tangents.shape == x.shape
    tans = _check_vectors(tangents, x.shape, "tangents")
    check_samples_independent(model)
    plan = _resolve_plan(model, fast_path, x)
    if plan is not None:
        out, jv = pl.jvp(plan, x, tans)
    else:
        out, jv = func_jvp(model, x, tans, refuse_layer_norm=False)
    _check_output(out, x.shape[0])
    return out, (jv[0] if single else jv)


def vjp(
    model: Model,
    x: Tensor,
    cotangents: Tensor | float,
    *,
    create_graph: bool = True,
    fast_path: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample vector-Jacobian products ``J_{x_b}^T v_b`` for a whole batch.

    Args:
        model: a callable ``(B, *in) -> (B, *out)`` whose samples do not interact.
        x: the batch, floating point, shape ``(B, *in)``.
        cotangents: ``(B, *out)`` or ``(k, B, *out)``, or a number ``c``: the cotangent ``c``
            at every output, of a shape only the forward pass tells (``1`` gives ``J^T 1``,
            the centroid of :func:`grokopt.centroids`).
        create_graph: keep the products differentiable w.r.t. the parameters (the fast path
            always is, at no extra cost; the autograd path then builds a double-backward graph).
        fast_path: None picks the piecewise-linear path when the model qualifies.

    Returns:
        ``(outputs, vjps)`` with ``vjps`` of shape ``(B, *in)`` or ``(k, B, *in)``.

    Example:
        >>> import torch
        >>> from grokopt.jacobian import vjp
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> out, pulled = vjp(lambda x: x @ W.T, torch.zeros(1, 2), torch.tensor([[1.0, 0.0, -1.0]]))
        >>> pulled  # row 1 minus row 3 of J = W
        tensor([[-4., -4.]])
        >>> vjp(lambda x: x @ W.T, torch.zeros(1, 2), 1.0)[1]  # the same as torch.ones(1, 3)
        tensor([[ 9., 12.]])
    """
    check_model("model", model)
    check_batch("x", x)
    check_bool("fast_path", fast_path, allow_none=True)
    check_bool("create_graph", create_graph)
    constant = not isinstance(cotangents, Tensor)
    if constant and (isinstance(cotangents, bool) or not isinstance(cotangents, (int, float))):
        raise TypeError("cotangents must be a tensor of shape (B, *out) or (k, B, *out), or a "
                        f"number, got {describe(cotangents)}")
    check_samples_independent(model)
    plan = _resolve_plan(model, fast_path, x)
    # Without create_graph the fast path needs no graph at all; the general path turns grad
    # back on for its own forward.
    with contextlib.nullcontext() if create_graph else torch.no_grad():
        out, x_, tape = _forward_for_reverse(model, x, plan)
        _check_output(out, x.shape[0])
        if not isinstance(cotangents, Tensor):  # (constant)
            single, cots = True, out.new_full((1,) + tuple(out.shape), float(cotangents))
        else:
            single = cotangents.shape == out.shape
            cots = _check_vectors(cotangents, out.shape, "cotangents").to(out.dtype)
        g = _reverse(out, x_, tape, cots, create_graph)
    return out, (g[0] if single else g)


def per_sample_jacobian(
    model: Model, x: Tensor, *, mode: str = "auto", fast_path: bool | None = None
) -> tuple[Tensor, Tensor]:
    """The exact Jacobian of every sample's output w.r.t. its input, in one call.

    Args:
        model: a callable ``(B, *in) -> (B, *out)`` whose samples do not interact.
        x: the batch, shape ``(B, *in)``.
        mode: "rev" (one reverse pass per output), "fwd" (one tangent per input) or "auto"
            (whichever needs fewer passes; "rev" on ties).
        fast_path: None picks the piecewise-linear path (basis vectors pushed through the
            layer chain as one batched GEMM per layer) when the model qualifies; otherwise
            ``torch.func.vmap`` of ``jacrev`` / ``jacfwd``.

    Returns:
        ``(outputs, jacobians)`` with ``jacobians`` of shape ``(B, *out, *in)``, differentiable
        w.r.t. the parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from grokopt import per_sample_jacobian
        >>> net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU())
        >>> _ = nn.init.constant_(net[0].weight, 2.0)
        >>> out, jac = per_sample_jacobian(net, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
        >>> jac.detach()  # W where the ReLU passes, 0 where it blocks
        tensor([[[2., 2.],
                 [2., 2.],
                 [2., 2.]],
        <BLANKLINE>
                [[0., 0.],
                 [0., 0.],
                 [0., 0.]]])
    """
    check_model("model", model)
    check_batch("x", x)
    check_bool("fast_path", fast_path, allow_none=True)
    check_choice("mode", mode, ("auto", "rev", "fwd"))
    check_samples_independent(model)
    plan = _resolve_plan(model, fast_path, x)
    in_shape = tuple(x.shape[1:])
    d = math.prod(in_shape)
    B = x.shape[0]
    if plan is not None:
        out_shape = pl.output_shape(plan, x.shape)[1:]
        C = math.prod(out_shape)
        if mode == "auto":
            mode = "fwd" if d < C else "rev"
        if mode == "fwd":
            out, cols = pl.jvp(plan, x, _basis(x.shape, x))  # (d, B, *out)
            jac = cols.reshape(d, B, C).permute(1, 2, 0)
        else:
            out, tape = pl.forward_record(plan, x)
            rows = pl.reverse(tape, _basis(out.shape, out))  # (C, B, *in)
            jac = rows.reshape(C, B, d).transpose(0, 1)
        return out, jac.reshape(B, *out_shape, *in_shape)
    if mode == "auto":
        # The output size is unknown before a forward pass; one output per class and a few
        # classes is the common case, so reverse mode unless the input is tiny.
        mode = "fwd" if d == 1 else "rev"
    out, jac = func_jacobian(model, x, mode)
    _check_output(out, B)
    return out, jac


def _basis(shape: torch.Size, like: Tensor) -> Tensor:
    """The ``n = prod(shape[1:])`` unit vectors of one sample's space, the same for every
    sample of the batch: ``(n, *shape)``, a broadcast view."""
    per_sample = tuple(shape[1:])
    n = math.prod(per_sample)
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    return eye.view(n, 1, *per_sample).expand(n, shape[0], *per_sample)


class FrobeniusEstimate(NamedTuple):
    """What :func:`jacobian_frobenius_norm` returns.

    Example:
        >>> import torch
        >>> from grokopt import jacobian_frobenius_norm
        >>> est = jacobian_frobenius_norm(torch.nn.Linear(4, 3), torch.randn(5, 4), estimator="exact")
        >>> est.outputs.shape, est.norms.shape, est.estimator
        (torch.Size([5, 3]), torch.Size([5]), 'exact')
    """

    outputs: Tensor
    """``model(x)``, shape ``(B, *out)``: reuse it for the task loss."""
    norms: Tensor
    """Per-sample estimate of ``||J_x||_F`` (or its square), shape ``(B,)``."""
    estimator: str
    """The estimator used ("vjp", "jvp" or "exact"; what "auto" resolved to)."""


# Probes for half-precision tensors are drawn in float32 and rounded. torch's own fp16 /
# bf16 normal_ draws another stream than float32's: all of it on 2.5, the last 16 values of
# a draw whose length is over 16 and not a multiple of 16 on 2.13. The same seed would give
# other probes under autocast than in float32.
_DRAWN_WIDER = (torch.float16, torch.bfloat16)


def _drawn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Gaussian probes for ``like`` as drawn: empty().normal_() rather than randn (the same
    # stream as the fast path's in-place draw), in float32 for a half ``like``, and with a
    # generator on its own device, so that a CPU generator serves CUDA inputs.
    device = like.device if generator is None else generator.device
    dtype = torch.float32 if like.dtype in _DRAWN_WIDER else like.dtype
    return torch.empty(shape, dtype=dtype, device=device).normal_(generator=generator)


def _draw(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return _drawn(shape, like, generator).to(device=like.device, dtype=like.dtype)



def _stack_with_probes(x: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    # Gaussian probes drawn straight into the stacked buffer: drawing and copying ~B*d
    # numbers is a visible share of a small network's step.
    z = x.new_empty((1 + k,) + tuple(x.shape))
    if (generator is None or generator.device == x.device) and x.dtype not in _DRAWN_WIDER:
        z[1:].normal_(generator=generator)
    else:
        z[1:].copy_(_drawn((k,) + tuple(x.shape), x, generator))  # (copy_ rounds and moves)
    z[0].copy_(x)  # autograd records the copy, so gradients still reach x
    return z



def _unit_rows(v: Tensor, batch_dims: int = 2) -> Tensor:
    flat = v.flatten(batch_dims)
    return (flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-8)).view_as(v)


class _Probing(NamedTuple):
    """One validated :func:`jacobian_frobenius_norm` call, as the estimators read it."""

    model: Model
    x: Tensor
    plan: pl.Plan | None  # None: the general path (or logits given)
    k: int
    generator: torch.Generator | None
    probes: Tensor | None
    logits: Tensor | None


def _estimate(call: _Probing, estimator: str, squared: bool) -> FrobeniusEstimate:
    if estimator == "jvp":
        out, sq = _jvp_sq_norms(call)
    elif estimator == "exact" and call.logits is None:
        # Reverse mode on the torch.func path whatever the shapes: forward mode would
        # inherit the layer-norm fault (see _check_forward_mode_safe).
        mode = "auto" if call.plan is not None else "rev"
        out, jac = per_sample_jacobian(call.model, call.x, mode=mode, fast_path=call.plan is not None)
        sq = jac.reshape(call.x.shape[0], -1).pow(2).sum(-1)
    else:  # "vjp" ("auto" names it, kept so older calls keep working), or "exact" from logits
        estimator = "exact" if estimator == "exact" else "vjp"
        out, sq = _vjp_sq_norms(call, exact=estimator == "exact")
    norms = sq if squared else sq.clamp_min(_NORM_FLOOR).sqrt()
    return FrobeniusEstimate(out, norms, estimator)


def _jvp_sq_norms(call: _Probing) -> tuple[Tensor, Tensor]:
    """``(model(x), (1/k) sum_i ||J u_i||^2)`` with Gaussian input probes ``u_i``."""
    x, probes = call.x, call.probes
    if probes is not None:
        probes = _check_vectors(probes, x.shape, "probes")  # (B, *in) -> (1, B, *in)
    if call.plan is not None:
        z = _stack_with_probes(x, call.k, call.generator) if probes is None else torch.cat([x.unsqueeze(0), probes.to(x.dtype)])
        out, jv = pl.jvp_stacked(call.plan, z)
    else:
        if probes is None:
            probes = _draw((call.k,) + tuple(x.shape), x, call.generator)
        out, jv = func_jvp(call.model, x, probes, refuse_layer_norm=True)
    _check_output(out, x.shape[0])
    return out, jv.flatten(2).pow(2).sum(-1).mean(0)


def _vjp_sq_norms(call: _Probing, exact: bool) -> tuple[Tensor, Tensor]:
    """``(model(x), (C/k) sum_i ||J^T v_i||^2)`` with unit output probes ``v_i``, or with
    ``exact`` the sum over all C basis vectors, from one forward pass (the caller's, when
    ``logits`` are given)."""
    if call.logits is not None:
        out, x_, tape = call.logits, call.x, None
    else:
        out, x_, tape = _forward_for_reverse(call.model, call.x, call.plan)
    _check_output(out, call.x.shape[0])
    if exact:
        cots, scale = _basis(out.shape, out), 1.0
    else:
        if call.probes is None:
            probes = _draw((call.k,) + tuple(out.shape), out, call.generator)
        else:
            probes = _check_vectors(call.probes, out.shape, "probes")
        cots = _unit_rows(probes.to(out.dtype))
        scale = out[0].numel() / cots.shape[0]
    if tape is not None:
        sq = pl.reverse_sq_norms(tape, cots)
    else:
        sq = _reverse(out, x_, None, cots, create_graph=True).flatten(2).pow(2).sum(-1)
    return out, sq.sum(0) * scale


def jacobian_frobenius_norm(
    model: Model,
    x: Tensor,
    *,
    estimator: str = "vjp",
    num_projections: int = 1,
    squared: bool = False,
    generator: torch.Generator | None = None,
    probes: Tensor | None = None,
    logits: Tensor | None = None,
    fast_path: bool | None = None,
) -> FrobeniusEstimate:
    """Per-sample Frobenius norm of the input Jacobian, estimated or exact, for a batch.

    Estimators (k = ``num_projections``; each squared estimate is unbiased for
    ``||J||_F^2``, and the norm is ``sqrt(max(1e-8, .))`` of it, which is biased low):

    * "vjp" (the default, the paper's): ``(C/k) sum_i ||J^T v_i||^2`` with ``v_i`` Gaussian in
      output space normalised to unit length per sample; per-probe variance
      ``2 (C tr(A^2) - tr(A)^2) / (C + 2)`` with ``A = J J^T`` (zero when all singular values
      are equal). On the piecewise-linear fast path ``J^T v`` goes down the activation masks
      of the one forward pass (and, for an MLP on raw inputs, the first layer's part is a
      Gram-matrix product: the same value to rounding, fewer multiply-adds);
    * "jvp": ``(1/k) sum_i ||J u_i||^2`` with ``u_i ~ N(0, I_d)`` in input space; per-probe
      variance ``2 tr(A^2)``; works under ``torch.compile``; refused for models that call
      layer norm (torch's forward-mode layer norm gives wrong parameter gradients);
    * "exact": the full per-sample Jacobian (min(C, d) passes on the fast path, C otherwise);
    * "auto": the same as "vjp" (kept so that older calls keep working).

    The three are different distributions of the norm estimate: the squared estimates share
    their mean, but the square root's downward bias grows with the variance, so the expected
    norms differ (on the paper's MNIST MLP at initialisation "jvp" gives 2.5% less than "vjp"
    and "exact" 0.7% more; the gap depends on the Jacobian's singular values).

    Args:
        model: callable ``(B, *in) -> (B, *out)``; samples must not interact.
        x: the batch, shape ``(B, *in)``.
        estimator: one of ``ESTIMATORS``.
        num_projections: k, probes per sample.
        squared: return the squared-norm estimate (unbiased, no floor).
        generator: source of the probes, for reproducible runs.
        probes: explicit probes instead of drawn ones: ``(k, B, *in)`` for "jvp",
            ``(k, B, *out)`` for "vjp" (normalised to unit length per sample and probe).
        logits: outputs of an earlier ``model(x)`` call with ``x.requires_grad`` set, to skip
            the forward pass (reverse-mode estimators only).
        fast_path: None picks the piecewise-linear path when the model qualifies.

    Returns:
        A :class:`FrobeniusEstimate` ``(outputs, norms, estimator)``.

    Example:
        >>> import torch
        >>> from grokopt import jacobian_frobenius_norm
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> probe = torch.ones(1, 1, 3) / 3**0.5  # sqrt(C) ||J^T v|| = ||(9, 12)|| = 15
        >>> est = jacobian_frobenius_norm(lambda x: x @ W.T, torch.zeros(1, 2), probes=probe)
        >>> round(float(est.norms), 4)
        15.0
        >>> round(float(jacobian_frobenius_norm(lambda x: x @ W.T, torch.zeros(1, 2), estimator="exact").norms), 4)
        9.5394
    """
    _validate_call(model, x, estimator, num_projections, squared, generator, probes, logits, fast_path)
    # Reused logits carry their own graph: the fast path's tape is not needed.
    plan = _resolve_plan(model, fast_path, x) if logits is None else None
    state = generator.get_state() if generator is not None else None
    try:
        call = _Probing(model, x, plan, num_projections, generator, probes, logits)
        return _estimate(call, estimator, squared)
    except BaseException:
        # A rejected call leaves the probe stream where it was.
        if generator is not None and state is not None:
            generator.set_state(state)
        raise


def _validate_call(
    model: object,
    x: object,
    estimator: object,
    num_projections: object,
    squared: object,
    generator: object,
    probes: object,
    logits: object,
    fast_path: object,
) -> None:
    check_model("model", model)
    check_batch("x", x)
    assert isinstance(x, Tensor)
    check_choice("estimator", estimator, ESTIMATORS)
    check_int("num_projections", num_projections, minimum=1)
    check_bool("squared", squared)
    check_generator("generator", generator)
    check_bool("fast_path", fast_path, allow_none=True)
    if logits is not None:
        _check_output(logits, x.shape[0], "logits")
        assert isinstance(logits, Tensor)
        if not x.requires_grad or logits.grad_fn is None:
            raise ValueError(
                "logits can be reused only when they were computed from x with x.requires_grad=True "
                f"(got x.requires_grad={x.requires_grad}, logits.grad_fn={logits.grad_fn}); "
                "otherwise call without logits and reuse the returned outputs"
            )
    check_samples_independent(model)
    if probes is not None:
        if estimator not in ("vjp", "jvp", "auto"):
            raise ValueError(
                f"probes are used only by estimator 'vjp' (or its alias 'auto') or 'jvp', got estimator={estimator!r}"
            )
        if not isinstance(probes, Tensor) or not probes.is_floating_point():
            raise TypeError(f"probes must be a floating-point tensor, got {describe(probes)}")
        if estimator == "jvp":
            _check_vectors(probes, x.shape, "probes")
        elif probes.dim() < 3 or probes.shape[1] != x.shape[0]:
            raise ValueError(f"probes for 'vjp' must have shape (k, B={x.shape[0]}, *out), got {tuple(probes.shape)}")
    if estimator == "jvp":
        if logits is not None:
            raise ValueError(
                "logits can only be reused by reverse-mode estimators ('vjp', 'exact', 'auto'), got estimator='jvp'"
            )
        _check_forward_mode_safe(model)
