"""The distributed parameters of a layer or composite, as a checkpoint sees them: name, this
rank's block, global shape, layout and grid (:class:`Param`), collected from its leaf layers
(``(name, layer)`` pairs, :func:`tpmpi.layers.named_layers`), and the arrays of an optimizer's
state that follow a parameter's layout (:func:`state_params`); no layer class is imported
here."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..core.agreement import Text
from ..core.dtypes import SUPPORTED, dtype_name
from ..core.grid import ProcessGrid
from ..core.layout import block_bounds

STATE_GROUP = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*$")
"""Names of state groups (``"adam.m"``): they become a directory of the checkpoint."""


Bounds = tuple[tuple[int, int], ...]
BLOCKS = "blocks"
"""The layout of a parameter whose blocks its layer places itself (``block_of``): e.g. the
attention's weights split by whole heads, which no block partition describes."""


@dataclass
class Param:
    """One distributed parameter: ``local`` is this rank's block of the global ``shape``, in
    ``layout`` on ``grid``, or (layout :data:`BLOCKS`) at ``block_of(rank)``."""

    name: str
    local: Any
    shape: tuple[int, ...]
    layout: str
    grid: ProcessGrid
    block_of: Optional[Callable[[int], Bounds]] = None

    def bounds_at(self, rank: int) -> Bounds:
        """``(start, stop)`` per axis of the block rank ``rank`` of the grid holds."""
        if self.block_of is not None:
            return self.block_of(rank)
        return block_bounds(self.shape, self.grid.shape, divmod(rank, self.grid.shape[1]),
                            self.layout)

    def bounds(self) -> Bounds:
        return self.bounds_at(self.grid.rank)

    def is_writer(self) -> bool:
        """True on the lowest rank holding this rank's block (replicated blocks written once)."""
        mine = self.bounds()
        return not any(self.bounds_at(q) == mine for q in range(self.grid.rank))


def identities(leaves: Sequence[tuple[str, Any]]) -> Text:
    """The identities of the leaf layers ``leaves`` (``"layer #0 (...)"``, ``"fc1=layer #0
    (...), fc2=..."``): the same on every rank only for the same layer objects (agreed by save
    and by load into=)."""
    return Text(", ".join(f"{prefix}={layer.identity}" if prefix else layer.identity
                          for prefix, layer in leaves))


def params_of(leaves: Sequence[tuple[str, Any]], grads: bool = False) -> list[Param]:
    """Every distributed parameter of the leaf layers ``leaves``, named ``weight``,
    ``fc1.bias``... (from each layer's ``parameters()`` and ``parameter_layouts()``, or from
    the ``parameter_blocks(grads)`` of a layer that places its blocks itself); with ``grads``
    the local gradients instead of the values, in the same places."""
    out = []
    for prefix, layer in leaves:
        def named(name: str, prefix: str = prefix) -> str:
            return f"{prefix}.{name}" if prefix else name

        placed = getattr(layer, "parameter_blocks", None)
        if placed is not None:
            out += [Param(named(name), local, shape, BLOCKS, layer.grid, block_of)
                    for name, local, shape, block_of in placed(grads)]
            continue
        local = {name: g if grads else p for name, p, g in layer.parameters()}
        for name, (shape, layout) in layer.parameter_layouts().items():
            out.append(Param(named(name), local[name], shape, layout, layer.grid))
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
            out.append(Param(f"state/{group}/{name}", a, p.shape, p.layout, p.grid,
                             p.block_of))
    return out


def state_by_piece(leaves: Sequence[tuple[str, Any]], state: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, dict[str, Any]]:
    """An optimizer's ``state`` keyed by the names of ``parameters()`` (``{"adamw.m":
    {"transformer.h.0.attn.c_attn.weight": m, ...}}``) keyed by the checkpoint's names instead:
    where a leaf of ``leaves`` saves a parameter in pieces (``blocks_of``, e.g. the fused QKV
    weight's ``.q``, ``.k`` and ``.v`` column blocks), views of the state array's pieces;
    other names pass as they are. Local."""
    out = {}
    for group, arrays in state.items():
        mapped = dict(arrays)
        for prefix, layer in leaves:
            cut = getattr(layer, "blocks_of", None)
            if cut is None:
                continue
            names = {attr: f"{prefix}.{attr}" if prefix else attr for attr in ("weight", "bias")}
            mine = {attr: mapped.pop(name) for attr, name in names.items() if name in mapped}
            mapped.update({f"{prefix}.{n}" if prefix else n: a for n, a in cut(mine).items()})
        out[group] = mapped
    return out
