"""The import graph of tpmpi (scripts/module_map.py, from the source; function-level imports
count too): no cycle anywhere, the subpackages' arrows one way (core <- layers <- checkpoint <-
models <- studies <- cli; the layer-agnostic reading of checkpoints below the layers, whose
``load_checkpoint`` classmethods call it), the core's own arrows one way, a cost model that
knows no benchmark module, no module importing the package itself, and imports at the top of
every studies module (no registration by a bottom import)."""
import ast

import pytest

from conftest import ROOT, load_script

module_map = load_script("module_map")
PACKAGE = ROOT / "tpmpi"
GRAPH = module_map.import_graph(PACKAGE)
MODULES = module_map.modules(PACKAGE)
# what runs and reports benchmarks
BENCHMARK_SIDE = {"tpmpi.studies.schemes", "tpmpi.studies.bench", "tpmpi.studies.collbench",
                  "tpmpi.studies.sweep", "tpmpi.studies.vsbare", "tpmpi.studies.progress",
                  "tpmpi.studies.report", "tpmpi.studies.plots", "tpmpi.studies.peak",
                  "tpmpi.cli"}
# the subpackages each part may import (besides itself and tpmpi._version)
MAY_IMPORT = {"core": set(), "layers": {"core"}, "checkpoint": {"core", "layers"},
              "models": {"core", "layers", "checkpoint"},
              "studies": {"core", "layers", "checkpoint", "models"},
              "cli": {"core", "layers", "checkpoint", "models", "studies"},
              "__main__": {"cli"}}
# the checkpoint module the layers may import besides: the reading behind Layer.load_checkpoint,
# which knows no layer class (test_the_reading_below_the_layers_knows_no_layer)
BELOW_LAYERS = "tpmpi.checkpoint.read"


def _top(name: str) -> str:
    """``tpmpi.studies.schemes.mlp`` -> ``studies``."""
    return name.split(".")[1] if "." in name else ""


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


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


def test_every_module_has_a_part():
    assert {_top(m) for m in MODULES} - {""} == set(MAY_IMPORT) | {"_version"}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _top(n) in MAY_IMPORT))
def test_subpackages_point_one_way(name):
    """core <- layers <- checkpoint <- models <- studies (the transformer schemes run the
    model, the planner prices its schedule); everything <- cli."""
    allowed = MAY_IMPORT[_top(name)] | {_top(name), "_version"}
    below = {BELOW_LAYERS} if _top(name) == "layers" else set()
    assert {m for m in GRAPH[name] if _top(m) not in allowed and m not in below} == set()


def test_the_reading_below_the_layers_knows_no_layer():
    assert [m for m in _reaches(BELOW_LAYERS) if _within(m, "tpmpi.layers")] == []


@pytest.mark.parametrize("low,high", [
    ("tpmpi.layers.base", "tpmpi.checkpoint.load"), ("tpmpi.layers.base", "tpmpi.checkpoint.save"),
    ("tpmpi.layers.mlp", "tpmpi.checkpoint.load"), ("tpmpi.checkpoint.read", "tpmpi.layers"),
    ("tpmpi.core.backend", "tpmpi.core.comm"), ("tpmpi.core.staging", "tpmpi.core.comm"),
    ("tpmpi.core.agreement", "tpmpi.core.backend"), ("tpmpi.core.partition", "tpmpi.core.layout"),
    ("tpmpi.core.grid", "tpmpi.layers"), ("tpmpi.layers", "tpmpi.studies"),
    ("tpmpi.core.layout", "tpmpi.core.mappings"), ("tpmpi.core.comm", "tpmpi.core.grid"),
    ("tpmpi.layers.base", "tpmpi.layers.data_parallel")])
def test_one_direction(low, high):
    """The core's arrows point one way: ``low`` never reaches ``high`` (or a module inside it),
    at any level."""
    assert not [m for m in _reaches(low) if _within(m, high)]


def test_the_cost_model_knows_no_benchmark_package():
    reached = _reaches("tpmpi.studies.costmodel")
    assert not {m for m in reached for side in BENCHMARK_SIDE if _within(m, side)}


def test_load_checkpoint_is_declared_by_the_layer_classes():
    """A classmethod written in the layers' source (what a reader and mypy see: the base
    class both kinds of module derive from), inherited by every layer and composite; its
    behaviour: test_checkpoint.py."""
    import inspect

    import tpmpi
    from tpmpi.layers import base, module

    declared = vars(module.Checkpointable)["load_checkpoint"]
    assert isinstance(declared, classmethod)
    assert inspect.getsourcefile(declared.__func__) == inspect.getsourcefile(module)
    for cls in (base.ParallelLinear, module.Composite, tpmpi.ColumnParallelLinear,
                tpmpi.RowParallelLinear, tpmpi.TileParallelLinear, tpmpi.ParallelMLP):
        assert cls.load_checkpoint.__func__ is declared.__func__


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _top(n) == "studies"))
def test_imports_stand_at_the_top(name):
    path = MODULES[name]
    seen_code = False
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            assert not seen_code, f"{path.name}:{node.lineno}: import below the module's code"
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            seen_code = True


def test_the_core_docstring_lists_its_dependency_levels():
    """Each core module sits one level above the highest core module it imports, as
    tpmpi/core/__init__.py says."""
    import re

    import tpmpi.core

    core = {m: [d for d in GRAPH[m] if _within(d, "tpmpi.core") and d != "tpmpi.core"]
            for m in GRAPH if m.startswith("tpmpi.core.")}
    level: dict = {}

    def depth(m: str) -> int:
        if m not in level:
            level[m] = 1 + max((depth(d) for d in core[m]), default=0)
        return level[m]

    documented = {f"tpmpi.core.{name}": int(n)
                  for n, names in re.findall(r"^(\d)\. (.*)$", tpmpi.core.__doc__, re.M)
                  for name in re.findall(r"``(\w+)``", names)}
    assert documented == {m: depth(m) for m in core}

