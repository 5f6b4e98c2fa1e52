"""The distributed parameters of a layer or composite, as a checkpoint sees them: name, this
rank's block, global shape, layout and grid (:class:`Param`), collected from its leaf layers
(``(name, layer)`` pairs, :func:`tpmpi.layers.named_layers`); no layer class is imported here."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.agreement import Text
from ..core.grid import ProcessGrid
from ..core.layout import block_bounds


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
