"""Collectives on backend arrays, every MPI call visible.

* Argument agreement before the collectives (every rank raises the same ValueError) is
  :mod:`tpmpi.core.agreement`.
* :func:`allgather_blocks` / :func:`iallgather_blocks` — every rank's block lands directly in its
  final place of a C-ordered global array: ``Alltoallw`` whose receive types are
  ``Create_subarray`` types (the mpi4py-fft idiom). This serves all layouts ("cols", "rows",
  "tiles"), handles uneven and zero-size blocks, and needs no full-size staging copy or
  transpose: MPI unpacks each incoming block straight into its strided destination.
* Reductions — :func:`allreduce`, :func:`iallreduce`, :func:`ireduce`, :func:`ireduce_scatter`,
  :func:`reduce_scatter` — and :func:`ibcast`. float32/float64 on host (or GPU-aware) buffers
  use MPI's own reduction. float16 and bfloat16 never meet an MPI datatype a library may lack
  (MPICH's ``MPIX_C_FLOAT16``, absent from Open MPI 4.1) nor MPI's per-element reduction loop:
  they move as 2-byte words (``MPI_UINT16_T``) and are reduced by an *exchange of slices*:
  ``Alltoallv`` gives rank q slice q of every rank's array, rank q sums its P slices in float32
  with ``backend.xp`` (vectorised on the host, on the device for CuPy) and rounds once, then an
  ``Allgatherv`` (allreduce) or ``Gatherv`` (reduce) assembles the result; a reduce-scatter
  stops after the sum. Every rank computes its slice in rank order, so replicated results are
  bitwise identical on every rank.
* Any collective on a one-rank communicator returns at once: no MPI call, no host copy.
* Device buffers: the stream is synchronised before MPI sees them; without GPU-aware MPI they
  go through :class:`~tpmpi.core.staging.Staging` (double-buffered pinned chunks, only this rank's
  data down, only what it needs back, staged reductions summed on the device).
* Message size: for every collective above, on every rank, the bytes one MPI call sends (summed
  over peers) and the bytes it receives (summed over peers) are each at most
  :func:`max_message_bytes` (default 2**30, env ``TPMPI_MAX_MESSAGE_BYTES``), provided that the
  limit is at least ``P x itemsize`` bytes (``P x itemsize x`` the product of the middle axes
  for gathers of arrays with more than two dimensions): gathers are split into row chunks, then
  into column ranges of single rows; reductions and broadcasts into flat chunks. Counts,
  displacements and subarray types stay far below 2**31 whatever the array size, and results
  are identical to the unsplit call. Not split (they carry a few bytes per rank): the
  agreements of :mod:`tpmpi.core.agreement` (one Allreduce of 3 int64 whatever the values; the
  allgather of the details on failure only).
* Open MPI 4.1's ``Ialltoallw`` reads its datatype arrays with the neighbour count of a
  Cartesian communicator (2 per dimension) and crashes when that exceeds the size (a 1x2 or 1x3
  grid): :func:`iallgather_blocks` runs on a topology-free duplicate kept on the communicator.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, Callable, Optional, Union

import numpy as np
from mpi4py import MPI

from .agreement import max_message_bytes
from .arrays import Array, DTypeLike
from .backend import backend_of
from .partition import block_sizes, displacements
from .staging import Piece, Staging

__all__ = ["polite_barrier", "Staging", "chunks", "Requests", "Chain", "Request",
           "wait_all", "mpi_type", "reduction_dtype", "allgather_blocks",
           "iallgather_blocks", "alltoallw_args", "allreduce", "iallreduce", "ibcast", "ireduce",
           "ireduce_scatter", "reduce_scatter"]


def polite_barrier(comm: MPI.Comm, interval: float = 1e-3) -> None:
    """Barrier that sleeps between polls (``Ibarrier`` + ``Test``), so that waiting ranks leave
    the cores to the ranks that work (MPI's blocking calls busy-poll)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(interval)


@contextlib.contextmanager
def first_ranks(world: MPI.Comm, p: int) -> Iterator[MPI.Comm]:
    """A communicator of the first ``p`` ranks of ``world`` (``COMM_NULL`` on the others),
    freed on leaving the block, an error included. Collective over ``world`` (``Split``)."""
    sub = world.Split(0 if world.Get_rank() < p else MPI.UNDEFINED, world.Get_rank())
    try:
        yield sub
    finally:
        if sub != MPI.COMM_NULL:
            sub.Free()


# --------------------------------------------------------------------------- message size

def chunks(n: int, item_bytes: int, limit: Optional[int] = None) -> list[slice]:
    """Consecutive slices covering ``range(n)``, each of at most ``limit`` bytes (default
    :func:`max_message_bytes`) but at least one item of ``item_bytes``; ``[0:0]`` when n == 0."""
    step = max(1, (limit or max_message_bytes()) // max(1, item_bytes))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


class Requests:
    """The requests of a chunked non-blocking collective, completed together."""

    def __init__(self, requests: Sequence[Any]) -> None:
        self.requests = list(requests)

    def Wait(self) -> None:  # noqa: N802 (mpi4py's spelling)
        wait_all(self.requests)


class Chain:
    """A non-blocking collective in steps: ``steps`` yields the request list of each step (the
    first is posted now); the local work between steps (e.g. a sum) and the next step's posting
    run inside :meth:`Wait`, each after the previous step has completed. Ranks must wait for
    chains that share a communicator in the same order, as MPI requires of the calls they
    post."""

    def __init__(self, steps: Iterator[list]) -> None:
        self._steps = steps
        self._pending: Optional[list] = next(steps, None)

    def Wait(self) -> None:  # noqa: N802
        while self._pending is not None:
            wait_all(self._pending)
            self._pending = next(self._steps, None)


Request = Union[MPI.Request, Requests, Chain]
"""What a non-blocking collective of this module returns; ``Wait()`` completes it."""


def wait_all(requests: Sequence[Request]) -> None:
    """Wait for every request of a list that may mix MPI requests, :class:`Requests` and
    :class:`Chain` s (``MPI.Request.Waitall`` takes MPI requests only)."""
    plain = [r for r in requests if isinstance(r, MPI.Request)]
    MPI.Request.Waitall(plain)
    for r in requests:
        if not isinstance(r, MPI.Request):
            r.Wait()


def _group(requests: list[MPI.Request]) -> Request:
    return requests[0] if len(requests) == 1 else Requests(requests)


def _finish(steps: Iterator[list]) -> None:
    """Run a step generator (see :class:`Chain`) to completion now."""
    for requests in steps:
        wait_all(requests)


# --------------------------------------------------------------------------- datatypes

HALF = ("float16", "bfloat16")


def mpi_type(dtype: DTypeLike) -> MPI.Datatype:
    """The predefined MPI datatype that moves ``dtype``: float16 and bfloat16 as 2-byte words
    (``MPI_UINT16_T``, so the library needs no half-precision type); other dtypes as MPI's own
    type (``MPI_FLOAT``...), or the unsigned integer of their size. Never freed by callers."""
    dt = np.dtype(dtype)
    if dt.name in HALF:
        return MPI.UINT16_T
    try:
        return MPI.Datatype.fromcode(dt.char)
    except (KeyError, ValueError):
        return MPI.Datatype.fromcode(np.dtype(f"u{dt.itemsize}").char)


def reduction_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype in which tpmpi sums ``dtype``: float32 for float16 and bfloat16 (one rounding
    at the end), the dtype itself otherwise."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt.name in HALF else dt


def _words(a: Array) -> Array:
    """``a`` as MPI sees it: a uint16 view for the 2-byte floats (mpi4py cannot export
    bfloat16, and the words match :func:`mpi_type`), ``a`` itself otherwise."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 and a.dtype.name in HALF else a


_TYPE_CACHE: OrderedDict[tuple, MPI.Datatype] = OrderedDict()
_TYPE_CACHE_SIZE = 256


def _subarray(dtype: DTypeLike, global_shape: tuple, starts: tuple, shape: tuple
              ) -> MPI.Datatype:
    """Committed subarray type of block ``shape`` at ``starts`` in C-ordered ``global_shape``;
    cached (types depend only on these numbers, not on a communicator)."""
    key = (np.dtype(dtype).name, global_shape, starts, shape)
    dt = _TYPE_CACHE.get(key)
    if dt is None:
        dt = _new_subarray(dtype, global_shape, starts, shape)
        _TYPE_CACHE[key] = dt
        if len(_TYPE_CACHE) > _TYPE_CACHE_SIZE:
            _TYPE_CACHE.popitem(last=False)[1].Free()
    else:
        _TYPE_CACHE.move_to_end(key)
    return dt


def _new_subarray(dtype: DTypeLike, global_shape: Sequence[int], starts: Sequence[int],
                  shape: Sequence[int]) -> MPI.Datatype:
    return mpi_type(dtype).Create_subarray(list(global_shape), list(shape), list(starts),
                                           order=MPI.ORDER_C).Commit()


_PLAIN_KEYVAL: list[int] = []


def _plain(comm: MPI.Comm) -> MPI.Comm:
    """``comm``, or for a communicator with a topology a duplicate without one (same ranks and
    order), created collectively at first use and freed with ``comm`` (an MPI attribute). See
    the module docstring (Open MPI 4.1's ``Ialltoallw``)."""
    if comm.Get_topology() == MPI.UNDEFINED:
        return comm
    if not _PLAIN_KEYVAL:
        _PLAIN_KEYVAL.append(MPI.Comm.Create_keyval(
            delete_fn=lambda _comm, _key, plain: plain.Free()))
    plain = comm.Get_attr(_PLAIN_KEYVAL[0])
    if not isinstance(plain, MPI.Comm):  # None: not created yet
        plain = comm.Split(0, comm.Get_rank())
        comm.Set_attr(_PLAIN_KEYVAL[0], plain)
    return plain


# --------------------------------------------------------------------------- gathers

Block = tuple[Sequence[int], Sequence[int]]  # (starts, shape) of one rank's block


def _gather_pieces(shape: tuple, itemsize: int, size: int, limit: int
                   ) -> list[tuple[tuple[int, int], Optional[tuple[int, int]]]]:
    """``((row0, row1), cols)`` of each MPI call of a gather into ``shape``: ``cols`` None
    (whole rows) or ``(col0, col1)`` of the last axis when one row is over the limit. A call
    covers at most ``limit // (size * cell)`` cells (cell: one element times the middle axes),
    so that neither what a rank sends (its part, to ``size`` peers) nor what it receives
    exceeds ``limit``."""
    rows = shape[0]
    ncols = shape[-1] if len(shape) > 1 else 1
    cell = itemsize * math.prod(shape[1:-1])
    cap = max(1, limit // (size * max(cell, 1)))
    if rows * ncols <= cap:
        return [((0, rows), None)]
    if ncols <= cap:
        step = cap // ncols
        return [((r, min(r + step, rows)), None) for r in range(0, rows, step)]
    return [((r, r + 1), (c, min(c + cap, ncols))) for r in range(rows)
            for c in range(0, ncols, cap)]


def _row_window(blocks: Sequence[Block], rank: int, r0: int, r1: int
                ) -> tuple[slice, list[Block]]:
    """Rows ``r0:r1`` of the global array: this rank's local rows in that window and every
    block clipped to it, with starts relative to row ``r0``."""
    clipped: list[Block] = []
    for starts, shape in blocks:
        first = min(max(r0, starts[0]), r1)
        stop = max(first, min(r1, starts[0] + shape[0]))
        clipped.append(((first - r0,) + tuple(starts[1:]), (stop - first,) + tuple(shape[1:])))
    own_start = blocks[rank][0][0]
    first = clipped[rank][0][0] + r0 - own_start
    return slice(first, first + clipped[rank][1][0]), clipped


def _clip_cols(block: Block, cols: Optional[tuple[int, int]]) -> tuple[Block, int]:
    """``block`` restricted to last-axis range ``cols`` and the offset of that range inside the
    block's own columns."""
    if cols is None:
        return block, 0
    (starts, shape), (c0, c1) = block, cols
    first = min(max(c0, starts[-1]), c1)
    stop = max(first, min(c1, starts[-1] + shape[-1]))
    return ((*starts[:-1], first), (*shape[:-1], stop - first)), first - starts[-1]


_PLAN_CACHE: OrderedDict[tuple, list] = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _spec(dtype: DTypeLike, out_shape: tuple, local_shape: tuple, blocks: Sequence[Block],
          rank: int, cols: Optional[tuple[int, int]]) -> tuple:
    """Counts, zero displacements and types of one Alltoallw call (new types, owned by the
    plan that holds them); zero counts carry a valid predefined type."""
    base, size = mpi_type(dtype), len(blocks)
    rcounts, rtypes = [], []
    for block in blocks:
        (starts, shape), _ = _clip_cols(block, cols)
        full = all(s > 0 for s in shape)
        rcounts.append(1 if full else 0)
        rtypes.append(_new_subarray(dtype, out_shape, tuple(starts), tuple(shape)) if full
                      else base)
    (_, own), offset = _clip_cols(blocks[rank], cols)
    if not all(s > 0 for s in own):
        scount, stype = 0, base
    elif tuple(own) == tuple(local_shape):
        scount, stype = math.prod(own), base
    else:
        scount = 1
        stype = _new_subarray(dtype, local_shape, (0,) * (len(own) - 1) + (offset,), own)
    return [scount] * size, [0] * size, [stype] * size, rcounts, [0] * size, rtypes


def _plan(local: Array, out: Array, blocks: tuple, rank: int, limit: int) -> list:
    """``(local rows, out rows, spec)`` of each Alltoallw of a gather, cached per gather shape
    (a repeated forward costs one dict lookup). Entries own their datatypes (freed on
    eviction)."""
    key = (out.dtype.str, out.shape, local.shape, blocks, rank, limit)
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    plan = []
    for (r0, r1), cols in _gather_pieces(tuple(out.shape), out.itemsize, len(blocks), limit):
        rows, clipped = _row_window(blocks, rank, r0, r1)
        spec = _spec(out.dtype, (r1 - r0,) + tuple(out.shape[1:]),
                     (rows.stop - rows.start,) + tuple(local.shape[1:]), clipped, rank, cols)
        plan.append((rows, slice(r0, r1), spec))
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        for *_, spec in _PLAN_CACHE.popitem(last=False)[1]:
            for dt in {id(t): t for t in spec[2] + spec[5]}.values():  # the send type repeats
                if not dt.is_predefined:
                    dt.Free()
    return plan


def alltoallw_args(local: Array, out: Array, blocks: Sequence[Block], rank: int,
                   limit: Optional[int] = None) -> list[tuple[list, list]]:
    """``(send, recv)`` buffer specifications of each ``Alltoallw`` of a gather of C-contiguous
    ``local`` (this rank's block) into C-ordered ``out`` (see :func:`allgather_blocks`), split
    so that no call exceeds ``limit`` (default :func:`max_message_bytes`)."""
    try:
        key = tuple(blocks)
        hash(key)
    except TypeError:  # lists inside
        key = tuple((tuple(s), tuple(sh)) for s, sh in blocks)
    plan = _plan(local, out, key, rank, limit or max_message_bytes())
    if len(plan) == 1:
        sc, sd, st, rc, rd, rt = plan[0][2]
        return [([_words(local), sc, sd, st], [_words(out), rc, rd, rt])]
    return [([_words(local[rows]), sc, sd, st], [_words(out[orows]), rc, rd, rt])
            for rows, orows, (sc, sd, st, rc, rd, rt) in plan]


def _check_gather_args(local: Array, out: Array, blocks: Sequence[Block], rank: int) -> None:
    if tuple(local.shape) != tuple(blocks[rank][1]):
        raise ValueError(f"local block shape {tuple(local.shape)} != expected "
                         f"{tuple(blocks[rank][1])} for rank {rank}")
    if local.dtype != out.dtype:
        raise ValueError(f"local dtype {local.dtype} != output dtype {out.dtype}")


def _own_block(local: Array, out: Array, blocks: Sequence[Block], rank: int) -> None:
    """One rank: the block is copied into its place of ``out`` (no MPI, no host copy)."""
    starts, shape = blocks[rank]
    if out.ndim:
        out[tuple(slice(s, s + n) for s, n in zip(starts, shape))] = local
    else:
        out[...] = local


def allgather_blocks(local: Array, out: Array, blocks: Sequence[Block], comm: MPI.Comm,
                     staging: Optional[Staging] = None) -> Array:
    """Every rank's C-contiguous block into its place of ``out`` (C-ordered, global shape) on
    every rank: ``Alltoallw`` with subarray receive types, one call when it fits the message
    limit. Staged device buffers go in double-buffered row chunks: this rank's rows down, the
    assembled rows back. Returns ``out``. Collective. Callers validate shapes with
    :func:`tpmpi.core.agreement.agree` first; here a mismatch is a programming error.
    """
    rank = comm.Get_rank()
    _check_gather_args(local, out, blocks, rank)
    if comm.Get_size() == 1 or out.ndim == 0:
        _own_block(local, out, blocks, rank)
        return out
    if staging is None or staging.direct():
        for send, recv in alltoallw_args(local, out, blocks, rank):
            comm.Alltoallw(send, recv)
        return out
    blocks = [(tuple(s), tuple(sh)) for s, sh in blocks]
    row_bytes = out.itemsize * math.prod(out.shape[1:])
    step = max(1, staging.chunk_bytes // max(row_bytes, 1))
    pieces = []
    for r0 in range(0, out.shape[0], step):
        r1 = min(r0 + step, out.shape[0])
        rows, clipped = _row_window(blocks, rank, r0, r1)
        lv, ov = local[rows], out[r0:r1]

        def call(host: list[np.ndarray], clipped: list[Block] = clipped) -> None:
            for send, recv in alltoallw_args(host[0], host[1], clipped, rank):
                comm.Alltoallw(send, recv)

        pieces.append(Piece(host=[(lv.shape, out.dtype), (ov.shape, out.dtype)], call=call,
                            d2h=[(lv, 0, Ellipsis)], h2d=[(1, Ellipsis, ov)], kind="gather"))
    staging.pipeline(pieces)
    return out


def iallgather_blocks(local: Array, out: Array, blocks: Sequence[Block], comm: MPI.Comm
                      ) -> Request:
    """Non-blocking :func:`allgather_blocks` (``Ialltoallw`` per call) on host or GPU-aware
    buffers; ``local`` and ``out`` must stay alive and untouched until ``Wait()`` returns."""
    rank = comm.Get_rank()
    _check_gather_args(local, out, blocks, rank)
    if comm.Get_size() == 1 or out.ndim == 0:
        _own_block(local, out, blocks, rank)
        return MPI.REQUEST_NULL
    plain = _plain(comm)
    return _group([plain.Ialltoallw(send, recv)
                   for send, recv in alltoallw_args(local, out, blocks, rank)])


# --------------------------------------------------------------------------- reductions


def _flat(a: Array) -> Array:
    """A 1D view of C-contiguous ``a`` (a reshape copy would lose the in-place result)."""
    if not a.flags.c_contiguous:
        raise ValueError("in-place reductions need a C-contiguous buffer")
    return a.reshape(-1)


def _native(a: Array, staging: Optional[Staging]) -> bool:
    """MPI reduces ``a`` itself: host or GPU-aware buffers of a dtype MPI sums exactly as
    tpmpi would (not the 2-byte floats)."""
    return a.dtype.name not in HALF and (staging is None or staging.direct())


def _sync(a: Array, staging: Optional[Staging]) -> Callable[[], None]:
    return (staging.backend if staging is not None else backend_of(a)).synchronize


def _sum_rows(rows: Array, dest: Array) -> None:
    """``dest = rows[0] + rows[1] + ...`` accumulated in :func:`reduction_dtype` in rank order
    and rounded once; ``rows`` and ``dest`` on one backend (vectorised: NumPy or CuPy)."""
    if rows.shape[0] == 0 or dest.size == 0:
        return
    acc = rows[0].astype(reduction_dtype(dest.dtype))
    for q in range(1, rows.shape[0]):
        acc += rows[q]
    dest[...] = acc


def _exchange(send: Array, recv: Array, counts: Sequence[int], comm: MPI.Comm, blocking: bool
              ) -> Optional[MPI.Request]:
    """``Alltoallv`` of slices: ``counts[q]`` consecutive elements of ``send`` go to rank q;
    ``recv`` (P, counts[rank]) gets row p from rank p."""
    size, mine = comm.Get_size(), recv.shape[1]
    args = ([_words(send), list(counts), displacements(counts), mpi_type(send.dtype)],
            [_words(recv), [mine] * size, [q * mine for q in range(size)],
             mpi_type(recv.dtype)])
    if blocking:
        comm.Alltoallv(*args)
        return None
    return comm.Ialltoallv(*args)


def _spread(part: Array, counts: Sequence[int], comm: MPI.Comm, blocking: bool
            ) -> Optional[MPI.Request]:
    """In-place ``Allgatherv``: rank q's ``counts[q]`` elements, already at their place of
    ``part``, reach every rank."""
    spec = [_words(part), list(counts), displacements(counts), mpi_type(part.dtype)]
    if blocking:
        comm.Allgatherv(MPI.IN_PLACE, spec)
        return None
    return comm.Iallgatherv(MPI.IN_PLACE, spec)


def _collect(mine: Array, out: Array, counts: Sequence[int], root: int, comm: MPI.Comm,
             blocking: bool) -> Optional[MPI.Request]:
    """``Gatherv`` of every rank's ``mine`` into ``out`` on ``root`` (in place there)."""
    send: Any
    recv: Any
    if comm.Get_rank() == root:
        send = MPI.IN_PLACE
        recv = [_words(out), list(counts), displacements(counts), mpi_type(out.dtype)]
    else:
        send, recv = [_words(mine), mpi_type(mine.dtype)], None
    if blocking:
        comm.Gatherv(send, recv, root=root)
        return None
    return comm.Igatherv(send, recv, root=root)


def _root_part(out: Optional[Array], c0: int, c1: int) -> Array:
    """Elements ``c0:c1`` of the root's flat output of a reduce (the root always has one)."""
    assert out is not None
    return out[c0:c1]


def _flat_chunks(n: int, elements: int) -> list[tuple[int, int]]:
    elements = max(1, elements)
    return [(c, min(c + elements, n)) for c in range(0, n, elements)]


def _balanced_step(item: int, size: int, limit: int) -> int:
    """Elements per chunk of a balanced exchange (allreduce, reduce): a multiple of ``size``
    whose ``size`` slices keep both sides of the ``Alltoallv`` within ``limit``."""
    return size * max(1, limit // (size * item))


def _exchange_steps(flat: Array, comm: MPI.Comm, sync: Callable[[], None], *,
                    root: Optional[int], out: Optional[Array] = None) -> Iterator[list]:
    """Steps (see :class:`Chain`) of the sum of ``flat`` over ``comm`` by an exchange of slices
    on host or GPU-aware buffers: into ``flat`` on every rank (``root`` None: allreduce), or into
    ``out`` on ``root`` (reduce)."""
    xp, size, rank = backend_of(flat).xp, comm.Get_size(), comm.Get_rank()
    step = _balanced_step(flat.itemsize, size, max_message_bytes())
    sync()
    for c0, c1 in _flat_chunks(flat.size, step):
        part, counts = flat[c0:c1], block_sizes(c1 - c0, size)
        o, mine = displacements(counts)[rank], counts[rank]
        rows = xp.empty((size, mine), dtype=flat.dtype)
        yield [_exchange(part, rows, counts, comm, False)]
        dest = part if root is None else (_root_part(out, c0, c1) if rank == root else
                                          xp.empty(c1 - c0, dtype=flat.dtype))
        _sum_rows(rows, dest[o:o + mine])
        sync()
        if root is None:
            yield [_spread(part, counts, comm, False)]
        else:
            yield [_collect(dest[o:o + mine], dest, counts, root, comm, False)]


def _scatter_steps(flat: Array, out: Array, counts: Sequence[int], comm: MPI.Comm,
                   sync: Callable[[], None]) -> Iterator[list]:
    """Steps of a reduce-scatter by an exchange of slices: rank q sums the ``counts[q]``
    elements of its segment into ``out``."""
    xp, size, rank = backend_of(flat).xp, comm.Get_size(), comm.Get_rank()
    starts = displacements(counts)
    step = max(1, max_message_bytes() // (size * flat.itemsize))
    sync()
    for c0, c1 in _flat_chunks(flat.size, step):
        seg = [max(0, min(c1, s + n) - max(c0, s)) for s, n in zip(starts, counts)]
        rows = xp.empty((size, seg[rank]), dtype=flat.dtype)
        yield [_exchange(flat[c0:c1], rows, seg, comm, False)]
        first = max(c0, starts[rank]) - starts[rank]
        _sum_rows(rows, out[first:first + seg[rank]])
        sync()


def allreduce(a: Array, comm: MPI.Comm, staging: Optional[Staging] = None) -> Array:
    """In-place sum of C-contiguous ``a`` over ``comm``. Returns ``a``. float32/float64 on host
    or GPU-aware buffers: ``Allreduce`` per flat chunk; float16/bfloat16 and staged device
    buffers: exchange of slices, float32 (or the dtype's) sum, ``Allgatherv`` (see the module
    docstring)."""
    if comm.Get_size() == 1:
        return a
    flat = _flat(a)
    if _native(a, staging):
        for part in chunks(flat.size, flat.itemsize):
            comm.Allreduce(MPI.IN_PLACE, flat[part], op=MPI.SUM)
    elif staging is not None and staging.staged:
        _staged_reduce(flat, comm, staging, root=None)
    else:
        _finish(_exchange_steps(flat, comm, _sync(a, staging), root=None))
    return a


def iallreduce(a: Array, comm: MPI.Comm) -> Request:
    """Non-blocking in-place sum of a C-contiguous host or GPU-aware buffer: ``Iallreduce`` per
    flat chunk, or for float16/bfloat16 a :class:`Chain` (the slice exchange is in flight now;
    the sum and the ``Iallgatherv`` follow inside ``Wait()``)."""
    if comm.Get_size() == 1:
        return MPI.REQUEST_NULL
    flat = _flat(a)
    if a.dtype.name in HALF:
        return Chain(_exchange_steps(flat, comm, _sync(a, None), root=None))
    return _group([comm.Iallreduce(MPI.IN_PLACE, flat[part], op=MPI.SUM)
                   for part in chunks(flat.size, flat.itemsize)])


def ireduce(a: Array, out: Optional[Array], root: int, comm: MPI.Comm,
            staging: Optional[Staging] = None) -> Request:
    """Sum of C-contiguous ``a`` over ``comm`` into ``out`` on ``root`` (``out`` is ignored
    elsewhere and may be None there): ``Ireduce`` per flat chunk, or the exchange of slices
    followed by ``Gatherv`` (2-byte floats; a :class:`Chain`). Staged device buffers run it
    blocking and return a completed request."""
    rank = comm.Get_rank()
    if comm.Get_size() == 1:
        assert out is not None  # the one rank is the root
        if out is not a:
            out[...] = a
        return MPI.REQUEST_NULL
    flat = _flat(a)
    out_flat = _flat(out) if rank == root else None
    if _native(a, staging):
        return _group([comm.Ireduce(flat[part], out_flat[part] if out_flat is not None else None,
                                    op=MPI.SUM, root=root)
                       for part in chunks(flat.size, flat.itemsize)])
    if staging is not None and staging.staged:
        _staged_reduce(flat, comm, staging, root=root, out=out_flat)
        return MPI.REQUEST_NULL
    return Chain(_exchange_steps(flat, comm, _sync(a, staging), root=root, out=out_flat))


def ireduce_scatter(a: Array, out: Array, counts: Sequence[int], comm: MPI.Comm,
                    staging: Optional[Staging] = None) -> Request:
    """Sum ``a`` over ``comm`` and scatter it: rank ``q`` gets elements
    ``[sum(counts[:q]), sum(counts[:q+1]))`` of the flattened sum in ``out`` (uneven and
    zero-size blocks work): ``Ireduce_scatter`` per flat chunk of ``a``, or the exchange of
    slices (2-byte floats; a :class:`Chain`). Staged device buffers run it blocking and return a
    completed request. For the leading-axis blocks of a C-ordered array pass them as they are;
    column blocks must be packed first."""
    counts = [int(c) for c in counts]
    rank, size = comm.Get_rank(), comm.Get_size()
    flat, out_flat = _flat(a), _flat(out)
    if size == 1:
        out_flat[...] = flat[:counts[0]]
        return MPI.REQUEST_NULL
    if _native(a, staging):
        starts, requests = displacements(counts), []
        for part in chunks(flat.size, flat.itemsize):
            seg = [max(0, min(part.stop, s + n) - max(part.start, s))
                   for s, n in zip(starts, counts)]
            first = max(part.start, starts[rank]) - starts[rank]
            requests.append(comm.Ireduce_scatter(flat[part], out_flat[first:first + seg[rank]],
                                                 seg, op=MPI.SUM))
        return _group(requests)
    if staging is not None and staging.staged:
        _staged_scatter(flat, out_flat, counts, comm, staging)
        return MPI.REQUEST_NULL
    return Chain(_scatter_steps(flat, out_flat, counts, comm, _sync(a, staging)))


def reduce_scatter(a: Array, out: Array, counts: Sequence[int], comm: MPI.Comm,
                   staging: Optional[Staging] = None) -> Array:
    """Blocking :func:`ireduce_scatter`. Returns ``out``."""
    ireduce_scatter(a, out, counts, comm, staging).Wait()
    return out


def ibcast(a: Array, root: int, comm: MPI.Comm, staging: Optional[Staging] = None) -> Request:
    """Broadcast the C-contiguous ``a`` from ``root`` in place: ``Ibcast`` per flat chunk.
    Staged device buffers run it blocking (chunks pipelined) and return a completed request."""
    if comm.Get_size() == 1:
        return MPI.REQUEST_NULL
    flat = _flat(a)
    if staging is None or staging.direct():
        return _group([comm.Ibcast(_words(flat[part]), root=root)
                       for part in chunks(flat.size, flat.itemsize)])
    is_root = comm.Get_rank() == root
    pieces = []
    for part in chunks(flat.size, flat.itemsize, min(staging.chunk_bytes, max_message_bytes())):
        view = flat[part]
        pieces.append(Piece(host=[(view.shape, a.dtype)],
                            call=lambda host: comm.Bcast(_words(host[0]), root=root),
                            d2h=[(view, 0, Ellipsis)] if is_root else [],
                            h2d=[] if is_root else [(0, Ellipsis, view)], kind="bcast"))
    staging.pipeline(pieces)
    return MPI.REQUEST_NULL


# --------------------------------------------------------------------------- staged reductions


def _staged_reduce(flat: Array, comm: MPI.Comm, staging: Staging, *, root: Optional[int],
                   out: Optional[Array] = None) -> None:
    """Staged allreduce (``root`` None) or reduce of a device ``flat``: per chunk, this rank's
    chunk goes down, the exchange runs on the host, the P slices of this rank's part come back
    and are summed on the device; then this rank's summed part goes down, ``Allgatherv`` (or
    ``Gatherv``) runs on the host and the other ranks' parts come back (to ``root`` only)."""
    xp, size, rank = staging.backend.xp, comm.Get_size(), comm.Get_rank()
    dt, item = flat.dtype, flat.itemsize
    limit = min(staging.chunk_bytes, max_message_bytes())
    step = _balanced_step(item, size, limit)
    rows_dev = xp.empty((size, block_sizes(min(step, flat.size), size)[0]), dtype=dt)
    keep = root is None or rank == root
    pieces = []
    for c0, c1 in _flat_chunks(flat.size, step):
        counts = block_sizes(c1 - c0, size)
        o, mine, n = displacements(counts)[rank], counts[rank], c1 - c0
        part = flat[c0:c1] if root is None else (_root_part(out, c0, c1) if rank == root else
                                                 xp.empty(n, dtype=dt))
        rows = rows_dev[:, :mine]

        def exchange(host: list[np.ndarray], counts: list[int] = counts) -> None:
            _exchange(host[0], host[1], counts, comm, True)

        def assemble(host: list[np.ndarray], counts: list[int] = counts, o: int = o,
                     mine: int = mine) -> None:
            if root is None:
                _spread(host[0], counts, comm, True)
            else:
                _collect(host[0][o:o + mine], host[0], counts, root, comm, True)

        pieces.append(Piece(host=[((n,), dt), ((size, mine), dt)], call=exchange,
                            d2h=[(flat[c0:c1], 0, Ellipsis)], h2d=[(1, Ellipsis, rows)],
                            kind="exchange", then=partial(_sum_rows, rows, part[o:o + mine])))
        back = [(0, slice(0, o), part[:o]), (0, slice(o + mine, n), part[o + mine:])]
        pieces.append(Piece(host=[((n,), dt)], call=assemble,
                            d2h=[(part[o:o + mine], 0, slice(o, o + mine))],
                            h2d=back if keep else [], kind="assemble", depends=True))
    staging.pipeline(pieces)


def _staged_scatter(flat: Array, out: Array, counts: Sequence[int], comm: MPI.Comm,
                    staging: Staging) -> None:
    """Staged reduce-scatter of a device ``flat``: per chunk, the chunk goes down, the exchange
    runs on the host, the slices of this rank's segment come back and are summed on the device
    into ``out``."""
    xp, size, rank = staging.backend.xp, comm.Get_size(), comm.Get_rank()
    dt, starts = flat.dtype, displacements(counts)
    step = max(1, min(staging.chunk_bytes, max_message_bytes()) // (size * flat.itemsize))
    pieces = []
    for c0, c1 in _flat_chunks(flat.size, step):
        seg = [max(0, min(c1, s + n) - max(c0, s)) for s, n in zip(starts, counts)]
        first = max(c0, starts[rank]) - starts[rank]
        rows = xp.empty((size, seg[rank]), dtype=dt)

        def exchange(host: list[np.ndarray], seg: list[int] = seg) -> None:
            _exchange(host[0], host[1], seg, comm, True)

        pieces.append(Piece(
            host=[((c1 - c0,), dt), ((size, seg[rank]), dt)], call=exchange,
            d2h=[(flat[c0:c1], 0, Ellipsis)], h2d=[(1, Ellipsis, rows)], kind="exchange",
            then=partial(_sum_rows, rows, out[first:first + seg[rank]])))
    staging.pipeline(pieces)
