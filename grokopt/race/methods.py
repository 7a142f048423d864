"""THE method registry: every method the race, ``grokopt bench`` and docs/race.md's method
table know, and the one training step they share.

A method is a function ``apply(ctx, parts, params)`` that wraps the run's optimizer and/or
adds loss terms and per-step hooks; combined methods apply in a fixed nesting order (the
arm syntax that combines them is in ``specs.py``). Adding a method is one library file and
one :func:`register_method` call here: it then appears in ``grokopt race --list-methods``,
in ``grokopt bench --methods`` and must be listed in docs/race.md (a test holds that).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from grokopt import (
    EGD,
    AmplifiedOptimizer,
    GrokAlignLoss,
    Grokfast,
    OrthoGrad,
    stablemax_cross_entropy,
)

from ..tasks import OmnigrokMLP
from .muon import MuonWithAuxiliary, muon_parameters

__all__ = [
    "BASELINE",
    "METHODS",
    "Method",
    "MethodContext",
    "PenaltyRoute",
    "TrainParts",
    "penalty_route",
    "register_method",
    "training_step",
]

#: The bare arm: the base optimizer alone, every speedup's denominator.
BASELINE = "baseline"


@dataclass
class MethodContext:
    """What a method may use to build itself for one run.

    ``penalty_input`` says what a Jacobian-based penalty should differentiate with respect
    to: ``"input"`` (the float model input) or ``"embeddings"`` (token embeddings, for models
    with ``embed``/``forward_embeddings``).
    """

    model: nn.Module
    base_optimizer: Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    logits_from_penalty_input: Callable[[Tensor], Tensor]
    penalty_input: str
    outer: tuple[Tensor, Tensor] | None
    lr: float
    device: torch.device
    seed: int
    clip_grad_norm: float | None = None


@dataclass
class TrainParts:
    """The pieces of one training step that methods build up.

    ``optimizer`` is the outermost optimizer (wrappers nest around the base optimizer);
    ``penalties`` are ``(penalty_input, logits) -> scalar`` terms added to the task loss;
    ``after_step`` hooks run after every optimizer step as ``hook(step, x, y)``;
    ``generators`` are random generators whose state is checkpointed with the run;
    ``forward``, when a method sets it, replaces the task forward: it maps the penalty input
    to ``(logits, extra_loss)`` in one pass; ``loss_fn``, when set, replaces the task loss in
    training (evaluation keeps the race's loss, so losses stay comparable across arms);
    ``after_eval`` hooks run after every evaluation as ``hook(step, val_acc)``.
    """

    optimizer: Optimizer
    forward: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    penalties: list[Callable[[Tensor, Tensor], Tensor]] = field(default_factory=list)
    after_step: list[Callable[[int, Tensor, Tensor], None]] = field(default_factory=list)
    after_eval: list[Callable[[int, float], None]] = field(default_factory=list)
    generators: dict[str, torch.Generator] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One race method: ``apply(ctx, parts, params)`` wraps the optimizer and/or adds terms.

    ``order`` fixes how combined methods nest (lower applies first, i.e. innermost), so
    ``grokfast+neuralgrok`` and ``neuralgrok+grokfast`` are the same arm. ``uses_outer``
    methods train on the inner split and receive the held-out outer split. ``excludes``
    names methods that cannot share an arm with this one (two filters of one gradient).

    Example:
        >>> def apply(ctx, parts, params):
        ...     parts.optimizer = torch.optim.SGD(ctx.model.parameters(), lr=params["lr"])
        >>> m = Method("sgd", apply, defaults={"lr": 0.1}, summary="plain SGD instead")
        >>> m.name, dict(m.defaults)
        ('sgd', {'lr': 0.1})
    """

    name: str
    apply: Callable[[MethodContext, TrainParts, Mapping[str, Any]], None]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    order: int = 0
    summary: str = ""
    uses_outer: bool = False
    unavailable: Callable[[], str | None] = lambda: None
    #: Methods this one cannot be combined with (checked both ways).
    excludes: tuple[str, ...] = ()


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name`` (replacing any previous one)."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", method.name):
        raise ValueError(
            f"method.name: expected lowercase letters, digits, '-' or '_', got {method.name!r}"
        )
    METHODS[method.name] = method
    return method


