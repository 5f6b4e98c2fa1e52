"""Communication operators of tensor and sequence parallelism (Megatron's ``mappings.py``,
PyTorch DTensor's redistributions), each with its adjoint, held by the layers under names that
say what they do (``self.gather_y``, ``self.reduce_dx``).

A parallel linear layer is ``input operator -> local GEMM -> output operator``; its backward
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
Keep                   blocks stay as they are          Keep                        --
(a layout -> itself)
AllReduceMax           element-wise maximum of per-rank StopGradient                allreduce
(partial -> replicated) arrays -> replicated
StopGradient           zeros: what the maximum is used  AllReduceMax                --
(replicated -> partial) for is invariant to it
=====================  ===============================  ==========================  =========

The maximum (the vocabulary-parallel loss's row maxima, a shift the loss does not depend on)
is no linear map: its "adjoint" is :class:`StopGradient`, the zero map, which is what its
derivative contributes to the loss's gradient; a sum over a sub-communicator (the ranks that
share a kv head) is an :class:`AllReduce` built on that communicator.

Each operator is thus named by the pair of layouts (:mod:`tpmpi.core.layout`; ``partial`` is
:data:`tpmpi.core.layout.PARTIAL`) it maps between: :func:`between` builds it, which is how a
layer's declared layouts (:class:`tpmpi.core.layout.LinearLayouts`) become its communication.
The SUMMA operators of the tile scheme are in :mod:`tpmpi.core.summa`.

Blocks follow the block partition of :mod:`tpmpi.core.partition` in rank order (uneven and empty
blocks allowed). The layers compose them (``ColumnParallelLinear``: Copy or GatherRows in,
GatherCols out when gathering; ``RowParallelLinear``: SplitCols in unless the input is
parallel, AllReduce or ReduceScatterRows out), and so the FFN modes of
:class:`tpmpi.ParallelMLP` are:

* megatron: Copy -> fc1 -> act -> fc2 -> AllReduce (Megatron's f and g);
* book:     Copy -> fc1 -> GatherCols -> act -> Copy -> fc2 -> GatherCols;
* sequence: GatherRows -> fc1 -> act -> fc2 -> ReduceScatterRows (Megatron's sequence
  parallelism: activations outside the GEMMs stay split by rows).

Executing. An operator is built once (by the layer's constructor) on a communicator, with its
host-staging path (:class:`~tpmpi.core.staging.Staging`) and its ``overlap`` setting; its
adjoint is built with it (``op.adjoint``, whose adjoint is ``op``). Calling it
(``op(x, size)``) allocates the result and runs the blocking collective (one comm.py call);
``op.during(x, work, size)`` starts the non-blocking collective, runs the local ``work`` and
waits (with ``overlap=False``, under host staging or on one rank: ``work`` first, then the
blocking collective); ``op.start(x, size)`` returns a :class:`Pending` whose ``wait()``
completes it (the operators the layers run non-blocking have it). If ``work`` raises, the
collective the other ranks are in is completed first and the failure is kept in
``op.pending`` (the layer's next operation raises on every rank). Every
collective reports to ``op.tap`` (:mod:`tpmpi.core.tap`; the null tap by default) and first
completes the layer's pending argument agreement (``op.pending``,
:class:`~tpmpi.core.agreement.Settle`). ``size`` is the global length of the gathered axis
(GatherRows: rows, GatherCols: columns). Operator classes also state their schedule step
(:meth:`Operator.step`: the collective and its nccl-tests size ``S`` for an array shape), which
is how a layer lists its schedule without being built. tests/test_mappings.py checks every
pair with dot-product tests.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, ClassVar, Optional

from mpi4py import MPI

from .agreement import Settle
from .arrays import Array
from .backend import backend_of
from .comm import Request, Staging, allgather_blocks, allreduce, iallgather_blocks, iallreduce, \
    ireduce_scatter, reduce_scatter
from .dtypes import resolve_dtype
from .layout import PARTIAL, Block, blocks
from .partition import block_range
from .schedule import Collective
from .tap import NULL_TAP, Tap


class Pending:
    """A collective started by :meth:`Operator.start`: :meth:`wait` completes it -- waits for
    the request, or, when the operator does not overlap, runs the blocking collective now."""

    __slots__ = ("operator", "nbytes", "request", "blocking")

    def __init__(self, operator: Optional[Operator], nbytes: int = 0,
                 request: Optional[Request] = None,
                 blocking: Optional[Callable[[], Any]] = None) -> None:
        self.operator, self.nbytes = operator, nbytes
        self.request, self.blocking = request, blocking

    def wait(self) -> None:
        """Complete the collective (once; later calls return at once)."""
        op = self.operator
        if op is None:
            return
        self.operator = None
        if self.blocking is not None:
            with op.tap.blocked(op.op or "", self.nbytes, op.size):
                self.blocking()
        elif self.request is not None:
            with op.tap.wait(op.op or ""):
                self.request.Wait()


DONE = Pending(None)
"""A completed :class:`Pending` (an operator with nothing to communicate)."""


class Operator:
    """A communication operator over ``comm`` (see the module docstring) from layout ``src``
    to layout ``dst``. ``op`` names its collective (a :data:`tpmpi.core.colltable.TABLE` row;
    None: no communication); ``allocates``: the result is a new array (else ``x`` itself or a
    view of it). ``overlap``: :meth:`during` and :meth:`start` run the collective non-blocking
    (when there is no host staging and more than one rank). ``pending``: the agreement every
    collective completes first (the layer's). ``tap``: where it reports (bytes, blocked time,
    waits)."""

    op: ClassVar[Optional[str]] = None
    src: ClassVar[str]
    dst: ClassVar[str]
    allocates: ClassVar[bool] = False
    adjoint_class: ClassVar[type[Operator]]

    def __init__(self, comm: MPI.Comm, staging: Optional[Staging] = None, *,
                 overlap: bool = True, pending: Optional[Settle] = None,
                 _adjoint: Optional[Operator] = None) -> None:
        self.comm, self.staging, self.overlap = comm, staging, bool(overlap)
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.pending = pending if pending is not None else Settle()
        self.tap: Tap = NULL_TAP
        self.adjoint: Operator = _adjoint if _adjoint is not None else self.adjoint_class(
            comm, staging, overlap=overlap, pending=self.pending, _adjoint=self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.size})"

    @classmethod
    def step(cls, name: str, shape: Sequence[int], dtype: str, group: str, size: int,
             during: tuple[str, ...] = ()) -> Optional[Collective]:
        """This operator's schedule step on ``size`` ranks of ``group`` for the array of global
        ``shape`` (the gathered, reduced or broadcast one: nccl-tests ``S`` is its bytes), or
        None when nothing is communicated (no collective, or one rank). No communication."""
        if cls.op is None or size <= 1:
            return None
        nbytes = math.prod(int(d) for d in shape) * resolve_dtype(dtype).itemsize
        return Collective(name, cls.op, group, int(size), nbytes, dtype, during)

    def out(self, x: Array, size: Any = None) -> Any:
        """The result array of applying this operator to ``x``: for the operators that
        communicate into a new array (``allocates``) that array, not yet filled (:meth:`_new`),
        except on one rank, where it is ``x`` itself; else ``x`` (or a view of it). ``size``:
        the 1D operators' length of the gathered axis; the SUMMA operators' panel shape or
        root."""
        return self._new(x, size) if self.allocates and self.size > 1 else x

    def _new(self, x: Array, size: Any) -> Any:  # pragma: no cover - abstract
        """A new result array for ``x`` (the allocating operators)."""
        raise NotImplementedError

    def __call__(self, x: Array, size: Any = None) -> Any:
        """The operator applied to ``x``, blocking (no communication here)."""
        return self.out(x, size)

    def during(self, x: Array, work: Callable[[], Any], size: Any = None) -> Any:
        """The operator applied to ``x`` while ``work()`` runs (from :meth:`start`; the
        operators the layers overlap state their own)."""
        out = self.out(x, size)
        self._complete(self.start(x, size, out), work)
        return out

    def start(self, x: Array, size: Any = None, out: Optional[Array] = None) -> Pending:
        """Apply the operator into ``out`` (default :meth:`out`) once the returned
        :class:`Pending` is waited for (no communication here: already done)."""
        if self.op is not None:
            raise TypeError(f"{type(self).__name__} has no start(): call it or use during()")
        return DONE

    # ---- the one overlap logic of every operator (and of DataParallel's buckets)
    def _overlaps(self) -> bool:
        staging = self.staging
        return self.overlap and self.size > 1 and not (staging is not None and staging.staged)

    def _start(self, nbytes: int, launch: Callable[[], Request], blocking: Callable[[], Any]
               ) -> Pending:
        """``launch()`` now (the stream synchronised first) when overlapping, else a
        :class:`Pending` that runs ``blocking()`` when waited for."""
        self.pending.settle()
        if not self._overlaps():
            return Pending(self, nbytes, blocking=blocking)
        if self.staging is not None:
            self.staging.backend.synchronize()
        request = launch()
        self.tap.count(self.op or "", nbytes, self.size)
        return Pending(self, nbytes, request=request)

    def _complete(self, pending: Pending, work: Callable[[], Any]) -> None:
        """``work()``, then ``pending`` waited for; if the work raises while a collective is in
        flight, the collective is completed first (the other ranks are in it) and the failure
        kept. (With nothing in flight the work may complete the pending agreement, whose error
        every rank raises alike: nothing to keep.)"""
        if pending is DONE:
            work()
            return
        try:
            work()
        except BaseException as exc:
            self.pending.failed = f"{type(exc).__name__}: {exc}"
            pending.wait()
            raise
        pending.wait()

    def _blocked(self, nbytes: int) -> Any:
        """The region of a blocking collective of ``nbytes`` (the pending agreement first)."""
        self.pending.settle()
        return self.tap.blocked(self.op or "", nbytes, self.size)


class Copy(Operator):
    """Identity on data: a replicated array becomes each rank's input (Megatron's ``f``)."""

    src, dst = "replicated", "replicated"


class Keep(Operator):
    """An array keeps its blocks (a layout to itself): the identity, its own adjoint."""

    src = dst = "same"


class AllReduce(Operator):
    """In-place sum of per-rank partial sums into a replicated array (Megatron's ``g``):
    ``allreduce`` / ``iallreduce`` (``Allreduce`` / ``Iallreduce``; the exchange of slices for
    2-byte floats)."""

    op = "allreduce"
    src, dst = PARTIAL, "replicated"

    def __call__(self, x: Array, size: Any = None) -> Array:
        with self._blocked(x.nbytes):
            return allreduce(x, self.comm, self.staging)

    def during(self, x: Array, work: Callable[[], Any], size: Any = None) -> Array:
        self._complete(self._start(x.nbytes, lambda: iallreduce(x, self.comm),
                                   lambda: allreduce(x, self.comm, self.staging)), work)
        return x

    def start(self, x: Array, size: Any = None, out: Optional[Array] = None) -> Pending:
        return self._start(x.nbytes, lambda: iallreduce(x, self.comm),
                           lambda: allreduce(x, self.comm, self.staging))


class AllReduceMax(Operator):
    """In-place element-wise maximum of per-rank arrays (``Allreduce`` with ``MPI.MAX``), e.g.
    the row maxima of the vocabulary-parallel logits. Host arrays of float32 or float64 (the
    loss's statistics; the caller computes them in that type), C-contiguous; a device array
    goes through the host when MPI is not GPU-aware."""

    op = "allreduce"
    src, dst = PARTIAL, "replicated"

    def __call__(self, x: Array, size: Any = None) -> Array:
        with self._blocked(x.nbytes):
            if self.size > 1:
                direct = self.staging is None or self.staging.direct()  # stream synchronised
                host = x if direct else backend_of(x).to_host(x)
                self.comm.Allreduce(MPI.IN_PLACE, host.reshape(-1), op=MPI.MAX)
                if host is not x:
                    x[...] = backend_of(x).asarray(host)
        return x


class StopGradient(Operator):
    """The zero map (a new array of zeros like ``x``): the derivative through a quantity that
    the result does not depend on, such as the loss's shift by the row maximum."""

    src, dst = "replicated", PARTIAL

    def out(self, x: Array, size: Any = None) -> Array:
        return backend_of(x).xp.zeros_like(x)


class _Gather(Operator):
    """An Allgather of the blocks of layout ``src`` straight into their places of the result:
    ``allgather_blocks`` / ``iallgather_blocks`` (``Alltoallw`` / ``Ialltoallw`` with subarray
    receive types). One rank: the result is ``x`` itself."""

    op = "allgather"
    dst = "replicated"
    allocates = True

    def __init__(self, comm: MPI.Comm, staging: Optional[Staging] = None, **kwargs: Any) -> None:
        super().__init__(comm, staging, **kwargs)
        self._blocks: tuple[tuple[int, ...], list[Block]] = ((), [])

    def blocks(self, out: Array) -> list[Block]:
        """``(starts, shape)`` of every rank's block of ``out`` in layout ``src`` (kept for the
        last shape: a repeated call computes nothing)."""
        shape, found = self._blocks
        if shape != out.shape:
            found = blocks(out.shape, (1, self.size), self.src)
            self._blocks = (tuple(out.shape), found)
        return found

    def __call__(self, x: Array, size: Any = None) -> Array:
        out = self.out(x, size)
        if out is not x:
            with self._blocked(out.nbytes):
                allgather_blocks(x, out, self.blocks(out), self.comm, self.staging)
        return out

    def during(self, x: Array, work: Callable[[], Any], size: Any = None) -> Array:
        out = self.out(x, size)
        parts = self.blocks(out)
        self._complete(DONE if out is x else self._start(
            out.nbytes, lambda: iallgather_blocks(x, out, parts, self.comm),
            lambda: allgather_blocks(x, out, parts, self.comm, self.staging)), work)
        return out

    def start(self, x: Array, size: Any = None, out: Optional[Array] = None) -> Pending:
        out = self.out(x, size) if out is None else out
        parts = self.blocks(out)
        return DONE if out is x else self._start(
            out.nbytes, lambda: iallgather_blocks(x, out, parts, self.comm),
            lambda: allgather_blocks(x, out, parts, self.comm, self.staging))


class GatherRows(_Gather):
    """Allgather of row blocks (layout "rows") into all rows on every rank."""

    src = "rows"

    def _new(self, x: Array, size: Any) -> Array:
        return backend_of(x).xp.empty((size,) + tuple(x.shape[1:]), dtype=x.dtype)


class GatherCols(_Gather):
    """Allgather of column blocks (layout "cols") into the replicated array, each block
    written straight into its strided place (no staging copy)."""

    src = "cols"

    def _new(self, x: Array, size: Any) -> Array:
        return backend_of(x).xp.empty((x.shape[0], size), dtype=x.dtype)


class ReduceScatterRows(Operator):
    """Sum of per-rank (M, ...) partials, each rank keeping its row block (layout "rows"):
    ``reduce_scatter`` / ``ireduce_scatter`` (``Reduce_scatter`` / ``Ireduce_scatter``; the
    exchange of slices for 2-byte floats)."""

    op = "reduce_scatter"
    src, dst = PARTIAL, "rows"
    allocates = True

    def _new(self, x: Array, size: Any) -> Array:
        a, b = block_range(x.shape[0], self.size, self.rank)
        return backend_of(x).xp.empty((b - a,) + tuple(x.shape[1:]), dtype=x.dtype)

    def counts(self, x: Array, size: Any = None) -> list[int]:
        """Elements of every rank's row block of ``x``."""
        return [math.prod(shape) for _, shape in blocks(x.shape, (1, self.size), self.dst)]

    def __call__(self, x: Array, size: Any = None) -> Array:
        out = self.out(x, size)
        if self.size > 1:
            with self._blocked(x.nbytes):
                reduce_scatter(x, out, self.counts(x, size), self.comm, self.staging)
        return out

    def during(self, x: Array, work: Callable[[], Any], size: Any = None) -> Array:
        out = self.out(x, size)
        counts = self.counts(x, size)
        self._complete(DONE if self.size == 1 else self._start(
            x.nbytes, lambda: ireduce_scatter(x, out, counts, self.comm),
            lambda: reduce_scatter(x, out, counts, self.comm, self.staging)), work)
        return out


class SplitCols(Operator):
    """This rank's column block of a replicated array: a strided view, no communication."""

    src, dst = "replicated", "cols"

    def out(self, x: Array, size: Any = None) -> Array:
        a, b = block_range(x.shape[1], self.size, self.rank)
        return x[:, a:b]


Copy.adjoint_class, AllReduce.adjoint_class = AllReduce, Copy
GatherRows.adjoint_class, ReduceScatterRows.adjoint_class = ReduceScatterRows, GatherRows
GatherCols.adjoint_class, SplitCols.adjoint_class = SplitCols, GatherCols
Keep.adjoint_class = Keep
AllReduceMax.adjoint_class, StopGradient.adjoint_class = StopGradient, AllReduceMax

MAPPINGS = (Copy, AllReduce, GatherRows, ReduceScatterRows, GatherCols, SplitCols, Keep)
"""The linear operators that :func:`between` picks by layouts (AllReduceMax and StopGradient
are built by name)."""
_BY_LAYOUTS = {(m.src, m.dst): m for m in MAPPINGS if m is not Keep}


def mapping_class(src: str, dst: str) -> type[Operator]:
    """The operator class from layout ``src`` to ``dst``: :class:`Keep` when an array keeps its
    blocks (``src == dst``, other than replicated). ValueError for a pair that no operator
    maps."""
    if src == dst and src != "replicated":
        return Keep
    try:
        return _BY_LAYOUTS[src, dst]
    except KeyError:
        raise ValueError(f"no operator maps layout {src!r} to {dst!r}") from None


def between(src: str, dst: str, comm: MPI.Comm, staging: Optional[Staging] = None, *,
            overlap: bool = True, pending: Optional[Settle] = None) -> Operator:
    """The operator taking an array from layout ``src`` to ``dst`` on ``comm`` (see
    :func:`mapping_class`), with its adjoint."""
    return mapping_class(src, dst)(comm, staging, overlap=overlap, pending=pending)
