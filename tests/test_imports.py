"""The import graph of tpmpi (scripts/module_map.py, from the source; function-level imports
count too): no cycle anywhere, the core's arrows one way, a cost model that knows no benchmark
package, no module importing the package itself, and imports at the top of every studies
module (no registration by a bottom import)."""
import ast
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import module_map  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "tpmpi"
GRAPH = module_map.import_graph(PACKAGE)
MODULES = module_map.modules(PACKAGE)
STUDIES = {"timing", "costmodel", "collbench", "colltable", "bench", "overlap", "peak", "sweep",
           "stats", "vsbare", "progress", "report", "plots", "record", "problem", "schemes"}
# what runs and reports benchmarks (overlap is not here: DataParallel measures with it)
BENCHMARK_SIDE = {"schemes", "bench", "collbench", "sweep", "vsbare", "progress", "report",
                  "plots", "peak", "cli"}


def _top(name: str) -> str:
    """``tpmpi.schemes.mlp`` -> ``schemes``."""
    return name.split(".")[1] if "." in name else ""


def _reaches(start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_module_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\nfrom .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import b\n")
    graph = module_map.import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b": "function"}
    assert graph["pkg.b"] == {"pkg.a": "module", "pkg.sub.c": "module"}
    assert graph["pkg.sub.c"] == {"pkg.b": "module"}
    assert module_map.cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_no_import_cycle():
    assert module_map.cycles(GRAPH) == []


def test_no_module_imports_the_package_itself():
    """``__version__`` comes from tpmpi._version: importing ``tpmpi`` from inside it would
    depend on the package's __init__ (which imports nearly everything)."""
    assert [m for m, edges in GRAPH.items() if "tpmpi" in edges] == []


@pytest.mark.parametrize("low,high", [
    ("tpmpi.layers.base", "tpmpi.checkpoint"), ("tpmpi.layers.mlp", "tpmpi.checkpoint"),
    ("tpmpi.backend", "tpmpi.comm"), ("tpmpi.staging", "tpmpi.comm"),
    ("tpmpi.agreement", "tpmpi.backend"), ("tpmpi.partition", "tpmpi.layout"),
    ("tpmpi.grid", "tpmpi.layers"), ("tpmpi.layers", "tpmpi.schemes"),
    ("tpmpi.layout", "tpmpi.mappings"), ("tpmpi.comm", "tpmpi.grid")])
def test_one_direction(low, high):
    """The core's arrows point one way: ``low`` never reaches ``high``, at any level."""
    assert high not in _reaches(low)


def test_the_cost_model_knows_no_benchmark_package():
    assert not {m for m in _reaches("tpmpi.costmodel") if _top(m) in BENCHMARK_SIDE}


def test_checkpoint_attaches_load_checkpoint_to_every_module_class():
    import tpmpi

    for cls in (tpmpi.ColumnParallelLinear, tpmpi.RowParallelLinear, tpmpi.TileParallelLinear,
                tpmpi.ParallelMLP):
        assert callable(cls.load_checkpoint)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _top(n) in STUDIES))
def test_imports_stand_at_the_top(name):
    path = MODULES[name]
    seen_code = False
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert not seen_code, f"{path.name}:{node.lineno}: import below the module's code"
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            seen_code = True
