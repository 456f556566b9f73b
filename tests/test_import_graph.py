"""The package's import structure: every module imports on its own, and no two modules import each
other, directly or through others (not even from inside a function).

The graph is read statically (ast) from the package's own sources: an edge ``a -> b`` for each
``import`` / ``from ... import`` of a package module in ``a``, plus the packages above ``b`` that
importing ``b`` runs (except ``a``'s own).  ``if TYPE_CHECKING:`` blocks are skipped.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "featup_adapters"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if "csrc" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported_names(name: str, path: Path, *, in_functions: bool):
    """(module, imported name or None, line) of every import statement of the module."""
    base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                if in_functions:
                    visit(child)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            elif isinstance(child, ast.Import):
                found.extend((a.name, None, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = base.split(".")
                    parts = parts[:len(parts) - child.level + 1]
                    module = ".".join(parts + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                found.extend((module, a.name, child.lineno) for a in child.names)
            else:
                visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph(*, in_functions: bool) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the import}."""
    graph = {}
    for name, path in MODULES.items():
        edges = {}
        for module, item, line in _imported_names(name, path, in_functions=in_functions):
            if module != PKG and not module.startswith(PKG + "."):
                continue
            target = f"{module}.{item}" if item and f"{module}.{item}" in MODULES else module
            while target not in MODULES:
                target = target.rsplit(".", 1)[0]
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                own_ancestor = name == dep or name.startswith(dep + ".")
                if dep != name and (i == len(parts) or not own_ancestor):
                    edges.setdefault(dep, line)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(v):
        state[v] = 1
        path.append(v)
        for w in graph.get(v, {}):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                cycle = dfs(w)
                if cycle:
                    return cycle
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            cycle = dfs(v)
            if cycle:
                return cycle
    return None


def _describe(graph, cycle) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + \
        f" -> {cycle[-1]}"


def test_the_checker_sees_a_cycle():
    graph = {"p.a": {"p.b": 3}, "p.b": {"p.c": 5}, "p.c": {"p.a": 7}, "p.d": {"p.a": 1}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b": 1}, "p.b": {}}) is None


def test_the_graph_resolves_relative_and_package_imports():
    graph = import_graph(in_functions=False)
    # hub/featup.py: "from ..upsamplers import JBUStack" and "from .._format import ..."
    assert {"featup_adapters.upsamplers", "featup_adapters._format"} <= \
        set(graph["featup_adapters.hub.featup"])
    # hub/format.py imports upsamplers._base, which runs upsamplers/__init__.py first
    assert {"featup_adapters.upsamplers._base", "featup_adapters.upsamplers"} <= \
        set(graph["featup_adapters.hub.format"])
    # a module's own packages are not counted as imported by it
    assert "featup_adapters.hub" not in graph["featup_adapters.hub.format"]
    # cli.py's picture commands are imported inside a function: only the with-functions graph
    # has that edge
    assert "featup_adapters._cli_pictures" not in graph["featup_adapters.cli"]
    assert "featup_adapters._cli_pictures" in import_graph(in_functions=True)["featup_adapters.cli"]


@pytest.mark.parametrize("in_functions", [False, True], ids=["module-level", "with-functions"])
def test_no_import_cycles(in_functions):
    graph = import_graph(in_functions=in_functions)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(graph, cycle)}"


def test_every_module_imports_alone_in_a_fresh_interpreter():
    # A child interpreter imports torch once, then forks one process per module, which imports
    # only that module: each import starts with no featup_adapters module loaded.
    script = (
        "import os, sys, traceback\n"
        "import torch\n"
        "assert not [m for m in sys.modules if m.startswith('featup_adapters')]\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            __import__(name)\n"
        "        except BaseException:\n"
        "            traceback.print_exc()\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1]:\n"
        "        failed.append(name)\n"
        "print(' '.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    r = subprocess.run([sys.executable, "-c", script, *sorted(MODULES)], capture_output=True,
                       text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, f"modules that fail to import alone: {r.stdout}\n{r.stderr[-3000:]}"
