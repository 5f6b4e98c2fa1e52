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
* One dispatch (:func:`_dispatch`) for all of them: MPI's own call per chunk where MPI may use
  the buffers and handles the dtype as tpmpi would; otherwise the collective as
  :class:`~tpmpi.core.staging.Piece` s, one MPI call each (the exchange of slices is written once,
  :func:`_exchange_pieces`), run on the buffers themselves as a :class:`Chain` of non-blocking
  calls or, for device buffers without GPU-aware MPI, pipelined by
  :class:`~tpmpi.core.staging.Staging` through pinned host memory (double-buffered chunks, only
  this rank's data down, only what it needs back, staged reductions summed on the device). The
  stream is synchronised before MPI sees a device buffer.
* Helpers are named after the MPI call they make (:func:`_alltoallv`, :func:`_allgatherv`,
  :func:`_gatherv`, :func:`_bcast`); datatypes and the gathers' argument plans are
  :mod:`tpmpi.core.datatypes`.
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
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, Callable, Optional, Union

from mpi4py import MPI

from .agreement import max_message_bytes
from .arrays import Array
from .backend import backend_of
from .cache import comm_cache
from .datatypes import Block, alltoallw_args, as_words, mpi_type, reduction_dtype, row_window
from .dtypes import HALF
from .partition import block_sizes, displacements
from .staging import Buffer, Piece, Staging

__all__ = ["polite_barrier", "first_ranks", "Staging", "chunks", "Requests", "Chain", "Request",
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


# --------------------------------------------------------------------------- requests

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


def _split_without_topology(comm: MPI.Comm) -> MPI.Comm:
    """``comm``, or for a communicator with a topology a ``Split`` of it without one (same
    ranks and order), created collectively at first use and freed with ``comm``
    (:func:`~tpmpi.core.cache.comm_cache`). See the module docstring (Open MPI 4.1's
    ``Ialltoallw``)."""
    if comm.Get_topology() == MPI.UNDEFINED:
        return comm
    cache = comm_cache(comm)
    if "without_topology" not in cache:
        cache["without_topology"] = comm.Split(0, comm.Get_rank())
    return cache["without_topology"]


# --------------------------------------------------------------------------- gathers

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


def _alltoallw_rows(bufs: list, blocking: bool, blocks: Sequence[Block], rank: int,
                    comm: MPI.Comm) -> None:
    """The ``Alltoallw`` calls of one staged row window: ``bufs`` = (this rank's rows, the
    window's rows of the output); always blocking (staged pieces are)."""
    for send, recv in alltoallw_args(bufs[0], bufs[1], blocks, rank):
        comm.Alltoallw(send, recv)


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
    step = max(1, staging.chunk_bytes // max(out.itemsize * math.prod(out.shape[1:]), 1))
    pieces = []
    for r0 in range(0, out.shape[0], step):
        rows, clipped = row_window(blocks, rank, r0, min(r0 + step, out.shape[0]))
        pieces.append(Piece([Buffer(local[rows], down=Ellipsis),
                             Buffer(out[r0:r0 + step], up=[Ellipsis])],
                            partial(_alltoallw_rows, blocks=clipped, rank=rank, comm=comm),
                            kind="gather"))
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
    plain = _split_without_topology(comm)
    return _group([plain.Ialltoallw(send, recv)
                   for send, recv in alltoallw_args(local, out, blocks, rank)])


# --------------------------------------------------------------------------- reductions

def _flat(a: Array) -> Array:
    """A 1D view of C-contiguous ``a`` (a reshape copy would lose the in-place result)."""
    if not a.flags.c_contiguous:
        raise ValueError("in-place reductions need a C-contiguous buffer")
    return a.reshape(-1)


def _sum_rows(rows: Array, dest: Array) -> None:
    """``dest = rows[0] + rows[1] + ...`` accumulated in :func:`reduction_dtype` in rank order
    and rounded once; ``rows`` and ``dest`` on one backend (vectorised: NumPy or CuPy)."""
    if rows.shape[0] == 0 or dest.size == 0:
        return
    acc = rows[0].astype(reduction_dtype(dest.dtype))
    for q in range(1, rows.shape[0]):
        acc += rows[q]
    dest[...] = acc


def _alltoallv(bufs: list, blocking: bool, counts: Sequence[int], comm: MPI.Comm
               ) -> Optional[MPI.Request]:
    """``Alltoallv`` of slices: ``counts[q]`` consecutive elements of ``bufs[0]`` go to rank q;
    ``bufs[1]`` (P, counts[rank]) gets row p from rank p."""
    send, recv = bufs
    size, mine = comm.Get_size(), recv.shape[1]
    args = ([as_words(send), list(counts), displacements(counts), mpi_type(send.dtype)],
            [as_words(recv), [mine] * size, [q * mine for q in range(size)],
             mpi_type(recv.dtype)])
    if blocking:
        comm.Alltoallv(*args)
        return None
    return comm.Ialltoallv(*args)


def _allgatherv(bufs: list, blocking: bool, counts: Sequence[int], comm: MPI.Comm
                ) -> Optional[MPI.Request]:
    """In-place ``Allgatherv`` of ``bufs[0]``: rank q's ``counts[q]`` elements, already at their
    place, reach every rank."""
    spec = [as_words(bufs[0]), list(counts), displacements(counts), mpi_type(bufs[0].dtype)]
    if blocking:
        comm.Allgatherv(MPI.IN_PLACE, spec)
        return None
    return comm.Iallgatherv(MPI.IN_PLACE, spec)


def _gatherv(bufs: list, blocking: bool, counts: Sequence[int], root: int, comm: MPI.Comm
             ) -> Optional[MPI.Request]:
    """``Gatherv`` into ``bufs[0]`` on ``root`` (in place there) of every rank's ``counts[q]``
    elements at their place of its ``bufs[0]``."""
    part, rank = bufs[0], comm.Get_rank()
    send: Any
    recv: Any
    if rank == root:
        send = MPI.IN_PLACE
        recv = [as_words(part), list(counts), displacements(counts), mpi_type(part.dtype)]
    else:
        o = displacements(counts)[rank]
        send, recv = [as_words(part[o:o + counts[rank]]), mpi_type(part.dtype)], None
    if blocking:
        comm.Gatherv(send, recv, root=root)
        return None
    return comm.Igatherv(send, recv, root=root)


def _within(c0: int, c1: int, starts: Sequence[int], counts: Sequence[int]) -> list[int]:
    """How many elements of each segment (``counts[q]`` elements from ``starts[q]``) lie in
    the chunk ``[c0, c1)``."""
    return [max(0, min(c1, s + n) - max(c0, s)) for s, n in zip(starts, counts)]


def _exchange_pieces(flat: Array, comm: MPI.Comm, limit: int, *, root: Optional[int] = None,
                     out: Optional[Array] = None, segments: Optional[Sequence[int]] = None
                     ) -> list[Piece]:
    """The exchange of slices (see the module docstring) summing ``flat`` over ``comm``, as
    pieces of one MPI call each, no call over ``limit`` bytes. Per chunk: ``Alltoallv`` gives
    this rank the P slices of its part, which it sums; then

    * ``segments`` (reduce-scatter): rank q's part of a chunk is what of its segment
      (``segments[q]`` elements, in rank order) lies in it, summed into ``out``; nothing more;
    * else the chunk is split evenly, each rank's sum lands at its place of the chunk's result:
      ``flat`` itself, assembled on every rank by ``Allgatherv`` (``root`` None: allreduce), or
      ``out`` on ``root``, assembled there by ``Gatherv`` (reduce)."""
    xp, size, rank = backend_of(flat).xp, comm.Get_size(), comm.Get_rank()
    n, step = flat.size, max(1, limit // (size * flat.itemsize))
    if segments is None:
        step *= size
    spans = [(c, min(c + step, n)) for c in range(0, n, step)]
    starts = displacements(segments) if segments is not None else []
    counts = [block_sizes(c1 - c0, size) if segments is None else
              _within(c0, c1, starts, segments) for c0, c1 in spans]
    rows_all = xp.empty(size * max((c[rank] for c in counts), default=0), dtype=flat.dtype)
    elsewhere = segments is None and root is not None and rank != root
    if elsewhere:  # a reduce off its root: each chunk's sum in turn, in one scratch array
        results = xp.empty(min(step, n), dtype=flat.dtype)
    elif segments is None and root is None:  # allreduce: in place
        results = flat
    else:
        assert out is not None  # the root of a reduce, every rank of a reduce-scatter
        results = out
    pieces = []
    for (c0, c1), cnt in zip(spans, counts):
        o, mine = displacements(cnt)[rank], cnt[rank]
        rows = rows_all[:size * mine].reshape(size, mine)
        result = None
        if segments is not None:
            first = max(c0, starts[rank]) - starts[rank]
            dest = results[first:first + mine]
        else:
            lo = 0 if elsewhere else c0
            result = results[lo:lo + c1 - c0]
            dest = result[o:o + mine]
        pieces.append(Piece([Buffer(flat[c0:c1], down=Ellipsis), Buffer(rows, up=[Ellipsis])],
                            partial(_alltoallv, counts=cnt, comm=comm), kind="exchange",
                            then=partial(_sum_rows, rows, dest)))
        if result is not None:
            back = [slice(0, o), slice(o + mine, c1 - c0)] if root in (None, rank) else []
            assemble = partial(_allgatherv, counts=cnt, comm=comm) if root is None else \
                partial(_gatherv, counts=cnt, root=root, comm=comm)
            pieces.append(Piece([Buffer(result, down=slice(o, o + mine), up=back)], assemble,
                                kind="assemble", depends=True))
    return pieces


def _in_turn(pieces: Sequence[Piece], sync: Callable[[], None]) -> Iterator[list]:
    """Steps (see :class:`Chain`) running ``pieces`` on their own buffers, one non-blocking
    call each; the stream is synchronised before the first call and after each piece's device
    work (before MPI reads what it wrote)."""
    sync()
    for p in pieces:
        yield [p.call([b.home for b in p.buffers], False)]
        if p.then is not None:
            p.then()
            sync()


def _dispatch(a: Array, staging: Optional[Staging], blocking: bool,
              native: Callable[[bool], list], pieces: Callable[[int], list[Piece]], *,
              words: bool = False) -> Request:
    """The one dispatch of the flat collectives. Host or GPU-aware buffers of a dtype MPI
    handles as tpmpi would (every dtype when the collective only moves ``words``; not the
    2-byte floats for a sum): ``native(blocking)``, MPI's own call per flat chunk. Otherwise
    ``pieces(limit)`` (the exchange of slices, or a broadcast's chunks): pipelined through
    pinned host memory for staged device buffers (done on return), else run in turn as a
    :class:`Chain` of non-blocking calls (done on return when ``blocking``)."""
    if (words or a.dtype.name not in HALF) and (staging is None or staging.direct()):
        return _group(native(blocking))
    if staging is not None and staging.staged:
        staging.pipeline(pieces(min(staging.chunk_bytes, max_message_bytes())))
        return MPI.REQUEST_NULL
    sync = (staging.backend if staging is not None else backend_of(a)).synchronize
    chain = Chain(_in_turn(pieces(max_message_bytes()), sync))
    if blocking:
        chain.Wait()
        return MPI.REQUEST_NULL
    return chain


def allreduce(a: Array, comm: MPI.Comm, staging: Optional[Staging] = None) -> Array:
    """In-place sum of C-contiguous ``a`` over ``comm``. Returns ``a``. float32/float64 on host
    or GPU-aware buffers: ``Allreduce`` per flat chunk; float16/bfloat16 and staged device
    buffers: exchange of slices, float32 (or the dtype's) sum, ``Allgatherv`` (see the module
    docstring)."""
    if comm.Get_size() == 1:
        return a
    flat = _flat(a)

    def native(_: bool) -> list:
        for part in chunks(flat.size, flat.itemsize):
            comm.Allreduce(MPI.IN_PLACE, flat[part], op=MPI.SUM)
        return []

    _dispatch(a, staging, True, native, partial(_exchange_pieces, flat, comm))
    return a


def iallreduce(a: Array, comm: MPI.Comm) -> Request:
    """Non-blocking in-place sum of a C-contiguous host or GPU-aware buffer: ``Iallreduce`` per
    flat chunk, or for float16/bfloat16 a :class:`Chain` (the slice exchange is in flight now;
    the sum and the ``Iallgatherv`` follow inside ``Wait()``)."""
    if comm.Get_size() == 1:
        return MPI.REQUEST_NULL
    flat = _flat(a)
    return _dispatch(a, None, False,
                     lambda _: [comm.Iallreduce(MPI.IN_PLACE, flat[part], op=MPI.SUM)
                                for part in chunks(flat.size, flat.itemsize)],
                     partial(_exchange_pieces, flat, comm))


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
    out_flat = _flat(out) if rank == root and out is not None else None

    def native(_blocking: bool) -> list:
        return [comm.Ireduce(flat[part], out_flat[part] if out_flat is not None else None,
                             op=MPI.SUM, root=root)
                for part in chunks(flat.size, flat.itemsize)]

    return _dispatch(a, staging, False, native,
                     partial(_exchange_pieces, flat, comm, root=root, out=out_flat))


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
    starts = displacements(counts)

    def native(_blocking: bool) -> list:
        requests = []
        for part in chunks(flat.size, flat.itemsize):
            seg = _within(part.start, part.stop, starts, counts)
            first = max(part.start, starts[rank]) - starts[rank]
            requests.append(comm.Ireduce_scatter(flat[part], out_flat[first:first + seg[rank]],
                                                 seg, op=MPI.SUM))
        return requests

    return _dispatch(a, staging, False, native,
                     partial(_exchange_pieces, flat, comm, out=out_flat, segments=counts))


def reduce_scatter(a: Array, out: Array, counts: Sequence[int], comm: MPI.Comm,
                   staging: Optional[Staging] = None) -> Array:
    """Blocking :func:`ireduce_scatter`. Returns ``out``."""
    ireduce_scatter(a, out, counts, comm, staging).Wait()
    return out


def _bcast(bufs: list, blocking: bool, root: int, comm: MPI.Comm) -> Optional[MPI.Request]:
    """``Bcast`` of ``bufs[0]`` from ``root``."""
    if blocking:
        comm.Bcast(as_words(bufs[0]), root=root)
        return None
    return comm.Ibcast(as_words(bufs[0]), root=root)


def ibcast(a: Array, root: int, comm: MPI.Comm, staging: Optional[Staging] = None) -> Request:
    """Broadcast the C-contiguous ``a`` from ``root`` in place: ``Ibcast`` per flat chunk.
    Staged device buffers run it blocking (chunks pipelined) and return a completed request."""
    if comm.Get_size() == 1:
        return MPI.REQUEST_NULL
    flat, is_root = _flat(a), comm.Get_rank() == root

    def native(_blocking: bool) -> list:
        return [_bcast([flat[part]], False, root, comm)
                for part in chunks(flat.size, flat.itemsize)]

    def pieces(limit: int) -> list[Piece]:
        return [Piece([Buffer(flat[part], down=Ellipsis if is_root else None,
                              up=[] if is_root else [Ellipsis])],
                      partial(_bcast, root=root, comm=comm), kind="bcast")
                for part in chunks(flat.size, flat.itemsize, limit)]

    return _dispatch(a, staging, False, native, pieces, words=True)
