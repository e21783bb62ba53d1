"""Layers that only point down: the import graph of skillkern has no cycle, and every module imports alone.

The graph is read from the sources (AST), with every ``import`` / ``from ... import`` of a skillkern module,
relative or absolute, at module level AND inside functions (a function-level import that goes up closes a cycle
as surely as a module-level one; it only fails later). Imports under ``if TYPE_CHECKING:`` never run and are left
out. ``from . import __version__`` points at the package ``skillkern`` itself, whose ``__init__`` imports no
submodule (its public names load lazily).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "skillkern"

#: DESIGN.md's layers, bottom first: an import must not go up (same layer is allowed; the cycle test covers it).
#: Every module has a place here (a new module must be given one: test_every_module_has_a_layer).
RANKS = {
    # leaves: the lazy package __init__, atomic files, task data, pictures, activations, the optional extension
    "skillkern": 0, "skillkern.files": 0, "skillkern.data": 0, "skillkern.plotting": 0,
    "skillkern.ops.activations": 0, "skillkern._ext": 0,
    "skillkern.ops.dispatch": 1,  # the only place that knows backends
    "skillkern.ops.stats_update": 2, "skillkern.ops.masked_ffn": 2,
    "skillkern.ops.stats_moments": 2,  # stats_update's kernel in its moments mode (same layer)
    "skillkern.ops.ffn_stats": 3,  # its epilogue is stats_update's
    "skillkern.ops": 4, "skillkern.ops.aot": 4,  # every op registered; the compile gate over all of them
    "skillkern.pruned_format": 5,
    "skillkern.models": 6,
    "skillkern.batching": 7, "skillkern.stats": 7,
    "skillkern.checkpoint": 8,
    "skillkern.scoring": 9, "skillkern.prompt": 9,
    "skillkern.tune": 10,
    "skillkern.runs": 11,
    "skillkern.prune": 12, "skillkern.perturb": 12, "skillkern.transfer": 12,
    "skillkern.cli": 13,
    "skillkern.__main__": 14,
}


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (``__init__`` names the package)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(node: ast.AST):
    """Every import statement in ``node``, at any depth, except those only run for type checkers."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    for child in node.orelse if _type_checking_only(node) else ast.iter_child_nodes(node):
        yield from _imports(child)


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of the first such import}."""
    modules = module_names(package)
    root = package.name
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    parts = here.split(".")
                    source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from .ops import dispatch` imports the module .ops.dispatch; `from .x import f` imports .x
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                while target not in modules and "." in target:  # a name inside a module: that module
                    target = target.rpartition(".")[0]
                if target in modules and target != name and target.split(".")[0] == root:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_graph_reader_sees_relative_absolute_and_function_level_imports(tmp_path):
    """The reader itself, on a made-up package: a cycle closed by a function-level import is found."""
    pkg = tmp_path / "skillkern"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("from . import kernel\n")
    (pkg / "ops" / "kernel.py").write_text("from .. import low\n")
    (pkg / "low.py").write_text("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from skillkern import high\n")
    (pkg / "mid.py").write_text("from .low import x\nfrom skillkern.ops.kernel import k\n")
    (pkg / "high.py").write_text("import skillkern.mid\n")
    graph = import_graph(pkg)
    assert graph["skillkern.mid"] == {"skillkern.low": 1, "skillkern.ops.kernel": 2}
    assert graph["skillkern.ops"] == {"skillkern.ops.kernel": 1}
    assert graph["skillkern.ops.kernel"] == {"skillkern.low": 1}
    assert graph["skillkern.low"] == {} and graph["skillkern.high"] == {"skillkern.mid": 1}
    assert find_cycle(graph) is None
    (pkg / "low.py").write_text("def late():\n    from .high import f\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"skillkern.low", "skillkern.high",
                                                                           "skillkern.mid"}


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 10 and "skillkern.models" in graph
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(cycle, graph)}"


def test_every_module_has_a_layer():
    missing = sorted(set(module_names()) - set(RANKS))
    assert not missing, f"give these modules a layer in RANKS (tests/test_layers.py): {missing}"


def test_imports_point_down_the_layers():
    """ops below models, below scoring/tune, below runs, below prune/perturb/transfer, below cli (DESIGN.md)."""
    graph = import_graph()
    up = [f"{a} (rank {RANKS[a]}, line {line}) imports {b} (rank {RANKS[b]})"
          for a, edges in graph.items() if a in RANKS for b, line in edges.items()
          if b in RANKS and RANKS[b] > RANKS[a]]
    assert not up, "imports that go up a layer:\n" + "\n".join(up)
    assert set(graph["skillkern.pruned_format"]) <= {"skillkern.files"}, graph["skillkern.pruned_format"]


_IMPORT_EACH = r"""
import importlib, os, sys, traceback
import torch  # third-party, shared by the children: each child imports one skillkern module, and nothing else of it
assert not [m for m in sys.modules if m.startswith("skillkern")]
failed = 0
for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    if status:
        failed += 1
        print(f"=== import {name} failed:\n{err}")
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (one child per module)")
def test_each_module_imports_alone():
    """Each module imports in a process where no other skillkern module was imported first (one forked child
    per module, from an interpreter that has imported torch only): no module depends on import order."""
    names = sorted(n for n in module_names() if not n.endswith("__main__"))
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
