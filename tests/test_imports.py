"""Import structure of the studies side (benchmarks, timing, cost model, reports): no cycle
through any of its modules (function-level imports count too), a cost model that knows no
benchmark package, and imports at the top of every module (no registration by a bottom
import)."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tpmpi"
STUDIES = {"timing", "costmodel", "collbench", "colltable", "bench", "overlap", "peak", "sweep",
           "stats", "vsbare", "progress", "report", "plots", "record", "problem", "schemes"}
# what runs and reports benchmarks (overlap is not here: DataParallel measures with it)
BENCHMARK_SIDE = {"schemes", "bench", "collbench", "sweep", "vsbare", "progress", "report",
                  "plots", "peak", "cli"}


def _modules() -> dict:
    """{dotted name relative to tpmpi ('' for the package): parsed module}."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def _graph(modules: dict) -> dict:
    """{module: set of tpmpi modules it imports anywhere in its code}."""
    graph = {}
    for name, (path, tree) in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}" if target else alias.name
                    deps.add(full if full in modules else target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names]
                deps |= {n[len("tpmpi."):] for n in names if n and n.startswith("tpmpi.")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def test_no_import_cycle_through_a_studies_module():
    bad = [sorted(c) for c in _cycles(_graph(_modules())) if {_top(m) for m in c} & STUDIES]
    assert not bad, bad


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_cost_model_knows_no_benchmark_package():
    graph = _graph(_modules())
    seen, todo = set(), ["costmodel"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert not {m for m in seen if _top(m) in BENCHMARK_SIDE}, sorted(seen)


@pytest.mark.parametrize("name", sorted(n for n in _modules() if _top(n) in STUDIES))
def test_imports_stand_at_the_top(name):
    path, tree = _modules()[name]
    seen_code = False
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert not seen_code, f"{path.name}:{node.lineno}: import below the module's code"
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            seen_code = True
