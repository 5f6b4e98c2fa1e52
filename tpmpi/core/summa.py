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

from typing import Any, Callable, Optional

from .arrays import Array
from .backend import backend_of
from .comm import ibcast, ireduce, ireduce_scatter, reduce_scatter
from .layout import PARTIAL
from .mappings import DONE, GatherCols, Operator, Pending
from .partition import block_partition, block_range


class GatherPanel(GatherCols):
    """The K column blocks of a (rows, K) panel -> the whole panel on every rank, as per-rank
    copies that the local products consume (hence the reduce-scatter adjoint):
    ``allgather_blocks`` / ``iallgather_blocks`` (``Alltoallw`` into place). ``size`` is K."""


class ReduceScatterPanel(Operator):
    """Per-rank partial (rows, K) panels, packed (:meth:`pack`) -> this rank's (rows, k) K block
    of their sum: ``reduce_scatter`` / ``ireduce_scatter`` (``Reduce_scatter`` /
    ``Ireduce_scatter``). ``shape`` is the panel's (rows, K)."""

    op = "reduce_scatter"
    src, dst = PARTIAL, "cols"
    allocates = True

    def pack(self, shape: tuple[int, int], xp: Any, dtype: Any) -> tuple[Array, list[Array]]:
        """A packed panel of ``shape`` (rows, K) and the (rows, k_j) view of every rank's K block
        in it, in rank order: write each block's partial sums into its view."""
        rows, k = shape
        packed = xp.empty(rows * k, dtype=dtype)
        return packed, [packed[rows * a: rows * b].reshape(rows, b - a)
                        for a, b in block_partition(k, self.size)]

    def out(self, x: Array, shape: Any = None) -> Array:
        assert shape is not None  # the panel's (rows, K)
        rows, k = shape
        if self.size == 1:
            return x.reshape(rows, k)
        a, b = block_range(k, self.size, self.rank)
        return backend_of(x).xp.empty((rows, b - a), dtype=x.dtype)

    def counts(self, shape: tuple[int, int]) -> list[int]:
        """Elements of every rank's K block of a (rows, K) panel."""
        return [shape[0] * (b - a) for a, b in block_partition(shape[1], self.size)]

    def __call__(self, x: Array, shape: Any = None) -> Array:
        out = self.out(x, shape)
        if self.size > 1:
            assert shape is not None
            with self._blocked(x.nbytes):
                reduce_scatter(x, out, self.counts(shape), self.comm, self.staging)
        return out

    def during(self, x: Array, work: Callable[[], Any], shape: Any = None) -> Array:
        out = self.out(x, shape)
        if self.size == 1:
            work()
            return out
        assert shape is not None
        counts = self.counts(shape)
        self._during(x.nbytes, work, lambda: ireduce_scatter(x, out, counts, self.comm),
                     lambda: reduce_scatter(x, out, counts, self.comm, self.staging))
        return out

    def start(self, x: Array, shape: Any = None, out: Optional[Array] = None) -> Pending:
        out = self.out(x, shape) if out is None else out
        if self.size == 1:
            return DONE
        counts = self.counts(shape)
        return self._start(x.nbytes, lambda: ireduce_scatter(x, out, counts, self.comm),
                           lambda: reduce_scatter(x, out, counts, self.comm, self.staging))


class BroadcastPiece(Operator):
    """The root's C-contiguous piece -> every rank, in place: ``ibcast`` (``Ibcast``; under
    host staging it runs blocking). ``root`` (a rank of the communicator) is given per call:
    the owner of each K segment differs."""

    op = "bcast"
    src, dst = "owned", "replicated"

    def out(self, x: Array, root: Any = None) -> Array:
        return x

    def __call__(self, x: Array, root: Any = None) -> Array:
        if self.size > 1:
            with self._blocked(x.nbytes):
                ibcast(x, int(root or 0), self.comm, self.staging).Wait()
        return x

    def during(self, x: Array, work: Callable[[], Any], root: Any = None) -> Array:
        if self.size == 1:
            work()
            return x
        owner = int(root or 0)
        self._during(x.nbytes, work, lambda: ibcast(x, owner, self.comm, self.staging),
                     lambda: ibcast(x, owner, self.comm, self.staging).Wait())
        return x

    def start(self, x: Array, root: Any = None, out: Optional[Array] = None) -> Pending:
        if self.size == 1:
            return DONE
        owner = int(root or 0)
        return self._start(x.nbytes, lambda: ibcast(x, owner, self.comm, self.staging),
                           lambda: ibcast(x, owner, self.comm, self.staging).Wait())


class ReduceToOwner(Operator):
    """Per-rank pieces -> their sum on ``root``: ``ireduce`` (``Ireduce``; the exchange of
    slices and ``Gatherv`` for 2-byte floats; under host staging it runs blocking). The result
    is a new array on the root, None on the other ranks (``x`` itself on one rank)."""

    op = "reduce"
    src, dst = PARTIAL, "owned"
    allocates = True

    def out(self, x: Array, root: Any = None) -> Any:
        if self.size == 1:
            return x
        return backend_of(x).xp.empty_like(x) if self.rank == root else None

    def __call__(self, x: Array, root: Any = None) -> Any:
        out = self.out(x, root)
        if self.size > 1:
            with self._blocked(x.nbytes):
                ireduce(x, out, int(root or 0), self.comm, self.staging).Wait()
        return out

    def during(self, x: Array, work: Callable[[], Any], root: Any = None) -> Any:
        out = self.out(x, root)
        if self.size == 1:
            work()
            return out
        owner = int(root or 0)
        self._during(x.nbytes, work, lambda: ireduce(x, out, owner, self.comm, self.staging),
                     lambda: ireduce(x, out, owner, self.comm, self.staging).Wait())
        return out

    def start(self, x: Array, root: Any = None, out: Optional[Array] = None) -> Pending:
        if self.size == 1:
            return DONE
        owner = int(root or 0)
        return self._start(x.nbytes, lambda: ireduce(x, out, owner, self.comm, self.staging),
                           lambda: ireduce(x, out, owner, self.comm, self.staging).Wait())


GatherPanel.adjoint_class, ReduceScatterPanel.adjoint_class = ReduceScatterPanel, GatherPanel
BroadcastPiece.adjoint_class, ReduceToOwner.adjoint_class = ReduceToOwner, BroadcastPiece

SUMMA = (GatherPanel, ReduceScatterPanel, BroadcastPiece, ReduceToOwner)
