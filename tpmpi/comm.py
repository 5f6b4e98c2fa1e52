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
* Device buffers: the producing stream is synchronised before MPI sees them; without GPU-aware
  MPI they are staged through host buffers (see :class:`Staging`).
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import numpy as np
from mpi4py import MPI
from mpi4py.util import dtlib

from .backend import Backend, backend_of

# --------------------------------------------------------------------------- agreement


def _code(value: Any) -> int:
    return zlib.crc32(repr(value).encode())


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def agree(comm: MPI.Comm, error: Optional[str] = None, **values: Any) -> None:
    """Raise the same ValueError on every rank of ``comm`` if any rank reports ``error`` or any
    keyword value differs between ranks. Collective (one Allreduce of 2(1+len(values)) int64;
    an allgather of the details only on failure).
    """
    if comm.Get_size() == 1:
        if error:
            raise ValueError(error)
        return
    codes = np.array([1 if error else 0] + [_code(v) for v in values.values()], dtype=np.int64)
    both = np.concatenate([codes, -codes])
    comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    n = codes.size
    if both[0] == 0 and np.array_equal(both[1:n], -both[n + 1:]):
        return
    infos = comm.allgather((error, {k: repr(v) for k, v in values.items()}))
    errors: "OrderedDict[str, list[int]]" = OrderedDict()
    for rank, (err, _) in enumerate(infos):
        if err:
            errors.setdefault(err, []).append(rank)
    if errors:
        parts = [f"{msg} ({_ranks(r)})" if len(errors) > 1 or len(r) < len(infos) else msg
                 for msg, r in errors.items()]
        raise ValueError("; ".join(parts))
    for key in values:
        seen: "OrderedDict[str, list[int]]" = OrderedDict()
        for rank, (_, vals) in enumerate(infos):
            seen.setdefault(vals[key], []).append(rank)
        if len(seen) > 1:
            detail = " and ".join(f"{v} on {_ranks(r)}" for v, r in seen.items())
            raise ValueError(f"{key} differs across ranks: {detail}; every rank must pass the "
                             "same value")
    raise AssertionError("agree: inconsistent reduction")  # pragma: no cover


def check(comm: MPI.Comm, local_checks: Callable[[], None], **values: Any) -> None:
    """Run ``local_checks`` (raising ValueError/TypeError on bad input) on every rank, then
    :func:`agree` on its outcome and on ``values``. Collective."""
    error = None
    try:
        local_checks()
    except (ValueError, TypeError) as exc:
        error = str(exc)
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


def _gather_specs(local, out, blocks: Sequence[tuple[tuple, tuple]]):
    """Alltoallw send/recv specs: ``blocks[q] = (starts, shape)`` of rank q's block in ``out``."""
    base = mpi_type(out.dtype)
    nlocal = int(np.prod(local.shape, dtype=np.int64))
    p = len(blocks)
    recv_counts, recv_types = [], []
    for starts, shape in blocks:
        if all(s > 0 for s in shape):
            recv_counts.append(1)
            recv_types.append(_subarray(out.dtype, tuple(out.shape), tuple(starts), tuple(shape)))
        else:
            recv_counts.append(0)
            recv_types.append(base)
    send = (local, [nlocal] * p, [0] * p, [base] * p)
    recv = (out, recv_counts, [0] * p, recv_types)
    return send, recv


def _check_gather_args(local, out, blocks, rank: int) -> None:
    if tuple(local.shape) != tuple(blocks[rank][1]):
        raise ValueError(f"local block shape {tuple(local.shape)} != expected "
                         f"{tuple(blocks[rank][1])} for rank {rank}")
    if local.dtype != out.dtype:
        raise ValueError(f"local dtype {local.dtype} != output dtype {out.dtype}")


def allgather_blocks(local, out, blocks: Sequence[tuple[tuple, tuple]], comm: MPI.Comm,
                     staging: Optional[Staging] = None):
    """Every rank's C-contiguous block into its place of ``out`` (C-ordered, global shape) on
    every rank: one ``Alltoallw`` with subarray receive types. Returns ``out``. Collective.
    Callers validate shapes with :func:`agree` first; here a mismatch is a programming error.
    """
    _check_gather_args(local, out, blocks, comm.Get_rank())
    if staging is not None:
        sbuf, rbuf = staging.send(local, "gather-send"), staging.recv(out, "gather-recv")
    else:
        sbuf, rbuf = local, out
    send, recv = _gather_specs(sbuf, rbuf, blocks)
    comm.Alltoallw(send, recv)
    if staging is not None:
        staging.finish(out, rbuf)
    return out


def iallgather_blocks(local, out, blocks: Sequence[tuple[tuple, tuple]], comm: MPI.Comm
                      ) -> MPI.Request:
    """Non-blocking :func:`allgather_blocks` (``Ialltoallw``) on host or GPU-aware buffers;
    ``local`` and ``out`` must stay alive and untouched until the request completes."""
    _check_gather_args(local, out, blocks, comm.Get_rank())
    send, recv = _gather_specs(local, out, blocks)
    return comm.Ialltoallw(send, recv)


def allreduce(a, comm: MPI.Comm, staging: Optional[Staging] = None):
    """In-place sum of ``a`` over ``comm`` (``Allreduce`` with ``IN_PLACE``). Returns ``a``.
    A dtype without an MPI type (bfloat16) is summed in a float32 copy and cast back."""
    if comm.Get_size() == 1:
        return a
    wide = reduction_dtype(a.dtype)
    if wide != a.dtype:
        a[...] = allreduce(a.astype(wide), comm, staging or Staging(backend_of(a)))
        return a
    buf = staging.recv(staging.send(a, "allreduce"), "allreduce") if staging else a
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    if staging is not None:
        staging.finish(a, buf)
    return a


def iallreduce(a, comm: MPI.Comm) -> MPI.Request:
    """Non-blocking in-place sum of a host or GPU-aware buffer (``Iallreduce``). A dtype summed
    in float32 (see :func:`allreduce`) is reduced at once and a completed request returned."""
    if reduction_dtype(a.dtype) != a.dtype:
        allreduce(a, comm)
        return MPI.REQUEST_NULL
    return comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)


# --------------------------------------------------------------------------- 2D-grid collectives
# Non-blocking forms for host or GPU-aware buffers; with host staging (GPU without GPU-aware
# MPI) they run the blocking collective through the staging buffers and return a completed
# request, so callers have a single code path.


def ibcast(a, root: int, comm: MPI.Comm, staging: Optional[Staging] = None) -> MPI.Request:
    """Broadcast the C-contiguous ``a`` from ``root`` in place (``Ibcast``)."""
    if staging is None or not staging.staged:
        if staging is not None:
            staging.send(a)  # stream sync only
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
    if staging is None or not staging.staged:
        if staging is not None:
            staging.send(a)
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
    if staging is None or not staging.staged:
        if staging is not None:
            staging.send(a)
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
