"""Argument checks shared by every public call: one style of message.

A wrong *type* raises :class:`TypeError`, a value of the right type outside the allowed set
raises :class:`ValueError`; both read ``"<name> must be <what is allowed>, got <what came>"``
so that a user sees the argument, the allowed values and the offending value in one line.
Each check returns the value (converted where said), so callers can write
``self.window = check_int("window", window, minimum=1)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_batch", "check_bool", "check_choice", "check_float", "check_generator", "check_int",
    "check_model", "check_type", "describe",
]


def describe(value: Any) -> str:
    """``"<type>: <repr>"``, shortened: how a wrongly typed value is named in messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__}: {text}"


def check_type(name: str, value: Any, types: type | tuple[type, ...], what: str,
               hint: str = "") -> Any:
    """``value`` if it is an instance of ``types``; else TypeError naming ``what`` is allowed."""
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {describe(value)}{hint}")
    return value


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """A bool (or None with ``allow_none``); ints such as 0/1 are refused."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        what = "None, True or False" if allow_none else "a bool"
        raise TypeError(f"{name} must be {what}, got {describe(value)}")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices`` (compared with ==); else ValueError listing them."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set
        ok = False
    if not ok or isinstance(value, bool) != any(isinstance(c, bool) for c in choices if c == value):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _bounds(minimum: float | None, maximum: float | None, *, min_open: bool,
            max_open: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if min_open else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if max_open else '<='} {maximum}")
    return " and ".join(parts)


def check_int(name: str, value: Any, *, minimum: int | None = None,
              maximum: int | None = None, allow_none: bool = False) -> int | None:
    """An int (not a bool) within ``[minimum, maximum]``."""
    if value is None and allow_none:
        return None
    bounds = _bounds(minimum, maximum, min_open=False, max_open=False)
    what = f"an int {bounds}".rstrip() + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_float(name: str, value: Any, *, minimum: float | None = None,
                maximum: float | None = None, min_open: bool = False,
                max_open: bool = False, allow_tensor: bool = False,
                allow_none: bool = False) -> float | Tensor | None:
    """A finite real number (int or float, not bool) within the bounds.

    With ``allow_tensor`` a 0-d floating-point tensor is accepted as it is and not
    range-checked (checking its value would cost a host sync at every call).
    """
    if value is None and allow_none:
        return None
    bounds = _bounds(minimum, maximum, min_open=min_open, max_open=max_open)
    what = f"a finite float {bounds}".rstrip()
    if allow_tensor:
        what += " (or a 0-d float tensor)"
    if allow_none:
        what += " or None"
    if isinstance(value, Tensor):
        if allow_tensor and value.ndim == 0 and value.is_floating_point():
            return value
        raise TypeError(f"{name} must be {what}, got a tensor of shape {tuple(value.shape)} "
                        f"and dtype {value.dtype}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {what}, got {describe(value)}")
    if (not math.isfinite(value)
            or (minimum is not None and (value <= minimum if min_open else value < minimum))
            or (maximum is not None and (value >= maximum if max_open else value > maximum))):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_generator(name: str, value: Any) -> torch.Generator | None:
    """A :class:`torch.Generator` or None."""
    return check_type(name, value, (torch.Generator, type(None)), "a torch.Generator or None")



def check_model(name: str, value: Any) -> Any:
    """A callable model (a map from a batch tensor to outputs); it is not called here."""
    if not callable(value):
        raise TypeError(f"{name} must be callable (a tensor -> logits map), got {describe(value)}")
    return value


def check_batch(name: str, value: Any) -> Tensor:
    """A real floating-point tensor ``(batch, *features)`` with at least one sample and one
    feature: the point an input Jacobian is taken at."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, *features), "
                        f"got {describe(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor (the Jacobian is taken "
                        f"w.r.t. it; pass embeddings, not token ids), got dtype {value.dtype}")
    shape = tuple(value.shape)
    if value.dim() < 2:
        raise ValueError(f"{name} must have shape (batch, *features) with at least 2 dims, "
                         f"got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got an empty batch of shape {shape}")
    if value.numel() == 0:
        raise ValueError(f"{name} must have at least one feature, got a zero-size feature "
                         f"dimension in shape {shape}")
    return value

