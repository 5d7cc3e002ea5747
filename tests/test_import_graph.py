"""The package's rooms and the direction of imports between them; no import cycles.

Rooms: cli -> commands -> analysis -> core -> recipe -> adapters / data -> base (errors, fsutil, paths, schema); a
room imports only rooms below it (the recipe schema sits above adapters and data because it assembles their
config sections). A cycle of imports makes importing depend on which module comes first, or holds only
because one of its imports waits in a function body; neither is allowed. Imports inside
``if TYPE_CHECKING:`` never run (they serve annotations) and are not part of any cycle.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

PACKAGE = "orchmoe_cli"


@dataclass(frozen=True)
class Import:
    """``source`` imports ``target``; ``deferred``: not executed when ``source`` is imported."""

    source: str
    target: str
    deferred: bool
    line: int
    typing_only: bool = False  # inside ``if TYPE_CHECKING:``: never executed


def package_modules(package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (found on disk, nothing is imported)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not an importable package"
    root = Path(next(iter(spec.submodule_search_locations)))
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


class _ImportCollector(ast.NodeVisitor):
    """Collects the imports of one module, noting whether each runs at import time."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.module, self.modules = module, modules
        self.package = module if is_package else module.rpartition(".")[0]
        self.deferred = False
        self.typing_only = False
        self.imports: list[Import] = []

    def _defer(self, nodes: list[ast.stmt], typing_only: bool = False) -> None:
        outer, self.deferred = self.deferred, True
        outer_typing, self.typing_only = self.typing_only, self.typing_only or typing_only
        for node in nodes:
            self.visit(node)
        self.deferred, self.typing_only = outer, outer_typing

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._defer(node.body)  # a class body, unlike a function's, runs at import: generic_visit covers it

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._defer(node.body, typing_only=True)
        for statement in node.orelse:  # the else branch does run
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: level 1 is this module's package, each further dot one package up
            parts = self.package.split(".")
            target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in self.modules]
        if len(submodules) < len(node.names):  # some names are read from the module itself
            self._add(target, node.lineno)
        for submodule in submodules:
            self._add(submodule, node.lineno, reads_names=False)

    def _add(self, target: str, line: int, reads_names: bool = True) -> None:
        """Import ``target`` and, first, the packages above it (their ``__init__`` runs). The importer's own
        ancestors are skipped unless names are read from them: they are already importing, and Python
        finishes a package's submodule imports against the half-built package without a problem."""
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            named = depth == len(parts) and reads_names
            if name not in self.modules or name == self.module or (name in _ancestors(self.module) and not named):
                continue
            self.imports.append(Import(self.module, name, self.deferred, line, self.typing_only))


