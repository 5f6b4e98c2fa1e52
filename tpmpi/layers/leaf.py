"""Leaf modules that hold parameters without being linear layers: LayerNorm, the embeddings and
the attention's projections, whose blocks are placed by whole heads or vocabulary rows rather
than by a layout's block partition.

A :class:`ParameterLeaf` holds ``weight`` and optionally ``bias`` (this rank's blocks) with
``grad_weight`` / ``grad_bias`` beside them, which is all that the module protocol
(:mod:`tpmpi.layers.module`), :class:`~tpmpi.DataParallel` (which replaces the gradient arrays
by views into its buckets, so a leaf always reads them from the attributes) and checkpoints
need. Where each rank's block lies in the global array is a :class:`Placement`: the global
shape and ``bounds(rank)``; a parameter may be saved in several pieces
(:meth:`ParameterLeaf.pieces`, e.g. the Q, K and V column blocks of a fused weight), each a
contiguous box of its own global array, so that a checkpoint (:mod:`tpmpi.checkpoint`) writes
and reads every rank's block with one MPI-IO view and loads it at any other TP size.
The computations are the owning module's (the leaf has no forward): it builds the leaf with
the blocks and the module's grid, backend and dtype.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any, Callable, Optional

from ..core.arrays import Array
from ..core.backend import Backend
from ..core.grid import ProcessGrid
from ..core.mappings import AllReduce, Operator
from .module import LeafModule

Bounds = tuple[tuple[int, int], ...]
_LEAVES: weakref.WeakKeyDictionary[ProcessGrid, int] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Placement:
    """A global array of ``shape`` whose block on rank ``r`` of the group is ``bounds(r)``
    (``(start, stop)`` per axis; ranks may hold the same block, or an empty one)."""

    shape: tuple[int, ...]
    bounds: Callable[[int], Bounds]

    @classmethod
    def replicated(cls, shape: tuple[int, ...]) -> Placement:
        """Every rank holds the whole array."""
        whole = tuple((0, int(n)) for n in shape)
        return cls(tuple(int(n) for n in shape), lambda _: whole)


Piece = tuple[str, str, slice, Placement]
"""``(name, attribute, columns of the local array, placement)`` of one saved piece: the
columns ``[slice]`` (the last axis) of ``attribute`` ("weight" or "bias") are the block of
the global array ``placement``."""


class ParameterLeaf(LeafModule):
    """``weight`` (and ``bias`` or None): this rank's blocks, C-contiguous, with gradients of the
    same shapes; ``pieces`` says where they lie (default: ``weight`` and ``bias`` whole at
    their ``placements``). ``kind`` names the leaf in its :attr:`identity` (``"layer #3
    (LayerNorm 64)"``), the same on every rank for the same leaf. No communication."""

    def __init__(self, grid: ProcessGrid, backend: Backend, kind: str, weight: Array,
                 bias: Optional[Array], placements: dict[str, Placement],
                 pieces: Optional[list[Piece]] = None) -> None:
        self.grid, self.comm, self.backend = grid, grid.comm, backend
        number = _LEAVES.get(grid, 0)
        _LEAVES[grid] = number + 1
        self.identity = f"leaf #{number} ({kind})"
        self.weight, self.bias = weight, bias
        xp = backend.xp
        self.grad_weight = xp.zeros_like(weight)
        self.grad_bias = xp.zeros_like(bias) if bias is not None else None
        self.placements = placements
        # this backward's share of the gradients when they are summed over the group after it
        # (set by PartialGrads under sequence parallelism), else None: accumulate directly
        self.partial_weight: Optional[Array] = None
        self.partial_bias: Optional[Array] = None
        self._pieces = pieces if pieces is not None else [
            (name, name, slice(None), placements[name]) for name in ("weight", "bias")
            if getattr(self, name) is not None]

    def accumulate(self, dweight: Array, dbias: Optional[Array]) -> None:
        """Add one backward's gradients: to ``grad_weight`` / ``grad_bias``, or to the partial
        buffers that :class:`PartialGrads` sums over the group first."""
        if self.partial_weight is not None:
            self.partial_weight += dweight
        else:
            self.grad_weight += dweight
        if dbias is not None:
            if self.partial_bias is not None:
                self.partial_bias += dbias
            else:
                assert self.grad_bias is not None
                self.grad_bias += dbias

    def operators(self) -> dict[str, Operator]:
        """The leaf's communication operators by attribute name (none for a plain holder)."""
        return {name: op for name, op in vars(self).items() if isinstance(op, Operator)}

    def parameter_blocks(self, grads: bool = False
                         ) -> list[tuple[str, Array, tuple[int, ...], Callable[[int], Bounds]]]:
        """``(name, local block, global shape, bounds of rank r)`` of every saved piece
        (:func:`tpmpi.checkpoint.params.params_of`), the values or with ``grads`` the gradients
        (views of the current arrays)."""
        out = []
        for name, attr, cols, placement in self._pieces:
            local = getattr(self, f"grad_{attr}" if grads else attr)
            out.append((name, local[..., cols], placement.shape, placement.bounds))
        return out

    def blocks_of(self, arrays: dict[str, Array]) -> dict[str, Array]:
        """``{piece name: view}`` of arrays shaped like ``weight`` / ``bias`` (keyed by those
        names, e.g. an optimizer's moments), cut into the saved pieces as
        :meth:`parameter_blocks` cuts the parameters."""
        return {name: arrays[attr][..., cols] for name, attr, cols, _ in self._pieces
                if attr in arrays}


class PartialGrads:
    """The gradients of parameters replicated over a TP group whose every rank computes only a
    share (under sequence parallelism each rank holds its token rows: LayerNorm weights, the
    position embedding). Each leaf's ``partial_weight`` / ``partial_bias`` become views into one
    flat buffer; :meth:`start` zeroes it before a backward, :meth:`finish` sums it over the
    group with one Allreduce (``sum_shares``) and adds it to the gradients -- once per backward,
    so accumulated gradients are never summed twice. Collective in :meth:`finish`."""

    def __init__(self, leaves: Sequence[ParameterLeaf], comm: Any, staging: Any) -> None:
        self.leaves = leaves
        xp = leaves[0].backend.xp
        sizes = [leaf.grad_weight.size + (leaf.grad_bias.size if leaf.grad_bias is not None
                                          else 0) for leaf in leaves]
        self.buffer = xp.zeros(sum(sizes), dtype=leaves[0].grad_weight.dtype)
        offset = 0
        for leaf in leaves:
            for attr in ("weight", "bias"):
                grad = getattr(leaf, f"grad_{attr}")
                if grad is None:
                    continue
                view = self.buffer[offset:offset + grad.size].reshape(grad.shape)
                setattr(leaf, f"partial_{attr}", view)
                offset += grad.size
        self.sum_shares = AllReduce(comm, staging)

    def start(self) -> None:
        """Zero the shares (before a backward)."""
        self.buffer[...] = 0

    def finish(self) -> None:
        """Sum the shares over the group [Allreduce] and add them to the gradients."""
        self.sum_shares(self.buffer)
        for leaf in self.leaves:
            leaf.grad_weight += leaf.partial_weight
            if leaf.grad_bias is not None:
                leaf.grad_bias += leaf.partial_bias
