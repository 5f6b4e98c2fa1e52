"""The distributed parameters of a layer or composite, as a checkpoint sees them: name, this
rank's block, global shape, layout and grid (:class:`Param`), collected from its leaf layers
(``(name, layer)`` pairs, :func:`tpmpi.layers.named_layers`), and the arrays of an optimizer's
state that follow a parameter's layout (:func:`state_params`); no layer class is imported
here."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.agreement import Text
from ..core.dtypes import SUPPORTED, dtype_name
from ..core.grid import ProcessGrid
from ..core.layout import block_bounds

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


def identities(leaves: Sequence[tuple[str, Any]]) -> Text:
    """The identities of the leaf layers ``leaves`` (``"layer #0 (...)"``, ``"fc1=layer #0
    (...), fc2=..."``): the same on every rank only for the same layer objects (agreed by save
    and by load into=)."""
    return Text(", ".join(f"{prefix}={layer.identity}" if prefix else layer.identity
                          for prefix, layer in leaves))


def params_of(leaves: Sequence[tuple[str, Any]]) -> list[Param]:
    """Every distributed parameter of the leaf layers ``leaves``, named ``weight``,
    ``fc1.bias``... (from each layer's ``parameters()`` and ``parameter_layouts()``)."""
    out = []
    for prefix, layer in leaves:
        local = {name: p for name, p, _ in layer.parameters()}
        for name, (shape, layout) in layer.parameter_layouts().items():
            out.append(Param(f"{prefix}.{name}" if prefix else name, local[name], shape, layout,
                             layer.grid))
    return out


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
