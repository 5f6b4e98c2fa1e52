"""Loading any layer or composite from a checkpoint: :func:`load_checkpoint`
(``tpmpi.load_checkpoint``), the reading of :mod:`tpmpi.checkpoint.read` over every tpmpi layer
class (and the ones a program defines), with the leaf layers found by :func:`layers_of` and a
:class:`~tpmpi.DataParallel` unwrapped to its module and mesh (:func:`unwrap`, which saving
shares). A layer class loads its own kind with its classmethod
(``ColumnParallelLinear.load_checkpoint``), which calls the same reading."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

from ..core.grid import ProcessGrid
from ..core.mesh import Mesh, mesh_of
from ..layers.base import ParallelLinear
from ..layers.data_parallel import DataParallel
from ..layers.leaf import ParameterLeaf
from ..layers.module import Composite, named_layers
from .read import read_checkpoint


def layers_of(obj: Any) -> list[tuple[str, Any]]:
    """The named leaf layers of a layer or composite (:func:`tpmpi.layers.named_layers`);
    ValueError unless every one is a ParallelLinear or a
    :class:`~tpmpi.layers.leaf.ParameterLeaf`."""
    found = named_layers(obj)
    for name, layer in found:
        if not isinstance(layer, (ParallelLinear, ParameterLeaf)):
            raise ValueError(f"{name or type(obj).__name__} is a {type(layer).__name__}: "
                             "expected a ParallelLinear or ParameterLeaf (or a composite of "
                             "them)")
    return found


def unwrap(module: Any) -> tuple[Any, Optional[Mesh]]:
    """``(the module, the mesh it is replicated over or None)``: a :class:`~tpmpi.DataParallel`
    gives its module and mesh; a module built on a mesh's TP grid (``mesh.tp``) that mesh."""
    if isinstance(module, DataParallel):
        return module.module, module.mesh
    try:
        layers = named_layers(module)
    except ValueError:
        return module, None  # not a module: the caller's checks say so on every rank
    return module, mesh_of(layers[0][1].grid)


def load_checkpoint(path: Union[str, os.PathLike[str]], grid: Optional[ProcessGrid] = None, *,
                    cls: Optional[type] = None, into: Any = None, verify: bool = True,
                    state: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    meta: Optional[dict] = None, **options: Any) -> Any:
    """The layer saved in ``path``, re-sharded onto ``grid`` (default: 1D over COMM_WORLD; any
    size and shape). ``cls`` requires the saved class; ``options`` override saved constructor
    options (``dtype`` casts; a cast that overflows raises). ``into``: read into an existing
    layer, composite or :class:`~tpmpi.DataParallel` instead (its grid is used; ``grid``, if
    given, must be it). ``verify`` recomputes the checksums of the files read.

    ``state`` (with ``into``): ``{group: {parameter name: local array}}`` filled in place from
    the saved state (:func:`tpmpi.save_checkpoint` ``state=``), each array of its parameter's
    local shape on this grid; ``meta``: a dict updated in place with the saved ``meta``.

    Collective: every argument agreed, the manifest checked on rank 0 and broadcast, each rank
    ``Read_at_all``s its block; errors are raised on every rank. Under a mesh (a DataParallel,
    or a grid that is ``mesh.tp``) every rank of the mesh calls it, each replica reads its
    blocks, and the outcome is agreed over the whole mesh
    (:func:`tpmpi.checkpoint.read.read_checkpoint`)."""
    mesh = None
    if into is not None:
        into, mesh = unwrap(into)
    return read_checkpoint(path, grid, roots=(ParallelLinear, Composite), leaves=layers_of,
                           cls=cls, into=into, verify=verify, options=options, state=state,
                           meta=meta, mesh=mesh)


def resume_training(path: Union[str, os.PathLike[str]], into: Any, *,
                    state: Optional[Mapping[str, Mapping[str, Any]]], program: str,
                    flags: Mapping[str, Any]) -> dict:
    """Load a training script's checkpoint into ``into`` and ``state``
    (:func:`load_checkpoint`) and return what ``program`` saved in its ``meta[program]``;
    ValueError naming the path when the checkpoint holds no such section, or naming the first
    of ``flags`` (``{name: this run's value}``, the names as ``--flag`` with dashes) whose saved
    value differs. Collective."""
    meta: dict = {}
    load_checkpoint(path, into=into, state=state, meta=meta)
    saved = meta.get(program)
    if not isinstance(saved, dict):
        raise ValueError(f"--resume {path}: not a {program}.py checkpoint (its meta has no "
                         f"{program!r})")
    for key, value in flags.items():
        if saved.get(key) != value:
            raise ValueError(f"--{key.replace('_', '-')}={value}: the checkpoint {path} was "
                             f"saved with {saved.get(key)}")
    return saved
