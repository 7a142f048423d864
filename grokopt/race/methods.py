"""The race's method registry and arm specs (``"grokfast+grokalign:lamb=5,wd=0.01"``).

A method is a function ``apply(ctx, parts, params)`` that wraps the run's optimizer and/or
adds loss terms and per-step hooks; combined methods apply in a fixed nesting order.
"""

from __future__ import annotations

import ast
import inspect
import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "RunSpec",
    "TrainParts",
    "hyperparameter_names",
    "parse_run_spec",
    "register_method",
]


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


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
    methods train on the inner split and receive the held-out outer split.

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


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name`` (replacing any previous one)."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", method.name):
        raise ValueError(
            f"method.name: expected lowercase letters, digits, '-' or '_', got {method.name!r}"
        )
    METHODS[method.name] = method
    return method


def _missing(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        import grokopt

        if hasattr(grokopt, name):
            return None
        try:  # the module may exist before grokopt/__init__.py re-exports it
            _import_grokopt_name(name)
            return None
        except (ImportError, AttributeError):
            return f"grokopt.{name} is not available in this installation"

    return check


_NAME_MODULES = {
    "Grokfast": "grokopt.grokfast",
    "GrokAlignLoss": "grokopt.grokalign",
    "AmplifiedOptimizer": "grokopt.neuralgrok",
    "OrthoGrad": "grokopt.orthograd",
    "EGD": "grokopt.egd",
    "stablemax_cross_entropy": "grokopt.stablemax",
}


def _import_grokopt_name(name: str) -> Any:
    import grokopt

    if hasattr(grokopt, name):
        return getattr(grokopt, name)
    return getattr(importlib.import_module(_NAME_MODULES[name]), name)


def _apply_baseline(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    pass


def _apply_grokfast(filter_name: str) -> Callable[[MethodContext, TrainParts, Mapping[str, Any]], None]:
    def apply(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
        grokfast_cls = _import_grokopt_name("Grokfast")
        parts.optimizer = grokfast_cls(parts.optimizer, filter=filter_name, **params)

    return apply


def _apply_grokalign(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    loss_cls = _import_grokopt_name("GrokAlignLoss")
    gen = torch.Generator(device=ctx.device).manual_seed(10_007 * ctx.seed + 1)
    parts.generators["grokalign"] = gen
    penalty = loss_cls(ctx.logits_from_penalty_input, generator=gen, **params)
    if parts.forward is None:
        # One pass gives the logits and the penalty: no second task forward.
        parts.forward = penalty.forward_with_penalty
    else:
        parts.penalties.append(lambda inp, logits: penalty(inp))


def _apply_neuralgrok(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    amp_cls = _import_grokopt_name("AmplifiedOptimizer")
    options = dict(params)
    options.setdefault("max_grad_norm", ctx.clip_grad_norm)
    opt = amp_cls(parts.optimizer, **options)
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
    parts.optimizer = _import_grokopt_name("OrthoGrad")(parts.optimizer, **params)


def _apply_stablemax(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    if ctx.loss_fn is not torch.nn.functional.cross_entropy:
        raise ValueError("stablemax replaces the cross-entropy loss; this race uses loss='mse'")
    parts.loss_fn = _import_grokopt_name("stablemax_cross_entropy")


def _apply_egd(ctx: MethodContext, parts: TrainParts, params: Mapping[str, Any]) -> None:
    options = dict(params)
    until = options.pop("until")
    if until is not None and not (isinstance(until, (int, float)) and 0 < until <= 1):
        raise ValueError(f"until: expected a validation accuracy in (0, 1] or none, got {until!r}")
    opt = _import_grokopt_name("EGD")(parts.optimizer, **options)
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
    from ._compat import muon
    from .race_muon import MuonWithAuxiliary, muon_parameters

    muon_cls = muon()  # TorchTooOldError, naming torch 2.9, where it is missing
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
    from ._compat import TorchTooOldError, muon

    try:
        muon()
    except TorchTooOldError as exc:
        return str(exc)
    return None


register_method(Method("baseline", _apply_baseline, summary="the base optimizer alone"))
register_method(
    Method(
        "grokfast",
        _apply_grokfast("ema"),
        defaults={"alpha": 0.98, "lamb": 2.0},
        order=10,
        summary="Grokfast EMA gradient filter (Lee et al. 2024)",
        unavailable=_missing("Grokfast"),
    )
)
register_method(
    Method(
        "grokfast-ma",
        _apply_grokfast("ma"),
        defaults={"window": 100, "lamb": 5.0, "reduction": "mean", "warmup": True},
        order=10,
        summary="Grokfast moving-average gradient filter",
        unavailable=_missing("Grokfast"),
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
        unavailable=_missing("AmplifiedOptimizer"),
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
        unavailable=_missing("OrthoGrad"),
    )
)
register_method(
    Method(
        "stablemax",
        _apply_stablemax,
        order=0,
        summary="StableMax cross-entropy instead of softmax's (Prieto et al. 2025)",
        unavailable=_missing("stablemax_cross_entropy"),
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
        unavailable=_missing("EGD"),
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
        unavailable=_missing("GrokAlignLoss"),
    )
)


# --------------------------------------------------------------------------------------------
# Run specs: "method[+method...][:key=value,...]"
# --------------------------------------------------------------------------------------------

_TRAINING_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "wd": "weight_decay",
                  "clip": "clip_grad_norm"}


@dataclass(frozen=True)
class RunSpec:
    """One arm of a race, parsed from ``"grokfast+grokalign:lamb=5,wd=0.01"``.

    ``params`` holds each component's resolved hyperparameters; ``training`` the per-arm
    training overrides (``lr``, ``weight_decay``); ``applied_overrides`` the keys of the
    race-wide overrides that set something in this arm.

    Example:
        >>> spec = parse_run_spec("grokfast:lamb=5,wd=0.01")
        >>> spec.components, spec.params["grokfast"]["lamb"], spec.training
        (('grokfast',), 5, {'weight_decay': 0.01})
    """

    label: str
    components: tuple[str, ...]
    params: dict[str, dict[str, Any]]
    training: dict[str, Any]
    applied_overrides: tuple[str, ...] = field(default=(), compare=False)

    @property
    def uses_outer(self) -> bool:
        return any(METHODS[c].uses_outer for c in self.components)


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text.strip()


def _split_assignments(text: str) -> list[tuple[str, Any]]:
    out = []
    # Commas inside parentheses belong to tuple values such as hidden=(128,128).
    for item in re.split(r",(?![^()\[\]]*[)\]])", text):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"methods: {text!r}: expected key=value, got {item.strip()!r}")
        key, value = item.split("=", 1)
        out.append((key.strip(), _parse_value(value)))
    return out


def _check_training_value(key: str, value: Any) -> None:
    # The base optimizer would refuse these only when the run is built, with torch's own
    # words; checking here names the key and keeps a bad arm from reaching training.
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "lr" and not (real and math.isfinite(value) and value > 0):
        raise ValueError(f"lr: expected a positive float, got {value!r}")
    if key == "weight_decay" and not (real and math.isfinite(value) and value >= 0):
        raise ValueError(f"weight_decay: expected a float >= 0, got {value!r}")
    if key == "clip_grad_norm" and not (value is None or (real and math.isfinite(value) and value > 0)):
        raise ValueError(f"clip: expected a positive float or none, got {value!r}")


def hyperparameter_names() -> list[str]:
    """Every key an arm or ``--set`` accepts: training keys, each registered method's
    hyperparameters bare and as ``method.name``.

    Example:
        >>> {"lr", "wd", "lamb", "grokfast.lamb"} <= set(hyperparameter_names())
        True
    """
    names = set(_TRAINING_KEYS)
    for m in METHODS.values():
        names.update(m.defaults)
        names.update(f"{m.name}.{k}" for k in m.defaults)
    return sorted(names)


def parse_run_spec(text: str, global_overrides: Mapping[str, Any] | None = None) -> RunSpec:
    """Parse an arm ``"name[+name...][:key=value,...]"`` into a :class:`RunSpec`.

    Keys are a component's hyperparameter (``lamb``; ``grokfast.lamb`` when two components
    share a name) or a training key (``lr``, ``weight_decay``/``wd``). ``global_overrides``
    (from ``--set``) apply first; the arm's own keys win. An override key that no registered
    method has is refused (``ValueError`` starting ``overrides:``); one that belongs to a
    method outside this arm is skipped, and :attr:`RunSpec.applied_overrides` says which
    applied. Errors in the arm's own text start with ``methods:``.

    Example:
        >>> spec = parse_run_spec("grokfast:alpha=0.9", {"lamb": 3, "grokalign.weight": 1.0})
        >>> spec.params["grokfast"], spec.applied_overrides
        ({'alpha': 0.9, 'lamb': 3}, ('lamb',))
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"methods: expected a non-empty method spec, got {text!r}")
    head, _, tail = text.strip().partition(":")
    names = tuple(n.strip() for n in head.split("+"))
    for n in names:
        if n not in METHODS:
            raise ValueError(f"methods: unknown method {n!r} in {text.strip()!r}; allowed: "
                             f"{', '.join(sorted(METHODS))}")
        reason = METHODS[n].unavailable()
        if reason:
            raise RuntimeError(f"methods: method {n!r} is registered but unavailable: {reason}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods: component repeated in {text!r}")
    components = tuple(sorted(names, key=lambda n: (METHODS[n].order, names.index(n))))
    params = {c: dict(METHODS[c].defaults) for c in components}
    training: dict[str, Any] = {}
    applied: list[str] = []

    def assign(key: str, value: Any, strict: bool) -> bool:
        where = f"methods: {text.strip()!r}: " if strict else "overrides: "
        if key in _TRAINING_KEYS:
            try:
                _check_training_value(_TRAINING_KEYS[key], value)
            except ValueError as exc:
                raise ValueError(where + str(exc)) from None
            training[_TRAINING_KEYS[key]] = value
            return True
        comp, dot, name = key.rpartition(".")
        if dot:
            if comp not in METHODS:
                raise ValueError(f"{where}{key}: unknown method {comp!r}; allowed: "
                                 f"{', '.join(sorted(METHODS))}")
            if name not in METHODS[comp].defaults:
                raise ValueError(
                    f"{where}{key}: {comp} has no hyperparameter {name!r}; "
                    f"allowed: {', '.join(METHODS[comp].defaults) or '(none)'}"
                )
            if comp not in params:
                if strict:
                    raise ValueError(f"{where}{key}: method {comp!r} is not part of this arm")
                return False
            params[comp][name] = value
            return True
        owners = [c for c in components if key in params[c]]
        if len(owners) > 1:
            raise ValueError(f"{where}{key}: ambiguous; write one of "
                             + ", ".join(f"{c}.{key}" for c in owners))
        if not owners:
            if strict:
                allowed = sorted({*_TRAINING_KEYS, *(k for c in components for k in params[c])})
                raise ValueError(f"{where}{key}: not a hyperparameter of this arm; "
                                 f"allowed: {', '.join(allowed)}")
            if not any(key in m.defaults for m in METHODS.values()):
                raise ValueError(f"{where}{key}: no method has this hyperparameter; allowed: "
                                 f"{', '.join(hyperparameter_names())}")
            return False
        params[owners[0]][key] = value
        return True

    for key, value in (global_overrides or {}).items():
        if assign(key, value, strict=False):
            applied.append(key)
    for key, value in _split_assignments(tail):
        assign(key, value, strict=True)
    return RunSpec(label=text.strip(), components=components, params=params, training=training,
                   applied_overrides=tuple(applied))
