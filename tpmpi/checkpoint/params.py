"""The distributed parameters of a layer or composite, as a checkpoint sees them: name, this
rank's block, global shape, layout and grid (:class:`Param`), collected through the layers'
``children()`` protocol; the arrays of an optimizer's state that follow a parameter's layout
(:func:`state_params`); and the mesh a module is replicated over (:func:`unwrap`)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..core.agreement import Text
from ..core.dtypes import SUPPORTED, dtype_name
from ..core.grid import ProcessGrid
from ..core.layout import block_bounds
from ..core.mesh import Mesh, mesh_of
from ..layers.base import ParallelLinear
from ..layers.data_parallel import DataParallel
from ..layers.module import named_layers

STATE_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*$")
"""Names of state groups (``"adam.m"``): they become a directory of the checkpoint."""


@dataclass
class Param:
    """One distributed parameter: ``local`` is this rank's block of the global ``shape``."""

    name: str
    local: Any
    shape: tuple[int, ...]
    layout: str
    grid: ProcessGrid

    def bounds(self) -> tuple[tuple[int, int], ...]:
        return block_bounds(self.shape, self.grid.shape, self.grid.coords, self.layout)

    def is_writer(self) -> bool:
        """True on the lowest rank holding this rank's block (replicated blocks written once)."""
        mine, comm = self.bounds(), self.grid.comm
        return not any(block_bounds(self.shape, self.grid.shape, tuple(comm.Get_coords(q)),
                                    self.layout) == mine for q in range(self.grid.rank))


def layers_of(obj: Any) -> list[tuple[str, ParallelLinear]]:
    """The named leaf layers of a layer or composite (:func:`tpmpi.layers.named_layers`);
    ValueError unless every one is a ParallelLinear."""
    found = named_layers(obj)
    for name, layer in found:
        if not isinstance(layer, ParallelLinear):
            raise ValueError(f"{name or type(obj).__name__} is a {type(layer).__name__}: "
                             "expected a ParallelLinear (or a composite of them)")
    return found


def identities(obj: Any) -> Text:
    """The identities of the layers of ``obj`` (``"layer #0 (...)"``, ``"fc1=layer #0 (...),
    fc2=..."``): the same on every rank only for the same layer objects (agreed by save and
    by load into=)."""
    return Text(", ".join(f"{prefix}={layer.identity}" if prefix else layer.identity
                          for prefix, layer in layers_of(obj)))


def parameters(obj: Any) -> list[Param]:
    """Every distributed parameter of a layer or composite, named ``weight``, ``fc1.bias``..."""
    out = []
    for prefix, layer in layers_of(obj):
        local = {name: p for name, p, _ in layer.parameters()}
        for name, (shape, layout) in layer.parameter_layouts().items():
            out.append(Param(f"{prefix}.{name}" if prefix else name, local[name], shape, layout,
                             layer.grid))
    return out


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


def state_params(params: list[Param], state: Any) -> list[Param]:
    """The arrays of ``state`` (``{group: {parameter name: local array}}``, e.g. an Adam
    optimizer's ``{"adam.m": {"fc1.weight": m, ...}, "adam.v": {...}}``) as Params named
    ``state/<group>/<parameter>``, each with its parameter's global shape, layout and grid.
    ValueError naming the first group, parameter or array that does not fit. Local."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state is a {type(state).__name__}: expected a dict {{group: "
                         "{parameter name: array}}")
    by_name, out = {p.name: p for p in params}, []
    for group, arrays in state.items():
        if not isinstance(group, str) or not STATE_GROUP.match(group):
            raise ValueError(f"state group {group!r}: expected a name of letters, digits, "
                             "'_', '.' and '-'")
        if not isinstance(arrays, Mapping):
            raise ValueError(f"state[{group!r}] is a {type(arrays).__name__}: expected a dict "
                             "{parameter name: array}")
        for name, a in arrays.items():
            p = by_name.get(name)
            if p is None:
                raise ValueError(f"state[{group!r}][{name!r}]: no such parameter (expected one "
                                 f"of {', '.join(by_name)})")
            if type(a) is not type(p.local) or tuple(a.shape) != tuple(p.local.shape) or \
                    dtype_name(a.dtype) not in SUPPORTED:
                raise ValueError(
                    f"state[{group!r}][{name!r}] is a {type(a).__name__} of shape "
                    f"{tuple(getattr(a, 'shape', ()))} and dtype {getattr(a, 'dtype', None)}: "
                    f"expected a {type(p.local).__name__} of the parameter's local shape "
                    f"{tuple(p.local.shape)} and one of {', '.join(SUPPORTED)}")
            out.append(Param(f"state/{group}/{name}", a, p.shape, p.layout, p.grid))
    return out
