"""Parallel ``.npy`` files: a header written by rank 0, every rank's block written or read
through an MPI-IO file view (``Write_all`` / ``Read_all``), and the grid-independent checksum
(``crc32`` of every ``chunk_bytes`` chunk of the data, then ``crc32`` of those values as
little-endian uint32; rank q reads chunks q, q+P, ...; one Allreduce)."""
from __future__ import annotations

import io
import math
import zlib

import numpy as np
from mpi4py import MPI
from numpy.lib import format as npy

from ..core.arrays import DTypeLike
from ..core.backend import backend_of
from ..core.comm import allreduce
from ..core.datatypes import mpi_type, subarray_type
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
    filetype = subarray_type(dtype, tuple(p.shape), tuple(starts), tuple(sizes)) \
        if count and p.shape else mpi_type(dtype)
    fh.Set_view(header_bytes, mpi_type(dtype), filetype)
    return count


def write_param(p: Param, filename: str) -> int:
    """Write ``p`` as a .npy file (header by rank 0, blocks by ``Write_all``, then ``Sync``).
    Returns the header length. Collective over ``p.grid.comm``."""
    comm, dtype = p.grid.comm, np.dtype(p.local.dtype)
    header = _header(p.shape, dtype)
    host = np.ascontiguousarray(backend_of(p.local).to_host(p.local))
    fh = MPI.File.Open(comm, filename, MPI.MODE_WRONLY | MPI.MODE_CREATE)
    try:
        fh.Set_size(len(header) + math.prod(p.shape) * dtype.itemsize)
        if comm.Get_rank() == 0:
            fh.Write_at(0, header)
        count = _set_view(fh, p, len(header), dtype, transfer=p.is_writer())
        fh.Write_all([host, count, mpi_type(dtype)])
        fh.Sync()
    finally:
        fh.Close()
    return len(header)


def read_param(p: Param, filename: str, header_bytes: int, dtype: np.dtype, into: np.ndarray
               ) -> None:
    """Read this rank's block of ``p`` from the file (``Read_all`` through a view) as ``dtype``
    into the host array ``into``. Collective over ``p.grid.comm``."""
    fh = MPI.File.Open(p.grid.comm, filename, MPI.MODE_RDONLY)
    try:
        fh.Read_all([into, _set_view(fh, p, header_bytes, dtype), mpi_type(dtype)])
    finally:
        fh.Close()


def checksum(comm: MPI.Intracomm, filename: str, offset: int, nbytes: int,
             chunk_bytes: int = CHUNK_BYTES) -> int:
    """Grid-independent checksum of bytes ``[offset, offset + nbytes)`` of ``filename`` (see the
    module docstring). Rank q reads chunks q, q+P, ...; one Allreduce. Collective."""
    nchunks = -(-nbytes // chunk_bytes)
    crcs = np.zeros(nchunks, dtype=np.int64)
    buf = np.empty(min(nbytes, chunk_bytes), dtype=np.uint8)
    fh = MPI.File.Open(comm, filename, MPI.MODE_RDONLY)
    try:
        for i in range(comm.Get_rank(), nchunks, comm.Get_size()):
            piece = buf[:min(chunk_bytes, nbytes - i * chunk_bytes)]
            fh.Read_at(offset + i * chunk_bytes, piece)
            crcs[i] = zlib.crc32(piece.data)
    finally:
        fh.Close()
    allreduce(crcs, comm)
    return zlib.crc32(crcs.astype("<u4").tobytes())
