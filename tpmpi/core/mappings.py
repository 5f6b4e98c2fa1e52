"""Paired communication operators of tensor and sequence parallelism (Megatron's
``mappings.py``, PyTorch DTensor's redistributions), each with its adjoint.

A parallel linear layer is ``input mapping -> local GEMM -> output mapping``; its backward
applies the adjoints in reverse order. Two kinds of distributed array meet here:

* *replicated*: the same array on every rank of the group, one logical value (its inner product
  is counted once);
* *per-rank*: one array per rank -- partial sums, row or column blocks, or copies that
  per-rank computations will consume (the inner product is the sum over ranks).

=====================  ===============================  ==========================  =========
operator (layouts)     forward                          adjoint (backward)          op
=====================  ===============================  ==========================  =========
Copy                   identity: replicated -> per-rank AllReduce                   --
(replicated ->
replicated)
AllReduce              sum of per-rank partials         Copy                        allreduce
(partial -> replicated) -> replicated
GatherRows             row blocks -> all rows on every  ReduceScatterRows           allgather
(rows -> replicated)   rank (per-rank copies)
ReduceScatterRows      per-rank partial sums -> row     GatherRows                  reduce_scatter
(partial -> rows)      blocks of the sum
GatherCols             column blocks -> replicated      SplitCols                   allgather
(cols -> replicated)
SplitCols              replicated -> own column block   GatherCols                  --
(replicated -> cols)   (a view, no communication)
=====================  ===============================  ==========================  =========

Each operator is thus named by the pair of layouts (:mod:`tpmpi.core.layout`; ``partial`` is
:data:`tpmpi.core.layout.PARTIAL`) it maps between: :func:`between` picks it, which is how a layer's
declared layouts (:class:`tpmpi.core.layout.LinearLayouts`) become its communication.

Blocks follow the block partition of :mod:`tpmpi.core.partition` in rank order (uneven and empty
blocks allowed). The layers compose them (``ColumnParallelLinear``: Copy or GatherRows in,
GatherCols out when gathering; ``RowParallelLinear``: SplitCols in unless the input is
parallel, AllReduce or ReduceScatterRows out), and so the FFN modes of
:class:`tpmpi.ParallelMLP` are:

* megatron: Copy -> fc1 -> act -> fc2 -> AllReduce (Megatron's f and g);
* book:     Copy -> fc1 -> GatherCols -> act -> Copy -> fc2 -> GatherCols;
* sequence: GatherRows -> fc1 -> act -> fc2 -> ReduceScatterRows (Megatron's sequence
  parallelism: activations outside the GEMMs stay split by rows).

Every operator has a blocking :meth:`Mapping.forward` and a non-blocking :meth:`Mapping.start`
(which, under host staging of device buffers, runs the blocking form and returns a completed
request, so callers have one code path). ``out(x, size)`` allocates (or, for the operators that
communicate nothing or work in place, returns) the result array, so callers own it before the
collective starts. tests/test_mappings.py checks every pair with dot-product tests.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

from mpi4py import MPI

from .backend import backend_of
from .arrays import Array
from .comm import Request, Staging, allgather_blocks, allreduce, iallgather_blocks, iallreduce, \
    ireduce_scatter, reduce_scatter
from .layout import PARTIAL, blocks
from .partition import block_range


class Mapping:
    """A communication operator over ``comm`` (see the module docstring) from layout ``src``
    to layout ``dst``. ``op`` names the collective of :meth:`forward` (None: no
    communication), as the profiler and the cost model count it; ``allocates``: the result is
    a new array (else ``x`` itself or a view of it)."""

    op: ClassVar[Optional[str]] = None
    src: ClassVar[str]
    dst: ClassVar[str]
    allocates: ClassVar[bool] = False
    adjoint_class: ClassVar[type[Mapping]]

    def __init__(self, comm: MPI.Comm, staging: Optional[Staging] = None) -> None:
        self.comm = comm
        self.staging = staging

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.comm.Get_size()})"

    @property
    def adjoint(self) -> Mapping:
        """The adjoint operator (the backward of this one) on the same communicator."""
        return self.adjoint_class(self.comm, self.staging)

    def out(self, x: Array, size: Optional[int] = None) -> Array:
        """The result array of applying this operator to ``x`` (allocated, not yet filled, for
        the operators that communicate into a new array). ``size`` is the global length of the
        gathered axis (GatherRows: rows, GatherCols: columns)."""
        return x

    def nbytes(self, x: Array, out: Array) -> int:
        """The nccl-tests size ``S`` of the collective (0 when there is none)."""
        return 0

    def forward(self, x: Array, out: Array) -> Array:
        """Apply the operator, blocking; returns ``out``. Collective when ``op`` is set."""
        return out

    def start(self, x: Array, out: Array) -> Request:
        """Non-blocking :meth:`forward`: ``out`` is final after ``Wait()`` on the returned
        request; ``x`` and ``out`` must stay untouched until then."""
        self.forward(x, out)
        return MPI.REQUEST_NULL

    def _direct(self) -> bool:
        """Whether MPI may use the arrays themselves (stream synchronised first)."""
        return self.staging is None or self.staging.direct()


class Copy(Mapping):
    """Identity on data: a replicated array becomes each rank's input (Megatron's ``f``)."""

    src, dst = "replicated", "replicated"


class AllReduce(Mapping):
    """In-place sum of per-rank partial sums into a replicated array (Megatron's ``g``)."""

    op = "allreduce"
    src, dst = PARTIAL, "replicated"

    def nbytes(self, x: Array, out: Array) -> int:
        return int(x.nbytes)

    def forward(self, x: Array, out: Array) -> Array:
        allreduce(out, self.comm, self.staging)
        return out

    def start(self, x: Array, out: Array) -> Request:
        if self._direct():
            return iallreduce(out, self.comm)
        return super().start(x, out)


class _Collective(Mapping):
    """An operator whose result is a new array filled by one collective (``_run``), skipped
    when there is nothing to move (one rank: the result is ``x`` itself)."""

    def _run(self, x: Array, out: Array, blocking: bool) -> Any:  # pragma: no cover - abstract
        """Start (``blocking=False``: returns the request) or run the collective."""
        raise NotImplementedError

    def forward(self, x: Array, out: Array) -> Array:
        if out is not x:
            self._run(x, out, True)
        return out

    def start(self, x: Array, out: Array) -> Request:
        if out is not x and self._direct():
            return self._run(x, out, False)
        return super().start(x, out)


class _Gather(_Collective):
    """An Allgather of blocks straight into their places of the result (``Alltoallw`` with
    subarray types, :func:`tpmpi.core.comm.allgather_blocks`) of the blocks of layout ``src``."""

    op = "allgather"
    dst = "replicated"
    allocates = True

    def blocks(self, out: Array) -> list[tuple[tuple, tuple]]:
        """``(starts, shape)`` of every rank's block of ``out`` in layout ``src``."""
        return blocks(out.shape, (1, self.comm.Get_size()), self.src)

    def nbytes(self, x: Array, out: Array) -> int:
        return int(out.nbytes)

    def _run(self, x: Array, out: Array, blocking: bool) -> Any:
        if blocking:
            return allgather_blocks(x, out, self.blocks(out), self.comm, self.staging)
        return iallgather_blocks(x, out, self.blocks(out), self.comm)


class GatherRows(_Gather):
    """Allgather of row blocks (layout "rows") into all rows on every rank."""

    src = "rows"

    def out(self, x: Array, size: Optional[int] = None) -> Array:
        if self.comm.Get_size() == 1:
            return x
        return backend_of(x).xp.empty((size,) + tuple(x.shape[1:]), dtype=x.dtype)


class ReduceScatterRows(_Collective):
    """Sum of per-rank (M, ...) partials, each rank keeping its row block (layout "rows")."""

    op = "reduce_scatter"
    src, dst = PARTIAL, "rows"
    allocates = True

    def out(self, x: Array, size: Optional[int] = None) -> Array:
        if self.comm.Get_size() == 1:
            return x
        a, b = block_range(x.shape[0], self.comm.Get_size(), self.comm.Get_rank())
        return backend_of(x).xp.empty((b - a,) + tuple(x.shape[1:]), dtype=x.dtype)

    def nbytes(self, x: Array, out: Array) -> int:
        return int(x.nbytes)

    def _run(self, x: Array, out: Array, blocking: bool) -> Any:
        counts = [math.prod(shape) for _, shape in blocks(x.shape, (1, self.comm.Get_size()),
                                                          self.dst)]
        if blocking:
            return reduce_scatter(x, out, counts, self.comm, self.staging)
        return ireduce_scatter(x, out, counts, self.comm)


class GatherCols(_Gather):
    """Allgather of column blocks (layout "cols") into the replicated array, each block
    written straight into its strided place (no staging copy)."""

    src = "cols"

    def out(self, x: Array, size: Optional[int] = None) -> Array:
        if self.comm.Get_size() == 1:
            return x
        return backend_of(x).xp.empty((x.shape[0], size), dtype=x.dtype)


class SplitCols(Mapping):
    """This rank's column block of a replicated array: a strided view, no communication."""

    src, dst = "replicated", "cols"

    def out(self, x: Array, size: Optional[int] = None) -> Array:
        a, b = block_range(x.shape[1], self.comm.Get_size(), self.comm.Get_rank())
        return x[:, a:b]


Copy.adjoint_class, AllReduce.adjoint_class = AllReduce, Copy
GatherRows.adjoint_class, ReduceScatterRows.adjoint_class = ReduceScatterRows, GatherRows
GatherCols.adjoint_class, SplitCols.adjoint_class = SplitCols, GatherCols

MAPPINGS = (Copy, AllReduce, GatherRows, ReduceScatterRows, GatherCols, SplitCols)
_BY_LAYOUTS = {(m.src, m.dst): m for m in MAPPINGS}


def mapping_class(src: str, dst: str) -> Optional[type[Mapping]]:
    """The operator class from layout ``src`` to ``dst``; None when an array keeps its blocks
    (``src == dst``, other than replicated: no operator). ValueError for a pair that no
    operator maps."""
    if src == dst and src != "replicated":
        return None
    try:
        return _BY_LAYOUTS[src, dst]
    except KeyError:
        raise ValueError(f"no operator maps layout {src!r} to {dst!r}") from None


def between(src: str, dst: str, comm: MPI.Comm, staging: Optional[Staging] = None
            ) -> Optional[Mapping]:
    """The operator taking an array from layout ``src`` to ``dst`` on ``comm`` (see
    :func:`mapping_class`), or None."""
    cls = mapping_class(src, dst)
    return None if cls is None else cls(comm, staging)
