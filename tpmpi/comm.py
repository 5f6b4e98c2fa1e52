"""Collectives on backend arrays, every MPI call visible.

* :func:`agree` — collective argument validation: one small Allreduce decides whether any rank
  saw an error or a differing argument; only then are details gathered, and the same
  ValueError is raised on every rank before any collective that could block.
* :func:`allgather_blocks` / :func:`iallgather_blocks` — every rank's block lands directly in its
  final place of a C-ordered global array: one ``Alltoallw`` whose receive types are
  ``Create_subarray`` types (the mpi4py-fft idiom). This serves all layouts ("cols", "rows",
  "tiles"), handles uneven and zero-size blocks, and needs no full-size staging copy or
  transpose: MPI unpacks each incoming block straight into its strided destination.
* :func:`allreduce` / :func:`iallreduce` — in-place sums.
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

from .backend import Backend

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
    codes = [1 if error else 0] + [_code(v) for v in values.values()]
    both = np.array(codes + [-c for c in codes], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    n = len(codes)
    top = both.tolist()
    if top[0] == 0 and top[1:n] == [-c for c in top[n + 1:]]:
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
    kept (one per role and size) and reused across calls, and received data is copied back.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self.staged = backend.is_gpu and not backend.gpu_aware
        self._pinned: dict[tuple, np.ndarray] = {}

    def host_buffer(self, role: str, shape: tuple, dtype) -> np.ndarray:
        """A reusable pinned host array for ``role`` (device staging only)."""
        key = (role, tuple(shape), np.dtype(dtype).str)
        buf = self._pinned.get(key)
        if buf is None:
            import cupyx

            buf = cupyx.empty_pinned(shape, dtype=dtype)
            self._pinned[key] = buf
        return buf

    def send(self, a, role: str = "send"):
        """A buffer MPI may read with the contents of ``a``."""
        if self.backend.is_gpu:
            self.backend.synchronize()
            if self.staged:
                host = self.host_buffer(role, a.shape, a.dtype)
                a.get(out=host)
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
            device.set(host)


# --------------------------------------------------------------------------- datatypes

_TYPE_CACHE: "OrderedDict[tuple, MPI.Datatype]" = OrderedDict()
_TYPE_CACHE_SIZE = 256


def mpi_type(dtype) -> MPI.Datatype:
    """The predefined MPI datatype of a NumPy dtype (float16 via MPICH's/Open MPI's extension)."""
    return dtlib.from_numpy_dtype(np.dtype(dtype))


def _subarray(dtype, global_shape: tuple, starts: tuple, shape: tuple) -> MPI.Datatype:
    """Committed subarray type of block ``shape`` at ``starts`` in C-ordered ``global_shape``;
    cached (types depend only on these numbers, not on a communicator)."""
    key = (np.dtype(dtype).str, global_shape, starts, shape)
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
    """In-place sum of ``a`` over ``comm`` (``Allreduce`` with ``IN_PLACE``). Returns ``a``."""
    if comm.Get_size() == 1:
        return a
    buf = staging.recv(staging.send(a, "allreduce"), "allreduce") if staging else a
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    if staging is not None:
        staging.finish(a, buf)
    return a


def iallreduce(a, comm: MPI.Comm) -> MPI.Request:
    """Non-blocking in-place sum of a host or GPU-aware buffer (``Iallreduce``)."""
    return comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM)
