"""Parallel ``.npy`` files: a header written by rank 0, every rank's block written or read
through an MPI-IO file view (``Write_at_all`` / ``Read_at_all``), and the grid-independent checksum
(``crc32`` of every ``chunk_bytes`` chunk of the data, then ``crc32`` of those values as
little-endian uint32; rank q reads chunks q, q+P, ...; one Allreduce).

Every MPI-IO call is checked -- its error, the bytes its status counts, and for writes the
bytes read back -- and the outcome agreed over the communicator before the next collective
(:class:`AgreedFile`): a write that fails on one rank (a full or failing storage target) raises
the same ValueError, naming the file and the operating system's reason, on every rank. Neither
check alone suffices: MPICH raises on a failed ``pwrite``, Open MPI's OMPIO returns success with
a short byte count, and a collective write's aggregator may lose another rank's failure."""
from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import zlib
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI
from numpy.lib import format as npy

from ..core.agreement import agree
from ..core.arrays import DTypeLike
from ..core.backend import backend_of
from ..core.comm import _subarray, allreduce, mpi_type
from .params import Param

CHUNK_BYTES = 1 << 20


CHECKSUM = "crc32 of per-chunk crc32 (little-endian uint32)"


def file_dtype(dtype: DTypeLike) -> np.dtype:
    """The .npy dtype a parameter of ``dtype`` is stored as: itself, or ``<u2`` (its bit
    pattern) for bfloat16."""
    dt = np.dtype(dtype)
    return np.dtype("<u2") if dt.name == "bfloat16" else dt


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    fields = {"descr": npy.dtype_to_descr(file_dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    out = io.BytesIO()
    try:
        npy.write_array_header_1_0(out, fields)
    except ValueError:  # header over 64 KiB: format 2.0
        out = io.BytesIO()
        npy.write_array_header_2_0(out, fields)
    return out.getvalue()


def _set_view(fh: MPI.File, p: Param, header_bytes: int, dtype: np.dtype,
              transfer: bool = True) -> int:
    """File view of this rank's block after the header (collective); returns its element count
    (0, and a plain view, when this rank does not ``transfer``)."""
    bounds = p.bounds()
    starts, sizes = [a for a, _ in bounds], [b - a for a, b in bounds]
    count = math.prod(sizes) if transfer else 0
    filetype = _subarray(dtype, tuple(p.shape), tuple(starts), tuple(sizes)) \
        if count and p.shape else mpi_type(dtype)
    fh.Set_view(header_bytes, mpi_type(dtype), filetype)
    return count


_STRERRORS = sorted({os.strerror(n) for n in errno.errorcode}, key=len, reverse=True)


def io_reason(exc: BaseException) -> str:
    """Why an I/O call failed, in the operating system's words where the error carries them
    (``No space left on device``): an OSError's ``strerror``; the errno text inside an MPI
    library's error string (MPICH's ROMIO appends it); else the error's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    if isinstance(exc, MPI.Exception):
        found = next((s for s in _STRERRORS if s in text), None)
        first = text.splitlines()[0].strip()
        return found or f"{first} (the MPI library's own message, on stderr, may say more)"
    return text


def _check_count(status: MPI.Status, nbytes: int) -> None:
    """OSError unless the call whose ``status`` this is moved ``nbytes`` bytes (Open MPI's
    OMPIO reports a failed ``pwrite`` only this way)."""
    done = status.Get_count(MPI.BYTE)
    if done != nbytes:
        raise OSError(errno.EIO, f"only {done} of {nbytes} bytes were transferred, without an "
                                 "error from the MPI library (a full or failing file system?)")


def agreed(comm: MPI.Comm, doing: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank of ``comm``, then an agreement on its outcome: any exception on
    any rank becomes the same ValueError, ``"<doing>: <reason>"`` (:func:`io_reason`), on
    every rank. Collective (one small Allreduce)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - agreed below, raised on every rank
        error = f"{doing}: {io_reason(exc)}"
    agree(comm, error)
    return result


class AgreedFile:
    """An MPI-IO file whose every step is :func:`agreed` over ``comm``: a step that fails on
    any rank (an MPI error, a short transfer, a read-back that differs) raises the same
    ValueError on every rank, ``"<doing> <file>: <reason>"``, before any rank starts the next
    collective, and the file is then closed on every rank. Use as a context manager; opening
    and closing are steps too. Collective over ``comm`` (one small Allreduce a step)."""

    def __init__(self, comm: MPI.Intracomm, filename: str, amode: int):
        self.comm, self.filename = comm, filename
        self.fh: MPI.File = agreed(comm, f"opening {filename}",
                                   lambda: MPI.File.Open(comm, filename, amode))

    def step(self, doing: str, fn: Callable[[MPI.File], Any]) -> Any:
        """``fn(file handle)`` on every rank, agreed."""
        return agreed(self.comm, f"{doing} {self.filename}", lambda: fn(self.fh))

    def __enter__(self) -> AgreedFile:
        return self

    def __exit__(self, kind: Optional[type], *rest: object) -> None:
        if kind is None:
            self.step("closing", lambda fh: fh.Close())
        else:  # a step raised on every rank: every rank closes
            with contextlib.suppress(MPI.Exception):
                self.fh.Close()


def _write_header(fh: MPI.File, header: bytes) -> None:
    """Rank 0's header write, checked: the byte count, then the bytes read back."""
    status = MPI.Status()
    fh.Write_at(0, header, status)
    _check_count(status, len(header))
    back = bytearray(len(header))
    fh.Read_at(0, back, status)
    if bytes(back) != header:
        raise OSError(errno.EIO, "the .npy header read back differs from the one written")


def _write_block(fh: MPI.File, host: np.ndarray, count: int, dtype: np.dtype) -> None:
    status = MPI.Status()
    fh.Write_at_all(0, [host, count, mpi_type(dtype)], status)
    _check_count(status, count * dtype.itemsize)


def _read_block(fh: MPI.File, into: np.ndarray, count: int, dtype: np.dtype) -> None:
    status = MPI.Status()
    fh.Read_at_all(0, [into, count, mpi_type(dtype)], status)
    _check_count(status, count * dtype.itemsize)


def _read_back(fh: MPI.File, host: np.ndarray, count: int, dtype: np.dtype) -> None:
    """Read this rank's block back and compare it bit for bit with ``host``: the
    one check that holds whatever the MPI library reports (a collective write's aggregator may
    lose another rank's failure)."""
    back = np.empty_like(host)
    _read_block(fh, back, count, dtype)
    if count and not np.array_equal(back.reshape(-1).view(np.uint8),
                                    host.reshape(-1).view(np.uint8)):
        raise OSError(errno.EIO, "this rank's block read back differs from what it wrote, "
                                 "without an error from the MPI library (a full or failing "
                                 "file system?)")


def fsync_path(path: str) -> None:
    """``fsync`` a file or directory by name. Each rank of a save fsyncs the files it wrote
    with POSIX calls rather than ``MPI_File_sync``: under Open MPI, once an aggregator's write
    has failed, OMPIO's Sync fails on that rank alone, for every later file of the process,
    while the others wait in its barrier (the checkpoint format needs a POSIX file system
    anyway: the rename commit, the O_EXCL lock)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_param(p: Param, filename: str) -> int:
    """Write ``p`` as a .npy file: the header by rank 0, the blocks by ``Write_at_all`` through
    file views; every rank reads its block back and compares (rank 0 its header too: a process
    sees its own writes through its handle, MPI's sequential consistency), then fsyncs the file
    (:func:`fsync_path`). Every MPI-IO call's error and byte count is checked and agreed
    (:class:`AgreedFile`): a failure on any rank raises the same ValueError on every rank,
    naming the file and the reason. Returns the header length. Collective over
    ``p.grid.comm``."""
    comm, dtype = p.grid.comm, np.dtype(p.local.dtype)
    header = _header(p.shape, dtype)
    size = len(header) + math.prod(p.shape) * dtype.itemsize
    root = comm.Get_rank() == 0
    with AgreedFile(comm, filename, MPI.MODE_RDWR | MPI.MODE_CREATE) as f:
        host = f.step("copying to the host the block for",
                      lambda _: np.ascontiguousarray(backend_of(p.local).to_host(p.local)))
        f.step("setting the size of", lambda fh: fh.Set_size(size))
        f.step("writing the .npy header of", lambda fh: _write_header(fh, header) if root else None)
        count = f.step("setting the file view of", lambda fh: _set_view(
            fh, p, len(header), dtype, transfer=p.is_writer()))
        f.step("writing", lambda fh: _write_block(fh, host, count, dtype))
        f.step("reading back", lambda fh: _read_back(fh, host, count, dtype))
        f.step("syncing", lambda _: fsync_path(filename))
    return len(header)


def read_param(p: Param, filename: str, header_bytes: int, dtype: np.dtype, into: np.ndarray
               ) -> None:
    """Read this rank's block of ``p`` from the file (``Read_at_all`` through a view) as ``dtype``
    into the host array ``into``; a failure on any rank raises the same ValueError on every
    rank (:class:`AgreedFile`). Collective over ``p.grid.comm``."""
    with AgreedFile(p.grid.comm, filename, MPI.MODE_RDONLY) as f:
        count = f.step("setting the file view of",
                       lambda fh: _set_view(fh, p, header_bytes, dtype))
        f.step("reading", lambda fh: _read_block(fh, into, count, dtype))


def checksum(comm: MPI.Intracomm, filename: str, offset: int, nbytes: int,
             chunk_bytes: int = CHUNK_BYTES) -> int:
    """Grid-independent checksum of bytes ``[offset, offset + nbytes)`` of ``filename`` (see the
    module docstring). Rank q reads chunks q, q+P, ...; one Allreduce. Collective; a read that
    fails on any rank raises the same ValueError on every rank."""
    nchunks = -(-nbytes // chunk_bytes)
    crcs = np.zeros(nchunks, dtype=np.int64)

    def read(fh: MPI.File) -> None:
        buf, status = np.empty(min(nbytes, chunk_bytes), dtype=np.uint8), MPI.Status()
        for i in range(comm.Get_rank(), nchunks, comm.Get_size()):
            piece = buf[:min(chunk_bytes, nbytes - i * chunk_bytes)]
            fh.Read_at(offset + i * chunk_bytes, piece, status)
            _check_count(status, piece.size)
            crcs[i] = zlib.crc32(piece.data)

    with AgreedFile(comm, filename, MPI.MODE_RDONLY) as f:
        f.step("reading", read)
    allreduce(crcs, comm)
    return zlib.crc32(crcs.astype("<u4").tobytes())
