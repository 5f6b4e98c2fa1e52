"""The distributed parameters of a layer or composite, as a checkpoint sees them: name, this
rank's block, global shape, layout and grid (:class:`Param`), collected through the layers'
``children()`` protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.agreement import Text
from ..core.grid import ProcessGrid
from ..core.layout import block_bounds
from ..layers.base import ParallelLinear
from ..layers.module import named_layers


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
