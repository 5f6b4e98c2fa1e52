"""The import graph of tpmpi (scripts/module_map.py, from the source): no cycles, one direction."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import module_map  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "tpmpi"
GRAPH = module_map.import_graph(PACKAGE)

# The benchmark package's registration cycle is the studies side's (issue 14, phase 1): remove
# this allowance when its change lands.
ALLOWED = [c for c in module_map.cycles(GRAPH) if all(m.startswith("tpmpi.schemes") for m in c)]


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
    assert [c for c in module_map.cycles(GRAPH) if c not in ALLOWED] == []


def test_no_module_imports_the_package_itself():
    """``__version__`` comes from tpmpi._version: importing ``tpmpi`` from inside it would
    depend on the package's __init__ (which imports nearly everything)."""
    assert [m for m, edges in GRAPH.items() if "tpmpi" in edges] == []


def _reaches(start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("low,high", [
    ("tpmpi.layers.base", "tpmpi.checkpoint"), ("tpmpi.layers.mlp", "tpmpi.checkpoint"),
    ("tpmpi.backend", "tpmpi.comm"), ("tpmpi.staging", "tpmpi.comm"),
    ("tpmpi.agreement", "tpmpi.backend"), ("tpmpi.partition", "tpmpi.layout"),
    ("tpmpi.grid", "tpmpi.layers"), ("tpmpi.layers", "tpmpi.schemes"),
    ("tpmpi.layout", "tpmpi.mappings"), ("tpmpi.comm", "tpmpi.grid")])
def test_one_direction(low, high):
    """The core's arrows point one way: ``low`` never reaches ``high``, at any level."""
    assert high not in _reaches(low)


def test_checkpoint_attaches_load_checkpoint_to_every_module_class():
    import tpmpi

    for cls in (tpmpi.ColumnParallelLinear, tpmpi.RowParallelLinear, tpmpi.TileParallelLinear,
                tpmpi.ParallelMLP):
        assert callable(cls.load_checkpoint)
