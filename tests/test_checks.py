"""The shared argument checks: one rule (wrong type -> TypeError, wrong value -> ValueError),
one message shape ("<name> must be <allowed>, got <value>"), checked against a plain
restatement of each rule over a grid of values."""

from __future__ import annotations

import math
import re

import pytest
import torch

from grokopt._checks import (
    check_batch,
    check_bool,
    check_choice,
    check_float,
    check_generator,
    check_int,
    check_model,
    check_type,
    describe,
)

VALUES = [-2, -1, 0, 1, 2, 7, -1.5, -0.0, 0.0, 0.5, 1.0, 2.5, math.inf, -math.inf, math.nan,
          True, False, None, "1", [1], torch.tensor(0.5), torch.ones(2), torch.tensor(1)]


def _outcome(fn):
    try:
        fn()
    except TypeError as exc:
        return "type", str(exc)
    except ValueError as exc:
        return "value", str(exc)
    return "ok", ""


@pytest.mark.parametrize("minimum,maximum", [(None, None), (0, None), (1, None), (None, 2), (-1, 2)])
def test_check_int_against_its_rule(minimum, maximum):
    for v in VALUES:
        kind, msg = _outcome(lambda: check_int("n", v, minimum=minimum, maximum=maximum))
        is_int = isinstance(v, int) and not isinstance(v, bool)
        expected = ("type" if not is_int else
                    "value" if (minimum is not None and v < minimum) or (maximum is not None and v > maximum)
                    else "ok")
        assert kind == expected, (v, kind, msg)
        if kind != "ok":
            assert re.match(r"n must be an int", msg) and ", got " in msg, msg


@pytest.mark.parametrize("minimum,maximum,min_open,max_open", [
    (None, None, False, False), (0, None, False, False), (0, None, True, False),
    (0, 1, False, True), (-1, 2.5, True, True),
])
@pytest.mark.parametrize("allow_tensor", [False, True])
def test_check_float_against_its_rule(minimum, maximum, min_open, max_open, allow_tensor):
    for v in VALUES:
        kind, msg = _outcome(lambda: check_float("lr", v, minimum=minimum, maximum=maximum,
                                                 min_open=min_open, max_open=max_open,
                                                 allow_tensor=allow_tensor))
        if isinstance(v, torch.Tensor):
            expected = "ok" if allow_tensor and v.ndim == 0 and v.is_floating_point() else "type"
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            expected = "type"
        else:
            below = minimum is not None and (v <= minimum if min_open else v < minimum)
            above = maximum is not None and (v >= maximum if max_open else v > maximum)
            expected = "value" if not math.isfinite(v) or below or above else "ok"
        assert kind == expected, (v, kind, msg)
        if kind != "ok":
            assert msg.startswith("lr must be a finite float") and ", got " in msg, msg


def test_bounds_are_spelled_in_the_message():
    with pytest.raises(ValueError, match=r"^alpha must be a finite float >= 0 and < 1, got 1\.0$"):
        check_float("alpha", 1.0, minimum=0, maximum=1, max_open=True)
    with pytest.raises(ValueError, match=r"^window must be an int >= 1, got 0$"):
        check_int("window", 0, minimum=1)
    with pytest.raises(TypeError, match=r"^window must be an int >= 1, got str: '3'$"):
        check_int("window", "3", minimum=1)
    assert check_int("k", None, allow_none=True) is None
    assert check_float("x", None, allow_none=True) is None


def test_check_bool_refuses_ints_and_names_none_when_allowed():
    assert check_bool("flag", True) is True and check_bool("flag", None, allow_none=True) is None
    for v in (0, 1, "True", None):
        with pytest.raises(TypeError, match=r"^flag must be a bool, got "):
            check_bool("flag", v)
    with pytest.raises(TypeError, match=r"^flag must be None, True or False, got int: 1$"):
        check_bool("flag", 1, allow_none=True)


def test_check_choice_lists_the_choices_and_tells_bools_from_ints():
    assert check_choice("mode", "skip", ("error", "skip")) == "skip"
    with pytest.raises(ValueError, match=r"^mode must be one of \('error', 'skip'\), got 'ignore'$"):
        check_choice("mode", "ignore", ("error", "skip"))
    with pytest.raises(ValueError):
        check_choice("mode", [1], ("error", "skip"))  # unhashable against a tuple: refused
    with pytest.raises(ValueError):
        check_choice("k", True, (1, 2))  # True == 1, but a bool is not a choice here
    assert check_choice("k", 1, (1, 2)) == 1


def test_check_type_generator_model_batch():
    assert check_type("x", 3, int, "an int") == 3
    with pytest.raises(TypeError, match=r"^x must be an int, got str: 'a'; hint$"):
        check_type("x", "a", int, "an int", "; hint")
    g = torch.Generator()
    assert check_generator("generator", g) is g and check_generator("generator", None) is None
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int: 3"):
        check_generator("generator", 3)
    with pytest.raises(TypeError, match="model must be callable"):
        check_model("model", 3)
    x = torch.zeros(2, 3)
    assert check_batch("x", x) is x
    with pytest.raises(TypeError, match="x must be a real floating-point tensor"):
        check_batch("x", torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 dims"):
        check_batch("x", torch.zeros(3))
    with pytest.raises(ValueError, match="at least one sample"):
        check_batch("x", torch.zeros(0, 3))


def test_describe_shortens_long_values():
    assert describe("ab") == "str: 'ab'"
    text = describe("x" * 200)
    assert text.startswith("str: 'xxx") and text.endswith("...") and len(text) == len("str: ") + 80
