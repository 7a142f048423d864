"""Arm specs: ``"grokfast+grokalign:lamb=5,wd=0.01"`` -> :class:`RunSpec`, and the one
KEY=VALUE value parser the race, ``grokopt bench`` and the command line share."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .methods import BASELINE, METHODS

__all__ = ["RunSpec", "hyperparameter_names", "parse_run_spec", "parse_value",
           "split_assignments"]


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


def parse_value(text: str) -> Any:
    """The value of a ``KEY=VALUE`` pair: a Python literal, ``true``/``false``, ``none``, or
    else the bare word as a string.

    Example:
        >>> [parse_value(t) for t in ("5", "1e-3", "(128,128)", "True", "none", "svd")]
        [5, 0.001, (128, 128), True, None, 'svd']
    """
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text.strip()


def split_assignments(text: str) -> list[tuple[str, Any]]:
    """``"lamb=5,hidden=(128,128)"`` -> ``[("lamb", 5), ("hidden", (128, 128))]``.

    Example:
        >>> split_assignments("lamb=5,hidden=(128,128)")
        [('lamb', 5), ('hidden', (128, 128))]
    """
    out = []
    # Commas inside parentheses belong to tuple values such as hidden=(128,128).
    for item in re.split(r",(?![^()\[\]]*[)\]])", text):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"methods: {text!r}: expected key=value, got {item.strip()!r}")
        key, value = item.split("=", 1)
        out.append((key.strip(), parse_value(value)))
    return out


def _check_training_value(key: str, value: Any) -> None:
    # The base optimizer would refuse these only when the run is built, with torch's own
    # words; checking here names the key and keeps a bad arm from reaching training.
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "lr" and not (real and math.isfinite(value) and value > 0):
        raise ValueError(f"lr must be a positive float, got {value!r}")
    if key == "weight_decay" and not (real and math.isfinite(value) and value >= 0):
        raise ValueError(f"weight_decay must be a float >= 0, got {value!r}")
    if key == "clip_grad_norm" and not (value is None or (real and math.isfinite(value) and value > 0)):
        raise ValueError(f"clip must be a positive float or none, got {value!r}")


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
    for key, value in split_assignments(tail):
        assign(key, value, strict=True)
    if BASELINE in components and len(components) > 1:
        raise ValueError(f"methods: {BASELINE!r} is the base optimizer alone and cannot be "
                         f"combined, got {text.strip()!r}")
    for c in components:
        clash = [o for o in components if o in METHODS[c].excludes or c in METHODS[o].excludes]
        if clash:
            raise ValueError(f"methods: {text.strip()!r} combines {c!r} with {clash[0]!r}; "
                             "they exclude each other, pick one")
    return RunSpec(label=text.strip(), components=components, params=params, training=training,
                   applied_overrides=tuple(applied))
