"""The package's module map from its source (ast, nothing imported): lines and tpmpi imports of
every module, import cycles, the largest functions.

    python scripts/module_map.py [--top N] [PACKAGE_DIR]

Imports count wherever they are written: at module level and inside functions (a function-level
import is still a dependency, only a deferred one); ``from . import x`` counts as importing the
submodule ``x`` when there is one, else the package. tests/test_imports.py asserts the direction
of the core with it.
"""
from __future__ import annotations

import argparse
import ast
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def modules(package: Path) -> dict[str, Path]:
    """``dotted name -> file`` of every module of the package at ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _target(name: str, node: ast.AST, is_package: bool) -> Iterator[str]:
    """The dotted names an import statement of module ``name`` refers to."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            here = here[:len(here) - node.level + 1]
            base = ".".join(here + ([node.module] if node.module else []))
        for alias in node.names:
            yield f"{base}.{alias.name}"


def _owner(target: str, known: dict[str, Path]) -> Optional[str]:
    """The module of ``known`` that ``target`` names (or an attribute of), if any."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def import_graph(package: Path) -> dict[str, dict[str, str]]:
    """``module -> {imported module: "module" | "function"}`` (the level of its first import)
    over the package's own modules."""
    known = modules(package)
    graph: dict[str, dict[str, str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        inner = {id(n) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
        edges: dict[str, str] = {}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            level = "function" if id(node) in inner else "module"
            for target in _target(name, node, path.name == "__init__.py"):
                owner = _owner(target, known)
                if owner and owner != name and edges.get(owner) != "module":
                    edges[owner] = level
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def functions(package: Path) -> list[tuple[int, str]]:
    """``(lines, "module:Class.function")`` of every function and method, largest first."""
    out = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((child.end_lineno - child.lineno + 1, f"{prefix}{child.name}"))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    for name, path in modules(package).items():
        walk(ast.parse(path.read_text()), f"{name}:")
    return sorted(out, reverse=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", nargs="?", default=str(ROOT / "tpmpi"))
    ap.add_argument("--top", type=int, default=15, help="largest functions shown")
    args = ap.parse_args(argv)
    package = Path(args.package)
    graph = import_graph(package)
    files = modules(package)
    lines = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    print("module                              lines  imports (* function-level only)")
    for name in sorted(graph):
        shown = ", ".join(t + ("*" if level == "function" else "")
                          for t, level in sorted(graph[name].items()))
        print(f"{name:34} {lines[name]:6}  {shown}")
    print(f"{sum(lines.values())} lines in {len(lines)} modules\n")
    found = cycles(graph)
    print(f"import cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    sizes = functions(package)
    print(f"\nlargest functions ({len(sizes)} in all, median "
          f"{statistics.median(n for n, _ in sizes)} lines):")
    for n, name in sizes[:args.top]:
        print(f"{n:6}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