def _apply_baseline(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    pass


def _apply_grokfast(filter_name: str) -> Callable[[MethodContext, TrainParts, Mapping[str, Any]], None]:
    def apply(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
        parts.optimizer = Grokfast(parts.optimizer, filter=filter_name, **params)

    return apply


def _apply_grokalign(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    gen = torch.Generator(device=ctx.device).manual_seed(10_007 * ctx.seed + 1)
    parts.generators["grokalign"] = gen
    penalty = GrokAlignLoss(ctx.logits_from_penalty_input, generator=gen, **params)
    if parts.forward is None:
        # One pass gives the logits and the penalty: no second task forward.
        parts.forward = penalty.forward_with_penalty
    else:
        parts.penalties.append(lambda inp, logits: penalty(inp))


def _apply_neuralgrok(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    options = dict(params)
    options.setdefault("max_grad_norm", ctx.clip_grad_norm)
    opt = AmplifiedOptimizer(parts.optimizer, **options)
    parts.optimizer = opt
    if ctx.outer is None:
        raise ValueError("neuralgrok needs a held-out outer split (MethodContext.outer)")
    x_outer, y_outer = ctx.outer
    model, loss_fn = ctx.model, ctx.loss_fn

    def meta(step: int, x: Tensor, y: Tensor) -> None:
        opt.maybe_meta_step(model, lambda fwd: loss_fn(fwd(x_outer), y_outer),
                            inner_loss=lambda fwd: loss_fn(fwd(x), y))

    parts.after_step.append(meta)


def _apply_orthograd(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    parts.optimizer = OrthoGrad(parts.optimizer, **params)


def _apply_stablemax(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    if ctx.loss_fn is not torch.nn.functional.cross_entropy:
        raise ValueError("stablemax replaces the cross-entropy loss, but this run trains "
                         "with another loss (loss='mse' or float targets)")
    parts.loss_fn = stablemax_cross_entropy


def _apply_egd(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    options = dict(params)
    until = options.pop("until")
    if until is not None and not (isinstance(until, (int, float)) and 0 < until <= 1):
        raise ValueError(f"until must be a validation accuracy in (0, 1] or none, got {until!r}")
    opt = EGD(parts.optimizer, **options)
    parts.optimizer = opt

    def switch_off(step: int, val_acc: float) -> None:
        # The reference returns to the plain update once test accuracy passes 95%.
        if until is not None and val_acc >= until:
            for group in opt.param_groups:
                group["egd_enabled"] = False

    parts.after_eval.append(switch_off)


def _apply_muon(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    if parts.optimizer is not ctx.base_optimizer:
        raise ValueError("muon replaces the base optimizer: list it first (innermost) in an arm")
    reason = _muon_missing()
    if reason:
        raise RuntimeError(reason)
    muon_cls = torch.optim.Muon  # type: ignore[attr-defined, unused-ignore]
    options = dict(params)
    options["lr"] = options.pop("muon_lr")
    wd = options.pop("muon_wd")
    options["weight_decay"] = ctx.base_optimizer.defaults.get("weight_decay", 0.0) if wd is None else wd
    hidden, rest = muon_parameters(ctx.model)
    base = ctx.base_optimizer
    # The embeddings, biases, norms and output head keep the race's optimizer and settings.
    accepted = inspect.signature(type(base)).parameters
    auxiliary = type(base)(rest, **{k: v for k, v in base.defaults.items() if k in accepted})
    parts.optimizer = MuonWithAuxiliary(muon_cls(hidden, **options), auxiliary)


def _muon_missing() -> str | None:
    if hasattr(torch.optim, "Muon"):
        return None
    return (f"torch.optim.Muon exists from torch 2.9 on; this is torch {torch.__version__} "
            "(pip install 'torch>=2.9')")


register_method(Method(BASELINE, _apply_baseline, summary="the base optimizer alone"))
register_method(
    Method(
        "grokfast",
        _apply_grokfast("ema"),
        defaults={"alpha": 0.98, "lamb": 2.0},
        order=10,
        excludes=("grokfast-ma",),
        summary="Grokfast EMA gradient filter (Lee et al. 2024)",
    )
)
register_method(
    Method(
        "grokfast-ma",
        _apply_grokfast("ma"),
        defaults={"window": 100, "lamb": 5.0, "reduction": "mean", "warmup": True},
        order=10,
        summary="Grokfast moving-average gradient filter",
    )
)
register_method(
    Method(
        "neuralgrok",
        _apply_neuralgrok,
        defaults={"hidden": (128, 128), "c": 1.0, "meta_lr": 1e-4, "meta_every": 4},
        order=20,
        summary="NeuralGrok learned gradient amplifier (Zhou et al. 2025); trains on the "
                "inner split, meta-steps on the outer split",
        uses_outer=True,
    )
)
register_method(
    Method(
        "orthograd",
        _apply_orthograd,
        defaults={"eps": 1e-30},
        order=5,
        summary="OrthoGrad: step on the gradient part orthogonal to the weights "
                "(Prieto et al. 2025)",
    )
)
register_method(
    Method(
        "stablemax",
        _apply_stablemax,
        order=0,
        summary="StableMax cross-entropy instead of softmax's (Prieto et al. 2025)",
    )
)
register_method(
    Method(
        "egd",
        _apply_egd,
        defaults={"method": "svd", "ns_steps": 30, "until": 0.95},
        order=5,
        summary="Egalitarian gradient descent: every 2-D gradient's singular values set to 1, "
                "until validation accuracy reaches 'until' (Pasand and Dohmatob 2025)",
    )
)
register_method(
    Method(
        "muon",
        _apply_muon,
        # muon_lr: Muon's customary 0.02 (with torch's default shape adjustment); muon_wd
        # None: the arm's weight decay. Keys are prefixed where the arm's own keys (lr, wd)
        # would otherwise take them.
        defaults={"muon_lr": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
                  "muon_wd": None},
        order=-10,
        summary="Muon on the hidden 2-D weights, the race's optimizer on the rest "
                "(Tveit et al. 2025)",
        unavailable=_muon_missing,
    )
)
register_method(
    Method(
        "grokalign",
        _apply_grokalign,
        defaults={"weight": 1e-3, "num_projections": 1, "estimator": "vjp"},
        order=0,
        summary="GrokAlign Jacobian-norm penalty (Walker et al. 2025)",
    )
)


# --------------------------------------------------------------------------------------------
# What a Jacobian penalty differentiates, and the one training step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PenaltyRoute:
    """How a model's input reaches its logits, split where a Jacobian penalty looks.

    ``prepare(x)`` is the penalty's input (token embeddings, or the float input) and
    ``logits(prepare(x))`` the model's output; ``name`` is ``"embeddings"`` or ``"input"``.
    """

    prepare: Callable[[Tensor], Tensor]
    logits: Callable[[Tensor], Tensor]
    name: str


def penalty_route(model: nn.Module) -> PenaltyRoute:
    """The one rule, for the race and ``grokopt bench`` alike: token models (with ``embed``
    and ``forward_embeddings``) are differentiated w.r.t. their embeddings, as the GrokAlign
    paper does; the Omnigrok MLP w.r.t. its flattened input through its bare
    ``nn.Sequential`` (so GrokAlign takes its piecewise-linear path); any other model w.r.t.
    its input.

    Example:
        >>> from grokopt.tasks import EmbeddingMLP, OmnigrokMLP
        >>> penalty_route(EmbeddingMLP(vocab_size=5, seq_len=3, num_classes=5)).name
        'embeddings'
        >>> mlp = OmnigrokMLP(4, (8,), 3)
        >>> route = penalty_route(mlp)
        >>> x = torch.randn(2, 4)
        >>> route.name, torch.equal(route.logits(route.prepare(x)), mlp(x))
        ('input', True)
    """
    if hasattr(model, "embed") and hasattr(model, "forward_embeddings"):
        split: Any = model  # (a module's attributes type as Tensor | Module)
        return PenaltyRoute(split.embed, split.forward_embeddings, "embeddings")
    if isinstance(model, OmnigrokMLP):
        return PenaltyRoute(lambda x: x.flatten(1), model.net, "input")
    return PenaltyRoute(lambda x: x, model, "input")


def training_step(parts: TrainParts, route: PenaltyRoute,
                  loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
                  step: int, clip: tuple[list[Tensor], float] | None = None) -> None:
    """One optimizer step of the arm ``parts`` on the batch ``(x, y)``, then its
    ``after_step`` hooks with the new step count ``step + 1``. ``clip`` is
    ``(parameters, max_norm)`` to clip the gradient norm before the step, or None.
    """
    inp = route.prepare(x)
    loss_fn = parts.loss_fn or loss_fn
    if parts.forward is not None:
        logits, extra = parts.forward(inp)
        loss = loss_fn(logits, y) + extra
    else:
        logits = route.logits(inp)
        loss = loss_fn(logits, y)
    for penalty in parts.penalties:
        loss = loss + penalty(inp, logits)
    opt = parts.optimizer
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    opt.step()
    for hook in parts.after_step:
        hook(step + 1, x, y)
