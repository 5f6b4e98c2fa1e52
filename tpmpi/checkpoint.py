"""MPI-IO checkpoints of sharded layers: one standard ``.npy`` per parameter + ``manifest.json``.

A checkpoint is a directory::

    manifest.json         format, tpmpi version, class, constructor config, grid saved from and,
                          per parameter: file, global shape, dtype, layout, header bytes, checksum
    weight.npy, bias.npy  plain NumPy files of the global arrays (``numpy.load`` reads them)
    fc1.weight.npy, ...   composites (objects whose attributes are layers, e.g. ParallelMLP's
                          ``fc1``/``fc2``): parameter names prefixed by the attribute

Save: rank 0 writes each ``.npy`` header (``numpy.lib.format``); every rank writes its block in
one collective ``Write_all`` through a file view (``Set_view(header_len, etype, subarray)``);
a block held by several ranks (replicated layouts) is written by the lowest of them only. Files
are written under temporary names ``.NAME.npy.tmp-TOKEN``, read back for the checksum, and after
a barrier rank 0 renames them (``os.replace``, atomic) and renames the manifest last. A crash
while writing leaves the previous checkpoint untouched; a crash inside the rename sequence
leaves files whose checksums disagree with the manifest, which load reports.

Checksum (grid-independent, a function of the global array alone): ``crc32`` of every
``CHUNK_BYTES`` chunk of the data bytes (C order, as in the file), then ``crc32`` of those values
as little-endian uint32 in order. Computed in parallel from the files as written (rank q reads
chunks q, q+P, ...), combined with one Allreduce; load recomputes it the same way.

Load: rank 0 validates manifest and files (present, header matching the manifest, exact size);
the verdict is broadcast, so every rank raises the same error. Each rank then reads only its
block (``Read_all`` through a file view), on any world size and grid shape.
"""
from __future__ import annotations

import io
import json
import math
import os
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from mpi4py import MPI
from numpy.lib import format as npy

from . import __version__
from .backend import backend_of
from .comm import _subarray, allreduce, check, mpi_type
from .grid import ProcessGrid
from .layers.base import ParallelLinear
from .layout import block_bounds

MANIFEST = "manifest.json"
FORMAT = "tpmpi-checkpoint"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20
CHECKSUM = "crc32 of per-chunk crc32 (little-endian uint32)"


@dataclass
class Param:
    """One distributed parameter: ``local`` is this rank's block of the global ``shape``."""

    name: str
    local: Any
    shape: tuple[int, ...]
    layout: str
    grid: ProcessGrid

    def bounds(self) -> tuple[tuple[int, int], ...]:
        return block_bounds(self.shape, self.grid.shape, self.grid.coords, self.layout)

    def is_writer(self) -> bool:
        """True on the lowest rank holding this rank's block (replicated blocks written once)."""
        mine, comm = self.bounds(), self.grid.comm
        return not any(block_bounds(self.shape, self.grid.shape, tuple(comm.Get_coords(q)),
                                    self.layout) == mine for q in range(self.grid.rank))


def named_layers(obj) -> list[tuple[str, ParallelLinear]]:
    """``[("", obj)]`` for a layer; for a composite, ``(attribute, layer)`` for each attribute
    that is a ParallelLinear (e.g. ``fc1``, ``fc2``), in definition order."""
    if isinstance(obj, ParallelLinear):
        return [("", obj)]
    found = [(k, v) for k, v in vars(obj).items() if isinstance(v, ParallelLinear)]
    if not found:
        raise ValueError(f"{type(obj).__name__} is neither a ParallelLinear nor holds any")
    return found


def parameters(obj) -> list[Param]:
    """Every distributed parameter of a layer or composite, named ``weight``, ``fc1.bias``..."""
    out = []
    for prefix, layer in named_layers(obj):
        local = {name: p for name, p, _ in layer.parameters()}
        for name, (shape, layout) in layer.parameter_layouts().items():
            out.append(Param(f"{prefix}.{name}" if prefix else name, local[name], shape, layout,
                             layer.grid))
    return out


