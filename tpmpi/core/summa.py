"""The communication operators of the SUMMA tile scheme (:class:`tpmpi.TileParallelLinear`), in
adjoint pairs like those of :mod:`tpmpi.core.mappings` (and executed the same way: ``op(x,
...)`` blocking, ``op.during(x, work, ...)``, ``op.start(x, ...)``).

On a ``pr x pc`` grid, tile ``Y[r, c]`` needs the X row panel ``r`` (m_r, K), whose K blocks
live on the ranks of ``row_comm``, and the W column panel ``c`` (K, n_c), whose K blocks live
on the ranks of ``col_comm``:

==================  ======================================  ==================  ==============
operator            forward                                 adjoint             op
==================  ======================================  ==================  ==============
GatherPanel         K column blocks (layout "cols") -> the  ReduceScatterPanel  allgather
                    whole (m_r, K) panel on every rank
ReduceScatterPanel  per-rank partial (m_r, K) panels,       GatherPanel         reduce_scatter
                    packed K block by K block -> own
                    (m_r, k) block of their sum
BroadcastPiece      the root's piece -> every rank (in      ReduceToOwner       bcast
                    place)
ReduceToOwner       per-rank pieces -> their sum on the     BroadcastPiece      reduce
                    root (a new array there, None
                    elsewhere)
==================  ======================================  ==================  ==============

The W panel's K blocks are row blocks, so its gather and reduce-scatter are
:class:`~tpmpi.core.mappings.GatherRows` and :class:`~tpmpi.core.mappings.ReduceScatterRows`
on ``col_comm``, and the bias gradient is an :class:`~tpmpi.core.mappings.AllReduce` over
``col_comm``. The gather form uses the panel gathers forward and their reduce-scatter adjoints
backward; the panel form (level 2) broadcasts each K segment from its owner and reduces the
gradient pieces back to it. A panel is reduce-scattered *packed* (:meth:`ReduceScatterPanel.
pack`: block j is a C-contiguous (rows, k_j) array, the blocks one after another), because the
column blocks of a C-ordered panel are strided: the backward writes each block's product
straight into its place, no packing copy. tests/test_mappings.py checks the pairs with
dot-product tests.
"""
from __future__ import annotations

from typing import Any, Optional

from .arrays import Array
from .backend import backend_of
from .comm import ibcast, ireduce
from .layout import PARTIAL
from .mappings import DONE, GatherCols, Operator, Pending, ReduceScatterRows
from .partition import block_partition, block_range


class GatherPanel(GatherCols):
    """The K column blocks of a (rows, K) panel -> the whole panel on every rank, as per-rank
    copies that the local products consume (hence the reduce-scatter adjoint):
    ``allgather_blocks`` / ``iallgather_blocks`` (``Alltoallw`` into place). ``size`` is K."""


class ReduceScatterPanel(ReduceScatterRows):
    """Per-rank partial (rows, K) panels, packed (:meth:`pack`) -> this rank's (rows, k) K block
    of their sum: ``reduce_scatter`` / ``ireduce_scatter`` (``Reduce_scatter`` /
    ``Ireduce_scatter``) of the packed panel, whose K blocks are one after another as the row
    blocks of :class:`~tpmpi.core.mappings.ReduceScatterRows` are. ``size`` is the panel's
    (rows, K)."""

    dst = "cols"

    def pack(self, shape: tuple[int, int], xp: Any, dtype: Any) -> tuple[Array, list[Array]]:
        """A packed panel of ``shape`` (rows, K) and the (rows, k_j) view of every rank's K block
        in it, in rank order: write each block's partial sums into its view."""
        rows, k = shape
        packed = xp.empty(rows * k, dtype=dtype)
        return packed, [packed[rows * a: rows * b].reshape(rows, b - a)
                        for a, b in block_partition(k, self.size)]

    def out(self, x: Array, size: Any = None) -> Array:
        rows, k = size
        if self.size == 1:
            return x.reshape(rows, k)
        a, b = block_range(k, self.size, self.rank)
        return backend_of(x).xp.empty((rows, b - a), dtype=x.dtype)

    def counts(self, x: Array, size: Any = None) -> list[int]:
        """Elements of every rank's K block of a (rows, K) panel ``size``."""
        return [size[0] * (b - a) for a, b in block_partition(size[1], self.size)]


class BroadcastPiece(Operator):
    """The root's C-contiguous piece -> every rank, in place: ``ibcast`` (``Ibcast``; under
    host staging it runs blocking). ``root`` (a rank of the communicator) is given per call:
    the owner of each K segment differs."""

    op = "bcast"
    src, dst = "owned", "replicated"

    def __call__(self, x: Array, root: Any = None) -> Array:
        if self.size > 1:
            with self._blocked(x.nbytes):
                ibcast(x, int(root or 0), self.comm, self.staging).Wait()
        return x

    def start(self, x: Array, root: Any = None, out: Optional[Array] = None) -> Pending:
        owner = int(root or 0)
        return DONE if self.size == 1 else self._start(
            x.nbytes, lambda: ibcast(x, owner, self.comm, self.staging),
            lambda: ibcast(x, owner, self.comm, self.staging).Wait())


class ReduceToOwner(Operator):
    """Per-rank pieces -> their sum on ``root``: ``ireduce`` (``Ireduce``; the exchange of
    slices and ``Gatherv`` for 2-byte floats; under host staging it runs blocking). The result
    is a new array on the root, None on the other ranks (``x`` itself on one rank)."""

    op = "reduce"
    src, dst = PARTIAL, "owned"
    allocates = True

    def _new(self, x: Array, size: Any) -> Any:
        return backend_of(x).xp.empty_like(x) if self.rank == size else None

    def __call__(self, x: Array, root: Any = None) -> Any:
        out = self.out(x, root)
        if self.size > 1:
            with self._blocked(x.nbytes):
                ireduce(x, out, int(root or 0), self.comm, self.staging).Wait()
        return out

    def start(self, x: Array, root: Any = None, out: Optional[Array] = None) -> Pending:
        owner = int(root or 0)
        return DONE if self.size == 1 else self._start(
            x.nbytes, lambda: ireduce(x, out, owner, self.comm, self.staging),
            lambda: ireduce(x, out, owner, self.comm, self.staging).Wait())


GatherPanel.adjoint_class, ReduceScatterPanel.adjoint_class = ReduceScatterPanel, GatherPanel
BroadcastPiece.adjoint_class, ReduceToOwner.adjoint_class = ReduceToOwner, BroadcastPiece

SUMMA = (GatherPanel, ReduceScatterPanel, BroadcastPiece, ReduceToOwner)
