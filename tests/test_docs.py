"""The README's Python snippets and every docstring example in grokopt actually run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import grokopt

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(grokopt.__path__, prefix="grokopt.")
    if m.name not in ("grokopt.__main__",)
)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {})


def test_readme_has_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_name_has_a_docstring_with_an_example():
    for name in grokopt.__all__:
        obj = getattr(grokopt, name)
        doc = obj.__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
        is_exception = isinstance(obj, type) and issubclass(obj, BaseException)
        if not is_exception:
            assert ">>>" in doc, f"{name}'s docstring has no runnable example"
