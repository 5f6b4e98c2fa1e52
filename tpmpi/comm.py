"""Collectives on backend arrays, every MPI call visible.

* :func:`agree` — collective argument validation: one small Allreduce decides whether any rank
  saw an error or a differing argument; only then are details gathered, and the same
  ValueError is raised on every rank before any collective that could block.
* :func:`allgather_blocks` / :func:`iallgather_blocks` — every rank's block lands directly in its
  final place of a C-ordered global array: one ``Alltoallw`` whose receive types are
  ``Create_subarray`` types (the mpi4py-fft idiom). This serves all layouts ("cols", "rows",
  "tiles"), handles uneven and zero-size blocks, and needs no full-size staging copy or
  transpose: MPI unpacks each incoming block straight into its strided destination.
* :func:`allreduce` / :func:`iallreduce` — in-place sums. float16 uses the MPI library's half
  type (MPICH ``MPIX_C_FLOAT16``); bfloat16, which MPI has no type for, moves as 16-bit
  integers and is summed in float32 (:func:`reduction_dtype`).
* Large messages: no single MPI call carries more than :func:`max_message_bytes` (default
  2**30, env ``TPMPI_MAX_MESSAGE_BYTES``): gathers are split into row chunks of the output,
  reductions into flat chunks, so counts, displacements and subarray types stay far below
  2**31 whatever the array size. Results are identical to the unsplit call.
* Device buffers: the producing stream is synchronised before MPI sees them; without GPU-aware
  MPI they are staged through host buffers (see :class:`Staging`).
"""
from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from .backend import Backend, backend_of

# --------------------------------------------------------------------------- agreement


class Same:
    """A value for :func:`agree` with its own ending of the mismatch message, e.g.
    ``Same(call, "every rank must call the same layers in the same order")``."""

    __slots__ = ("value", "must")

    def __init__(self, value: Any, must: str):
        self.value, self.must = value, must


class Text(str):
    """A string :func:`agree` reports without quotes (e.g. a call's description)."""

    def __repr__(self) -> str:
        return str(self)


SAME_VALUE = "every rank must pass the same value"
CALL_ORDER = "every rank must make the same tpmpi calls in the same order (each is collective)"


_PLAIN = (int, str, float, bool, type(None), Text)


