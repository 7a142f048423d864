"""grokopt/__init__.py and the shape of the package: ``import grokopt`` loads the library only,
the tools' names resolve lazily, and imports flow one way (tools -> library -> torch).

The import graph is read from the source (ast), not from ``sys.modules``, so that an import
inside a function (which runs only on some paths) counts as much as one at module level.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import grokopt

ROOT = Path(grokopt.__file__).resolve().parent
REPO = ROOT.parent

#: The tools: everything else under grokopt/ is the library, which must never import these.
TOOLS = ("grokopt.race", "grokopt.bench", "grokopt.cli", "grokopt.tasks", "grokopt.__main__")
#: The names grokopt exports from the tools, resolved on first use.
LAZY = ("RaceConfig", "RaceResult", "run_race", "DecoderTransformer", "EmbeddingMLP",
        "OmnigrokMLP", "grokfast_split", "load_digits_task", "modular_dataset",
        "neuralgrok_split")


def _is_tool(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLS)


# --------------------------------------------------------------------------------- laziness


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    return json.loads(out.stdout.splitlines()[-1])


def test_import_grokopt_loads_the_library_only() -> None:
    loaded = _fresh(
        "import json, sys, grokopt; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grokopt', 'matplotlib', 'rich', 'sklearn', 'mlxtend'))))")
    assert "grokopt.wrapper" in loaded  # the check looks where the library is
    tools = [m for m in loaded if _is_tool(m)]
    assert not tools, f"import grokopt loaded tool modules: {tools}"
    extras = [m for m in loaded if not m.startswith("grokopt")]
    assert not extras, f"import grokopt loaded optional packages: {extras}"


def test_import_grokopt_leaves_dtensor_unimported() -> None:
    # torch.distributed.tensor costs about half of torch's own import time; the library
    # recognises DTensors without importing it (none can exist before it is imported).
    loaded = _fresh("import json, sys, grokopt; "
                    "print(json.dumps('torch.distributed.tensor' in sys.modules))")
    assert loaded is False


def test_lazy_names_resolve_to_the_tools_objects_and_are_listed() -> None:
    got = _fresh(
        "import json, sys, grokopt; listed = set(dir(grokopt)); "
        f"names = {list(LAZY)!r}; "
        "objs = {n: getattr(grokopt, n) for n in names}; "
        "print(json.dumps({'listed': sorted(set(names) & listed), "
        "'where': {n: o.__module__ for n, o in objs.items()}, "
        "'race': 'grokopt.race' in sys.modules}))")
    assert got["listed"] == sorted(LAZY)
    assert got["race"]  # the first use imported it
    for name, module in got["where"].items():
        assert _is_tool(module), (name, module)
    from grokopt.race import RaceConfig, run_race
    from grokopt.tasks import OmnigrokMLP

    assert grokopt.RaceConfig is RaceConfig and grokopt.run_race is run_race
    assert grokopt.OmnigrokMLP is OmnigrokMLP
    assert set(LAZY) <= set(grokopt.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        grokopt.NoSuchThing  # noqa: B018


# ----------------------------------------------------------------------------- import graph


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, str | None]]:
    """``(target module, imported name or None)`` for every import in ``module``, at any depth
    (module level, inside functions and classes, under ``if TYPE_CHECKING``)."""
    path, is_pkg = MODULES[module]
    package = module if is_pkg else module.rpartition(".")[0]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(target, alias.name) for alias in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, name in _imports(module):
            # "from pkg import sub" imports the module pkg.sub; "from mod import name" imports mod.
            if name is not None and f"{target}.{name}" in MODULES:
                graph[module].add(f"{target}.{name}")
            elif target in MODULES:
                graph[module].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reader_sees_relative_function_level_and_submodule_imports() -> None:
    # The checks below are only as good as the reader: on a module whose imports are known.
    edges = _graph()
    assert "grokopt.race.methods" in edges["grokopt.race.specs"]         # from .methods import
    assert "grokopt.tasks" in edges["grokopt.race.engine"]               # from ..tasks import
    assert "grokopt.bench" in edges["grokopt.cli"]                       # inside a function
    assert "grokopt.race.leaderboard" in edges["grokopt.cli"]            # from .race.leaderboard
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_inside_grokopt() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_library_module_imports_a_tool() -> None:
    offenders = [f"{m} imports {t}" for m, targets in _graph().items() if not _is_tool(m)
                 for t in sorted(targets) if _is_tool(t)]
    assert not offenders, "\n".join(offenders)


def test_tools_reach_the_library_only_through_the_public_namespace() -> None:
    # A tool names a library object as `from grokopt import X`: never a library module's
    # path, so the library can rename its modules without touching the tools.
    offenders = [f"{m} imports {t}" for m, targets in _graph().items() if _is_tool(m)
                 for t in sorted(targets)
                 if not _is_tool(t) and t != "grokopt" and not t.startswith("grokopt._")]
    assert not offenders, "\n".join(offenders)


# Library modules that still import another module's underscore names on this branch; the
# jacobian split (issue 12) removes them. strict: once fixed, the entry must go.
@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_another_modules_underscore_names(module: str) -> None:
    private = [f"from {target} import {name}" for target, name in _imports(module)
               if name is not None and name.startswith("_") and target.startswith("grokopt")
               and f"{target}.{name}" not in MODULES and name != "__version__"]
    assert not private, f"{module}: " + "; ".join(private)