def _header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    fields = {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
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


def _write(p: Param, filename: str) -> int:
    """Write ``p`` as a .npy file (header by rank 0, blocks by ``Write_all``). Returns the
    header length. Collective over ``p.grid.comm``."""
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


def _read(p: Param, filename: str, header_bytes: int, dtype: np.dtype) -> None:
    """Fill ``p.local`` with its block of the file (``Read_all`` through a view), casting from
    the file's ``dtype``. Collective over ``p.grid.comm``."""
    direct = isinstance(p.local, np.ndarray) and p.local.dtype == dtype and \
        p.local.flags.c_contiguous
    host = p.local if direct else np.empty(p.local.shape, dtype)
    fh = MPI.File.Open(p.grid.comm, filename, MPI.MODE_RDONLY)
    try:
        fh.Read_all([host, _set_view(fh, p, header_bytes, dtype), mpi_type(dtype)])
    finally:
        fh.Close()
    if not direct:
        p.local[...] = backend_of(p.local).asarray(host, dtype=p.local.dtype)


def checksum(comm: MPI.Comm, filename: str, offset: int, nbytes: int) -> int:
    """Grid-independent checksum of bytes ``[offset, offset + nbytes)`` of ``filename`` (see the
    module docstring). Rank q reads chunks q, q+P, ...; one Allreduce. Collective."""
    nchunks = -(-nbytes // CHUNK_BYTES)
    crcs = np.zeros(nchunks, dtype=np.int64)
    buf = np.empty(min(nbytes, CHUNK_BYTES), dtype=np.uint8)
    fh = MPI.File.Open(comm, filename, MPI.MODE_RDONLY)
    try:
        for i in range(comm.Get_rank(), nchunks, comm.Get_size()):
            piece = buf[:min(CHUNK_BYTES, nbytes - i * CHUNK_BYTES)]
            fh.Read_at(offset + i * CHUNK_BYTES, piece)
            crcs[i] = zlib.crc32(piece)
    finally:
        fh.Close()
    allreduce(crcs, comm)
    return zlib.crc32(crcs.astype("<u4").tobytes())


def _agree_root(comm: MPI.Comm, task) -> Any:
    """Run ``task()`` on rank 0 and broadcast its result, or raise its error on every rank."""
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            result = task()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    result, error = comm.bcast((result, error), root=0)
    if error:
        raise ValueError(error)
    return result


def save_checkpoint(path: str, layer) -> None:
    """Write ``layer`` (a ParallelLinear or a composite of them) to the directory ``path`` as
    one ``.npy`` per parameter plus ``manifest.json``, replacing an existing checkpoint only
    once the new one is complete. Collective over the layer's grid (MPI-IO ``Write_all``,
    checksum Allreduce, Barrier)."""
    params = parameters(layer)
    comm = params[0].grid.comm
    check(comm, lambda: None, path=os.path.abspath(str(path)),
          parameters=[(p.name, p.shape, str(p.local.dtype)) for p in params])

    def prepare() -> str:
        os.makedirs(path, exist_ok=True)
        return uuid.uuid4().hex[:12]

    token = _agree_root(comm, prepare)
    entries = {}
    for p in params:
        tmp = os.path.join(path, f".{p.name}.npy.tmp-{token}")
        header_bytes = _write(p, tmp)
        nbytes = math.prod(p.shape) * p.local.dtype.itemsize
        entries[p.name] = {
            "file": f"{p.name}.npy", "shape": list(p.shape), "dtype": p.local.dtype.name,
            "layout": p.layout, "header_bytes": header_bytes,
            "checksum": {"algorithm": CHECKSUM, "chunk_bytes": CHUNK_BYTES,
                         "value": checksum(comm, tmp, header_bytes, nbytes)}}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tpmpi_version": __version__,
        "class": type(layer).__name__,
        "config": layer.config() if hasattr(layer, "config") else None,
        "layers": {prefix: type(sub).__name__ for prefix, sub in named_layers(layer)},
        "grid": list(params[0].grid.shape), "world_size": comm.Get_size(),
        "parameters": entries}
    comm.Barrier()

    def commit() -> None:
        for name, entry in entries.items():
            os.replace(os.path.join(path, f".{name}.npy.tmp-{token}"),
                       os.path.join(path, entry["file"]))
        tmp = os.path.join(path, f".{MANIFEST}.tmp-{token}")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, MANIFEST))
        dirfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    _agree_root(comm, commit)


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint ``path`` after checking every file it lists: present, a .npy
    header matching the manifest's shape and dtype, and exactly the expected size. Local;
    ValueError naming the problem."""
    where = os.path.join(path, MANIFEST)
    if not os.path.isfile(where):
        raise ValueError(f"no checkpoint at {path!r}: {MANIFEST} is missing")
    try:
        with open(where) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable checkpoint manifest {where!r}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where!r} is not a tpmpi checkpoint manifest")
    for name, entry in manifest["parameters"].items():
        filename = os.path.join(path, entry["file"])
        if not os.path.isfile(filename):
            raise ValueError(f"checkpoint {path!r}: parameter {name} file {entry['file']} is "
                             "missing")
        with open(filename, "rb") as f:
            try:
                version = npy.read_magic(f)
                read = npy.read_array_header_1_0 if version == (1, 0) else \
                    npy.read_array_header_2_0
                shape, fortran, dtype = read(f)
            except ValueError as exc:
                raise ValueError(f"checkpoint {path!r}: {entry['file']} has a corrupted .npy "
                                 f"header ({exc})") from None
            header_bytes = f.tell()
        want = (tuple(entry["shape"]), False, np.dtype(entry["dtype"]), entry["header_bytes"])
        if (tuple(shape), fortran, dtype, header_bytes) != want:
            raise ValueError(f"checkpoint {path!r}: {entry['file']} holds shape {tuple(shape)} "
                             f"{dtype} (fortran_order={fortran}), the manifest says "
                             f"{tuple(entry['shape'])} {entry['dtype']}")
        size, expected = os.path.getsize(filename), \
            header_bytes + math.prod(shape) * dtype.itemsize
        if size != expected:
            raise ValueError(f"checkpoint {path!r}: {entry['file']} is "
                             f"{'truncated' if size < expected else 'too long'}: {size} bytes, "
                             f"expected {expected}")
    return manifest


def _layer_class(name: str):
    """The public tpmpi class, or else the ParallelLinear subclass, called ``name``."""
    import tpmpi

    found = getattr(tpmpi, name, None)
    if isinstance(found, type):
        return found
    todo = [ParallelLinear]
    while todo:
        klass = todo.pop()
        if klass.__name__ == name:
            return klass
        todo.extend(klass.__subclasses__())
    raise ValueError(f"checkpoint class {name!r} is not a tpmpi layer")


def load_checkpoint(path: str, grid: Optional[ProcessGrid] = None, *, cls=None, into=None,
                    verify: bool = True, **options: Any):
    """The layer saved in ``path``, re-sharded onto ``grid`` (default: 1D over COMM_WORLD; any
    size and shape). ``cls`` requires the saved class; ``options`` override saved constructor
    options (``dtype`` casts). ``into``: read into an existing layer or composite instead (its
    grid is used). ``verify`` recomputes the checksums. Collective: manifest checked on rank 0
    and broadcast, each rank ``Read_all``s its block; errors are raised on every rank."""
    if into is not None:
        grid = named_layers(into)[0][1].grid
    elif grid is None:
        grid = ProcessGrid(MPI.COMM_WORLD)
    comm = grid.comm
    manifest = _agree_root(comm, lambda: read_manifest(path))
    want = type(into) if into is not None else cls
    if want is not None and want is not ParallelLinear and manifest["class"] != want.__name__:
        raise ValueError(f"checkpoint {path!r} holds a {manifest['class']}, not a "
                         f"{want.__name__}")
    entries = manifest["parameters"]
    if verify:
        for name, entry in entries.items():
            nbytes = math.prod(entry["shape"]) * np.dtype(entry["dtype"]).itemsize
            got = checksum(comm, os.path.join(path, entry["file"]), entry["header_bytes"], nbytes)
            if got != entry["checksum"]["value"]:
                raise ValueError(f"checkpoint {path!r}: {entry['file']} is corrupted (checksum "
                                 f"{got} != {entry['checksum']['value']} in the manifest)")
    if into is None:
        if manifest["config"] is None:
            raise ValueError(f"checkpoint {path!r}: {manifest['class']} has no saved config; "
                             "construct it and pass into=")
        into = _layer_class(manifest["class"])(grid=grid, **{**manifest["config"], **options})
    params = parameters(into)

    def local_checks() -> None:
        have = {p.name: p.shape for p in params}
        saved = {name: tuple(e["shape"]) for name, e in entries.items()}
        if have != saved:
            raise ValueError(f"checkpoint {path!r}: parameter shapes {saved} do not match the "
                             f"layer's {have}")

    check(comm, local_checks)
    for p in params:
        entry = entries[p.name]
        _read(p, os.path.join(path, entry["file"]), entry["header_bytes"],
              np.dtype(entry["dtype"]))
    return into
