"""dglmm's internal import graph, read from the source with ``ast`` (nothing is imported).

    python benchmarks/import_graph.py            # one line per module: module -> imports
    python benchmarks/import_graph.py --external # also the third-party packages each imports

Every ``import`` / ``from ... import`` statement counts, at module level and inside functions
or classes; relative imports are resolved against the importing module's package.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module of dglmm, else to
``pkg``.  A module imported only inside functions is marked ``(lazy)``.  Python imports a
package's ``__init__`` before any of its modules; those implicit edges are not listed (an
explicit ``from . import x`` of a package attribute is).  ``tests/test_architecture.py``
checks the graph (acyclic, the layer rules of docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dglmm"


@dataclass
class ModuleImports:
    """The imports of one dglmm module.

    ``internal`` maps each imported dglmm module to True when some import of it is at module
    level (False: only inside functions); ``external`` does the same for top-level names of
    other packages (``dask``, ``numpy``, ...).  ``lines`` maps an imported name to the line
    numbers that import it, for messages.
    """

    name: str
    internal: dict[str, bool] = field(default_factory=dict)
    external: dict[str, bool] = field(default_factory=dict)
    lines: dict[str, list[int]] = field(default_factory=dict)


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the dglmm package: dotted name -> source file."""
    pkg = root / PACKAGE
    out = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _package_of(name: str, path: Path) -> str:
    """The package relative imports of module ``name`` resolve against."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve_from(node: ast.ImportFrom, name: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(name, path).split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, info: ModuleImports, path: Path, modules: dict[str, Path]):
        self.info, self.path, self.modules = info, path, modules
        self.depth = 0  # > 0 inside a function body

    def _visit_scope(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_scope

    def _add(self, target: str, lineno: int) -> None:
        top_level = self.depth == 0
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            # the longest dglmm module that is a prefix of the dotted target
            while target not in self.modules and "." in target:
                target = target.rpartition(".")[0]
            table = self.info.internal
        else:
            target = target.split(".")[0]
            table = self.info.external
        table[target] = table.get(target, False) or top_level
        self.info.lines.setdefault(target, []).append(lineno)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve_from(node, self.info.name, self.path)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.modules else base, node.lineno)


def import_graph(root: Path = ROOT) -> dict[str, ModuleImports]:
    """dglmm module name -> its imports (see :class:`ModuleImports`); self-edges dropped."""
    modules = module_names(root)
    graph = {}
    for name, path in modules.items():
        info = ModuleImports(name)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _Collector(info, path, modules).visit(tree)
        info.internal.pop(name, None)
        graph[name] = info
    return graph


def edges(graph: dict[str, ModuleImports]) -> dict[str, list[str]]:
    """module -> sorted dglmm modules it imports (the plain adjacency lists)."""
    return {name: sorted(info.internal) for name, info in graph.items()}


def find_cycle(adjacency: dict[str, list[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in adjacency.get(node, ()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(adjacency):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def format_graph(graph: dict[str, ModuleImports], external: bool = False) -> str:
    """One line per module, ``module -> a, b (lazy), ...``."""
    lines = []
    for name in sorted(graph):
        info = graph[name]
        table = dict(info.internal)
        if external:
            table.update(info.external)
        deps = [t if table[t] else f"{t} (lazy)" for t in sorted(table)]
        lines.append(f"{name} -> {', '.join(deps) if deps else '(nothing)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--external", action="store_true",
                        help="also list the third-party packages each module imports")
    args = parser.parse_args(argv)
    graph = import_graph()
    print(format_graph(graph, external=args.external))
    cycle = find_cycle(edges(graph))
    if cycle:
        print("import cycle: " + " -> ".join(cycle), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