def collect_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of one package module by another, module-level or deferred."""
    found = []
    for module, path in modules.items():
        collector = _ImportCollector(module, path.name == "__init__.py", set(modules))
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.extend(collector.imports)
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of a directed graph as paths [a, b, ..., a], at least one through every cyclic part of it.

    A depth-first search: a neighbour that is still on the current path closes a cycle, namely the path
    from that neighbour on. Nodes and neighbours are visited in sorted order, so the result is stable.
    """
    cycles: list[list[str]] = []
    path: list[str] = []
    on_path: set[str] = set()
    done: set[str] = set()

    def visit(node: str) -> None:
        path.append(node)
        on_path.add(node)
        for neighbour in sorted(graph.get(node, ())):
            if neighbour in on_path:
                cycles.append(path[path.index(neighbour):] + [neighbour])
            elif neighbour not in done:
                visit(neighbour)
        path.pop()
        on_path.remove(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def _graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in imports:
        graph.setdefault(edge.source, set()).add(edge.target)
    return graph


def _describe(cycle: list[str], imports: list[Import]) -> str:
    """``a -> b -> a`` and, per step, the line doing the import (a module-level one where there is one)."""
    steps = []
    for source, target in pairwise(cycle):
        edge = min((e for e in imports if (e.source, e.target) == (source, target)),
                   key=lambda e: (e.deferred, e.line))
        steps.append(f"{source} line {edge.line}{' (deferred)' if edge.deferred else ''}")
    return " -> ".join(cycle) + "\n    imported at: " + "; ".join(steps)


def test_cycle_finder_on_a_hand_built_graph() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = {"a": {"b", "d"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a", "c"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]
    assert find_cycles({"x": {"y"}, "y": {"x", "z"}, "z": {"y"}}) == [["x", "y", "x"], ["y", "z", "y"]]


def test_collector_resolves_and_classifies_imports(tmp_path: Path) -> None:
    source = '''from typing import TYPE_CHECKING
from . import b
from .. import c, sub
import pkg.other.e
if TYPE_CHECKING:
    from pkg import d
else:
    from pkg.sub import thing
def f():
    import pkg.d
class K:
    from pkg import c
'''
    files = {"pkg/__init__.py": "", "pkg/sub/__init__.py": "thing = 1\n", "pkg/sub/a.py": source, "pkg/sub/b.py": "",
             "pkg/c.py": "", "pkg/d.py": "", "pkg/other/__init__.py": "", "pkg/other/e.py": ""}
    modules = {}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
        modules[name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")] = tmp_path / name
    found = {(e.target, e.deferred, e.line) for e in collect_imports(modules) if e.source == "pkg.sub.a"}
    # line 3: the own package `sub` is already importing, nothing to record; line 8 reads a name from it
    assert found == {("pkg.sub.b", False, 2), ("pkg.c", False, 3), ("pkg.other", False, 4), ("pkg.other.e", False, 4),
                     ("pkg.d", True, 6), ("pkg.sub", False, 8), ("pkg.d", True, 10), ("pkg.c", False, 12)}


# room -> the rooms it may import besides itself
ROOMS = {
    "cli": {"commands", "analysis", "core", "recipe", "adapters", "data", "base"},
    "commands": {"analysis", "core", "recipe", "adapters", "data", "base"},
    "analysis": {"core", "recipe", "adapters", "data", "base"},
    "core": {"recipe", "adapters", "data", "base"},
    "recipe": {"adapters", "data", "base"},
    "adapters": {"base"},
    "data": {"base"},
    "base": set(),
}


def room_of(module: str) -> str:
    """The room of a package module: its subpackage, ``cli`` / ``recipe``, or ``base`` for the small modules."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if parts[1] in ("commands", "analysis", "core", "adapters", "data", "recipe"):
        return parts[1]
    return "cli" if parts[1] in ("cli", "__main__") else "base"


def test_rooms_exist_and_top_level_holds_only_the_small_modules() -> None:
    modules = package_modules()
    for room in ("commands", "core", "analysis", "adapters", "data"):
        assert f"{PACKAGE}.{room}" in modules, room
    top = sorted(m.split(".")[1] for m in modules if m.count(".") == 1 and m.split(".")[1] not in ROOMS)
    assert top == ["__main__", "errors", "fsutil", "paths", "schema"], top
    stems = [m.rsplit(".", 1)[-1] for m in modules if not m.endswith("__init__")]
    repeated = sorted({s for s in stems if stems.count(s) > 1 and s != "__init__"})
    assert not repeated, f"two modules share a name: {repeated}"


def test_no_room_imports_a_room_above_it() -> None:
    imports = collect_imports(package_modules())
    upward = [e for e in imports if room_of(e.target) != room_of(e.source)
              and room_of(e.target) not in ROOMS[room_of(e.source)]]
    assert not upward, "imports against the direction cli -> commands -> analysis -> core -> recipe -> " \
        "adapters/data -> base:\n" + "\n".join(f"{e.source} line {e.line} imports {e.target}" for e in upward)


def test_no_import_cycles() -> None:
    modules = package_modules()
    assert f"{PACKAGE}.cli" in modules and f"{PACKAGE}.adapters.model" in modules, sorted(modules)
    imports = [e for e in collect_imports(modules) if not e.typing_only]
    cycles = find_cycles(_graph(imports))
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, imports) for c in cycles)