def normalise(value: Any) -> Any:
    """``value`` in the form :func:`agree` compares: NumPy scalars as Python numbers
    (``np.int64(3)`` equals ``3``), dtypes by name, lists and tuples as tuples, mappings with
    sorted keys."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, Same):
        return normalise(value.value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, (list, tuple)):
        return tuple(normalise(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), normalise(v)) for k, v in value.items()))
    return value


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def _groups(pairs) -> "OrderedDict[Any, list[int]]":
    """``value -> ranks`` in order of first appearance, from ``(rank, value)`` pairs."""
    out: "OrderedDict[Any, list[int]]" = OrderedDict()
    for rank, value in pairs:
        out.setdefault(value, []).append(rank)
    return out


def _mismatch(infos: list) -> str:
    """The message for the gathered ``(error, [(key, text, must), ...])`` of every rank: a
    differing ``call`` first, then reported errors, then the first differing value.
    Deterministic in ``infos``, hence the same on every rank."""
    table = [{key: (text, must) for key, text, must in fields} for _, fields in infos]
    keys = list(OrderedDict.fromkeys(k for fields in table for k in fields))

    def differs(key: str) -> Optional[str]:
        seen = _groups((r, t[key][0] if key in t else "(another call)")
                       for r, t in enumerate(table))
        if len(seen) == 1:
            return None
        must = next(t[key][1] for t in table if key in t)
        detail = " and ".join(f"{v} on {_ranks(r)}" for v, r in seen.items())
        return f"{key} differs across ranks: {detail}; {must}"

    if "call" in keys and differs("call"):
        return differs("call")
    errors = _groups((r, err) for r, (err, _) in enumerate(infos) if err)
    if errors:
        return "; ".join(f"{msg} ({_ranks(r)})" if len(errors) > 1 or len(r) < len(infos)
                         else msg for msg, r in errors.items())
    found = [msg for msg in map(differs, keys) if msg]
    return found[0] if found else "the ranks are in different calls"


def agree(comm: MPI.Comm, error: Optional[str] = None, **values: Any) -> None:
    """Raise the same ValueError on every rank of ``comm`` if any rank reports ``error`` or any
    keyword value differs between ranks (compared after :func:`normalise`; a :class:`Same`
    value ends the message with its own words). Collective: one Allreduce of 3 int64 whatever
    the values, so any two agreements match each other (a rank in another tpmpi call is
    reported, not left hanging); an allgather of the details only on failure. A ``call`` value
    (which operation this is) is reported before the others.
    """
    if comm == MPI.COMM_NULL:
        raise ValueError("the communicator is MPI.COMM_NULL (freed, e.g. by grid.free(), or "
                         "this rank is outside it): expected a live communicator")
    if comm.Get_size() == 1:
        if error:
            raise ValueError(error)
        return
    fields = [(key, repr(normalise(v)), v.must if isinstance(v, Same) else SAME_VALUE)
              for key, v in values.items()]
    text = repr([(k, t) for k, t, _ in fields]).encode()
    code = zlib.crc32(text) << 30 | zlib.adler32(text) >> 2  # 62 bits, the same on every rank
    both = np.array([1 if error else 0, code, -code], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    if both[0] == 0 and both[1] == -both[2]:
        return
    raise ValueError(_mismatch(comm.allgather((error, fields))))


def check(comm: MPI.Comm, local_checks: Callable[[], None], **values: Any) -> None:
    """Run ``local_checks`` on every rank, then :func:`agree` on its outcome and on ``values``.
    Collective. Any exception of ``local_checks`` becomes the agreed ValueError (others than
    ValueError/TypeError prefixed by their type), so no rank leaves while others wait."""
    error = None
    try:
        local_checks()
    except (ValueError, TypeError) as exc:
        error = str(exc)
    except Exception as exc:  # e.g. AttributeError from a non-array argument on one rank
        error = f"{type(exc).__name__}: {exc}"
    agree(comm, error, **values)


def polite_barrier(comm: MPI.Comm, interval: float = 1e-3) -> None:
    """Barrier that sleeps between polls (``Ibarrier`` + ``Test``), so that waiting ranks leave
    the cores to the ranks that work (MPI's blocking calls busy-poll)."""
    import time

    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(interval)


# --------------------------------------------------------------------------- staging


class Staging:
    """Hands backend arrays to MPI.

    NumPy arrays (and device arrays under GPU-aware MPI) go to MPI as they are, after the
    stream is synchronised. Otherwise device arrays are copied to pinned host buffers that are
    kept (one per role, shape and dtype) and reused across calls, and received data is copied
    back. Only :class:`~tpmpi.backend.Backend` methods touch the arrays, so the staging logic
    runs (and is tested) with any backend whose ``is_gpu`` is True.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.staged = backend.is_gpu and not backend.gpu_aware
        self._pinned: dict[tuple, np.ndarray] = {}

    def host_buffer(self, role: str, shape: tuple, dtype) -> np.ndarray:
        """A reusable pinned host array for ``role`` (device staging only)."""
        key = (role, tuple(shape), np.dtype(dtype).name)
        buf = self._pinned.get(key)
        if buf is None:
            buf = self._pinned[key] = self.backend.pinned_empty(tuple(shape), dtype)
        return buf

    def direct(self) -> bool:
        """Synchronise the stream; True when MPI may use the arrays themselves (no staging)."""
        self.backend.synchronize()
        return not self.staged

    def send(self, a, role: str = "send"):
        """A buffer MPI may read with the contents of ``a``."""
        if self.backend.is_gpu:
            self.backend.synchronize()
            if self.staged:
                host = self.host_buffer(role, a.shape, a.dtype)
                self.backend.copy_to_host(a, host)
                return host
        return a

    def recv(self, a, role: str = "recv"):
        """A buffer MPI may write; call :meth:`finish` with it after the MPI call."""
        if self.backend.is_gpu:
            self.backend.synchronize()
            if self.staged:
                return self.host_buffer(role, a.shape, a.dtype)
        return a

    def finish(self, device, host) -> None:
        """Copy received host data back into the device array (staging only)."""
        if host is not device:
            self.backend.copy_from_host(host, device)


# --------------------------------------------------------------------------- message size

MAX_MESSAGE_BYTES: int = 2**30
"""Largest payload of one MPI call; bigger collectives are split (env TPMPI_MAX_MESSAGE_BYTES
overrides). Every rank must use the same value: layers agree on it with their inputs."""


def max_message_bytes() -> int:
    """The chunk limit in bytes in force now (env ``TPMPI_MAX_MESSAGE_BYTES``, else
    :data:`MAX_MESSAGE_BYTES`)."""
    env = os.environ.get("TPMPI_MAX_MESSAGE_BYTES")
    limit = int(env) if env else int(MAX_MESSAGE_BYTES)
    if limit < 1:
        raise ValueError(f"max message bytes={limit}: expected a positive integer")
    return limit


def chunks(n: int, item_bytes: int, limit: Optional[int] = None) -> list[slice]:
    """Consecutive slices covering ``range(n)``, each of at most ``limit`` bytes (default
    :func:`max_message_bytes`) but at least one item of ``item_bytes``; ``[0:0]`` when n == 0."""
    step = max(1, (limit or max_message_bytes()) // max(1, item_bytes))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


class Requests:
    """The requests of a chunked non-blocking collective, completed together."""

    def __init__(self, requests: Sequence[MPI.Request]):
        self.requests = list(requests)

    def Wait(self) -> None:  # noqa: N802 (mpi4py's spelling)
        MPI.Request.Waitall(self.requests)

    def Test(self) -> bool:  # noqa: N802
        return MPI.Request.Testall(self.requests)


def _one_or_group(requests: list[MPI.Request]) -> "MPI.Request | Requests":
    return requests[0] if len(requests) == 1 else Requests(requests)


# --------------------------------------------------------------------------- datatypes

_TYPE_CACHE: "OrderedDict[tuple, MPI.Datatype]" = OrderedDict()
_TYPE_CACHE_SIZE = 256


def mpi_type(dtype) -> MPI.Datatype:
    """The predefined MPI datatype that moves ``dtype`` (float16: the MPI library's extension
    type, e.g. MPICH's ``MPIX_C_FLOAT16``). A dtype MPI has no type for (bfloat16, or float16 on
    a library without the extension) moves as the unsigned integer of its size: right for
    copies, not for sums (see :func:`reduction_dtype`)."""
    dt = np.dtype(dtype)
    try:
        return dtlib.from_numpy_dtype(dt)
    except ValueError:
        return dtlib.from_numpy_dtype(np.dtype(f"u{dt.itemsize}"))


def reduction_dtype(dtype) -> np.dtype:
    """The dtype in which MPI sums ``dtype``: itself when MPI has a type for it, else float32
    (bfloat16 always; float16 on MPI libraries without a half-precision type)."""
    dt = np.dtype(dtype)
    try:
        dtlib.from_numpy_dtype(dt)
        return dt
    except ValueError:
        return np.dtype(np.float32)


def _subarray(dtype, global_shape: tuple, starts: tuple, shape: tuple) -> MPI.Datatype:
    """Committed subarray type of block ``shape`` at ``starts`` in C-ordered ``global_shape``;
    cached (types depend only on these numbers, not on a communicator)."""
    key = (np.dtype(dtype).name, global_shape, starts, shape)
    dt = _TYPE_CACHE.get(key)
    if dt is None:
        dt = mpi_type(dtype).Create_subarray(list(global_shape), list(shape), list(starts),
                                             order=MPI.ORDER_C).Commit()
        _TYPE_CACHE[key] = dt
        if len(_TYPE_CACHE) > _TYPE_CACHE_SIZE:
            _TYPE_CACHE.popitem(last=False)[1].Free()
    else:
        _TYPE_CACHE.move_to_end(key)
    return dt


_SPEC_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_SPEC_CACHE_SIZE = 64


def _recv_spec(dtype, global_shape: tuple, blocks: tuple) -> tuple[list, list, list, list]:
    """Receive counts and types, zero displacements and send types of a gather into
    ``global_shape``, cached per gather (a repeated forward then costs one dict lookup).
    Entries own duplicates of the subarray types, so an eviction from the per-type cache
    cannot free them."""
    key = (np.dtype(dtype).str, global_shape, blocks)
    spec = _SPEC_CACHE.get(key)
    if spec is not None:
        _SPEC_CACHE.move_to_end(key)
        return spec
    base = mpi_type(dtype)
    counts = [1 if all(s > 0 for s in shape) else 0 for _, shape in blocks]
    types = [_subarray(dtype, global_shape, tuple(starts), tuple(shape)).Dup() if c else base
             for c, (starts, shape) in zip(counts, blocks)]
    spec = _SPEC_CACHE[key] = (counts, types, [0] * len(blocks), [base] * len(blocks))
    if len(_SPEC_CACHE) > _SPEC_CACHE_SIZE:
        for dt in _SPEC_CACHE.popitem(last=False)[1][1]:
            if not dt.is_predefined:
                dt.Free()
    return spec


def _gather_specs(local, out, blocks: Sequence[tuple[tuple, tuple]]):
    """Alltoallw send/recv specs: ``blocks[q] = (starts, shape)`` of rank q's block in ``out``."""
    counts, types, zeros, base = _recv_spec(out.dtype, out.shape, tuple(blocks))
    return (local, [local.size] * len(blocks), zeros, base), (out, counts, zeros, types)


def _check_gather_args(local, out, blocks, rank: int) -> None:
    if tuple(local.shape) != tuple(blocks[rank][1]):
        raise ValueError(f"local block shape {tuple(local.shape)} != expected "
                         f"{tuple(blocks[rank][1])} for rank {rank}")
    if local.dtype != out.dtype:
        raise ValueError(f"local dtype {local.dtype} != output dtype {out.dtype}")


def _row_pieces(local, out, blocks: Sequence[tuple[tuple, tuple]], rank: int):
    """``(local rows, out rows, blocks within them)`` per row chunk of ``out`` of at most
    :func:`max_message_bytes`; the whole call as one piece when it fits. Views, no copies."""
    if out.ndim == 0 or out.nbytes <= max_message_bytes():
        return [(local, out, blocks)]
    row_bytes = out.itemsize * math.prod(out.shape[1:])
    pieces = []
    for rows in chunks(out.shape[0], row_bytes):
        piece_blocks = []
        for starts, shape in blocks:
            first = max(rows.start, starts[0])
            stop = max(first, min(rows.stop, starts[0] + shape[0]))
            piece_blocks.append(((first - rows.start,) + tuple(starts[1:]),
                                 (stop - first,) + tuple(shape[1:])))
        (s0, *_), _ = blocks[rank]
        first = piece_blocks[rank][0][0] + rows.start - s0
        pieces.append((local[first:first + piece_blocks[rank][1][0]], out[rows], piece_blocks))
    return pieces


def allgather_blocks(local, out, blocks: Sequence[tuple[tuple, tuple]], comm: MPI.Comm,
                     staging: Optional[Staging] = None):
    """Every rank's C-contiguous block into its place of ``out`` (C-ordered, global shape) on
    every rank: one ``Alltoallw`` with subarray receive types per row chunk of at most
    :func:`max_message_bytes` (one in all when it fits). Returns ``out``. Collective.
    Callers validate shapes with :func:`agree` first; here a mismatch is a programming error.
    """
    _check_gather_args(local, out, blocks, comm.Get_rank())
    if staging is not None:
        sbuf, rbuf = staging.send(local, "gather-send"), staging.recv(out, "gather-recv")
    else:
        sbuf, rbuf = local, out
    for piece_local, piece_out, piece_blocks in _row_pieces(sbuf, rbuf, blocks, comm.Get_rank()):
        comm.Alltoallw(*_gather_specs(piece_local, piece_out, piece_blocks))
    if staging is not None:
        staging.finish(out, rbuf)
    return out


def iallgather_blocks(local, out, blocks: Sequence[tuple[tuple, tuple]], comm: MPI.Comm
                      ) -> "MPI.Request | Requests":
    """Non-blocking :func:`allgather_blocks` (``Ialltoallw`` per row chunk) on host or GPU-aware
    buffers; ``local`` and ``out`` must stay alive and untouched until ``Wait()`` returns."""
    _check_gather_args(local, out, blocks, comm.Get_rank())
    return _one_or_group([comm.Ialltoallw(*_gather_specs(*piece)) for piece in
                          _row_pieces(local, out, blocks, comm.Get_rank())])


def _flat(a):
    """A 1D view of C-contiguous ``a`` (a reshape copy would lose the in-place result)."""
    if not a.flags.c_contiguous:
        raise ValueError("in-place reductions need a C-contiguous buffer")
    return a.reshape(-1)


def allreduce(a, comm: MPI.Comm, staging: Optional[Staging] = None):
    """In-place sum of C-contiguous ``a`` over ``comm`` (``Allreduce`` with ``IN_PLACE`` per flat
    chunk of at most :func:`max_message_bytes`). Returns ``a``. A dtype without an MPI type
    (bfloat16) is summed in a float32 copy and cast back."""
    if comm.Get_size() == 1:
        return a
    wide = reduction_dtype(a.dtype)
    if wide != a.dtype:
        a[...] = allreduce(a.astype(wide), comm, staging or Staging(backend_of(a)))
        return a
    buf = staging.recv(staging.send(a, "allreduce"), "allreduce") if staging else a
    flat = _flat(buf)
    for part in chunks(flat.size, flat.itemsize):
        comm.Allreduce(MPI.IN_PLACE, flat[part], op=MPI.SUM)
    if staging is not None:
        staging.finish(a, buf)
    return a


def iallreduce(a, comm: MPI.Comm) -> "MPI.Request | Requests":
    """Non-blocking in-place sum of a C-contiguous host or GPU-aware buffer (``Iallreduce`` per
    flat chunk of at most :func:`max_message_bytes`). A dtype summed in float32 (see
    :func:`allreduce`) is reduced at once and a completed request returned."""
    if reduction_dtype(a.dtype) != a.dtype:
        allreduce(a, comm)
        return MPI.REQUEST_NULL
    flat = _flat(a)
    return _one_or_group([comm.Iallreduce(MPI.IN_PLACE, flat[part], op=MPI.SUM)
                          for part in chunks(flat.size, flat.itemsize)])


# --------------------------------------------------------------------------- 2D-grid collectives
# Non-blocking forms for host or GPU-aware buffers; with host staging (GPU without GPU-aware
# MPI) they run the blocking collective through the staging buffers and return a completed
# request, so callers have a single code path.


def ibcast(a, root: int, comm: MPI.Comm, staging: Optional[Staging] = None) -> MPI.Request:
    """Broadcast the C-contiguous ``a`` from ``root`` in place (``Ibcast``)."""
    if staging is None or staging.direct():
        return comm.Ibcast(a, root=root)
    buf = staging.send(a, "bcast") if comm.Get_rank() == root else staging.recv(a, "bcast")
    comm.Bcast(buf, root=root)
    staging.finish(a, buf)
    return MPI.REQUEST_NULL


def ireduce(a, out, root: int, comm: MPI.Comm, staging: Optional[Staging] = None
            ) -> MPI.Request:
    """Sum of ``a`` over ``comm`` into ``out`` on ``root`` (``Ireduce``; ``out`` is ignored
    elsewhere and may be None there)."""
    recv = out if comm.Get_rank() == root else None
    if staging is None or staging.direct():
        return comm.Ireduce(a, recv, op=MPI.SUM, root=root)
    rbuf = staging.recv(recv, "reduce-recv") if recv is not None else None
    comm.Reduce(staging.send(a, "reduce-send"), rbuf, op=MPI.SUM, root=root)
    if recv is not None:
        staging.finish(recv, rbuf)
    return MPI.REQUEST_NULL


def ireduce_scatter(a, out, counts: Sequence[int], comm: MPI.Comm,
                    staging: Optional[Staging] = None) -> MPI.Request:
    """Sum ``a`` over ``comm`` and scatter it: rank ``q`` gets elements
    ``[sum(counts[:q]), sum(counts[:q+1]))`` of the flattened sum in ``out``
    (``Ireduce_scatter`` with counts: uneven and zero-size blocks work). For the leading-axis
    blocks of a C-ordered array pass them as they are; column blocks must be packed first."""
    counts = [int(c) for c in counts]
    if staging is None or staging.direct():
        return comm.Ireduce_scatter(a, out, counts, op=MPI.SUM)
    rbuf = staging.recv(out, "rs-recv")
    comm.Reduce_scatter(staging.send(a, "rs-send"), rbuf, counts, op=MPI.SUM)
    staging.finish(out, rbuf)
    return MPI.REQUEST_NULL


def reduce_scatter(a, out, counts: Sequence[int], comm: MPI.Comm,
                   staging: Optional[Staging] = None):
    """Blocking :func:`ireduce_scatter`. Returns ``out``."""
    ireduce_scatter(a, out, counts, comm, staging).Wait()
    return out
