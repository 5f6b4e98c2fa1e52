"""MPI-IO checkpoints of sharded layers: one standard ``.npy`` per parameter + ``manifest.json``.

A checkpoint is a directory::

    manifest.json           the commit point: format, tpmpi version, class, constructor config,
                            grid saved from and, per parameter: file, global shape, logical
                            dtype, the file's .npy dtype, layout, header bytes, checksum
    v000007/weight.npy      the parameters of the committed version: plain NumPy files of the
    v000007/bias.npy        global arrays (``numpy.load`` reads them without MPI); composites
    v000007/fc1.weight.npy  (composites, e.g. ParallelMLP, prefix the names with their
                            children's names: :func:`tpmpi.layers.named_layers`)
    .lock                   only while a save runs (pid, host, start time; refreshed every
                            few seconds)

dtypes: the .npy files hold float64/float32/float16 as themselves; **bfloat16 is stored as its
2-byte bit pattern with .npy dtype ``<u2``** (NumPy has no bfloat16, and a ``|V2`` file would
load as opaque void data), the manifest's ``dtype`` saying ``bfloat16``. Get the values back
with ``numpy.load(f).view(ml_dtypes.bfloat16)``. Format 1 (files beside the manifest, bfloat16
as ``|V2``) still loads.

Save (collective over the layer's grid): every argument is agreed first (path, the layers'
identities, parameter names/shapes/dtypes). Rank 0 creates the lock with ``O_CREAT|O_EXCL`` (a
save already running on that path is refused with a clear error on every rank; a lock whose
holder died, i.e. a dead pid on this host or a heartbeat older than :data:`LOCK_STALE_S`, is
taken over), removes what earlier crashed saves left (version directories the manifest does not
name, ``*.tmp-*``) and creates the next version directory. Every rank writes its blocks there
(rank 0 the .npy headers; ``Write_all`` through a file view; a replicated block by its lowest
holder), ``Sync``; the checksums are computed from the files as written. Rank 0 then writes the
manifest under a temporary name, fsyncs it and the version directory, and **switches
``manifest.json`` with one ``os.replace``**: the whole commit. Only after that are the previous
version and the lock removed. A crash at any point leaves either the previous or the new
checkpoint loadable, complete and never a mix (tests/test_checkpoint_crash.py kills a rank at
every step).

Checksum (grid-independent, a function of the global array alone): ``crc32`` of every
``chunk_bytes`` chunk of the data bytes (C order, as in the file), then ``crc32`` of those values
as little-endian uint32 in order. Computed in parallel (rank q reads chunks q, q+P, ...),
combined with one Allreduce; load recomputes it the same way.

Load (collective): every argument is agreed first (path, class, into=, verify, options); rank 0
reads the manifest, validates its schema and every file (present, header matching, exact size)
and broadcasts the verdict, so every rank raises the same error. Each rank then reads only its
block (``Read_all`` through a file view), on any world size and grid shape; a dtype cast that
would overflow (e.g. to float16) is refused on every rank. Do not load a path while another
job saves to it: the save removes the previous version once it has committed.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
from mpi4py import MPI
from numpy.lib import format as npy

from ._version import __version__
from .core.agreement import CALL_ORDER, Same, Text, agree, agree_checks
from .core.arrays import DTypeLike
from .core.backend import backend_of
from .core.comm import _subarray, allreduce, mpi_type
from .core.dtypes import SUPPORTED, resolve_dtype
from .core.grid import ProcessGrid, default_grid
from .core.layout import LAYOUTS, block_bounds
from .layers.base import ParallelLinear
from .layers.module import Composite, named_layers

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = "tpmpi-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CHUNK_BYTES = 1 << 20
CHECKSUM = "crc32 of per-chunk crc32 (little-endian uint32)"
LOCK_STALE_S = 60.0
"""A lock whose heartbeat (its mtime) is older than this is taken over."""
HEARTBEAT_S = 5.0
VERSION_DIR = re.compile(r"v\d{6}$")

STEP_HOOK: Optional[Callable[[str], None]] = None
"""Test hook: called with the name of each step of a save, on every rank that reaches it (the
kill-at-every-step test ends a rank there)."""


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


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


def layers_of(obj: Any) -> list[tuple[str, ParallelLinear]]:
    """The named leaf layers of a layer or composite (:func:`tpmpi.layers.named_layers`);
    ValueError unless every one is a ParallelLinear."""
    found = named_layers(obj)
    for name, layer in found:
        if not isinstance(layer, ParallelLinear):
            raise ValueError(f"{name or type(obj).__name__} is a {type(layer).__name__}: "
                             "expected a ParallelLinear (or a composite of them)")
    return found


def identities(obj: Any) -> Text:
    """The identities of the layers of ``obj`` (``"layer #0 (...)"``, ``"fc1=layer #0 (...),
    fc2=..."``): the same on every rank only for the same layer objects (agreed by save and
    by load into=)."""
    return Text(", ".join(f"{prefix}={layer.identity}" if prefix else layer.identity
                          for prefix, layer in layers_of(obj)))


def parameters(obj: Any) -> list[Param]:
    """Every distributed parameter of a layer or composite, named ``weight``, ``fc1.bias``..."""
    out = []
    for prefix, layer in layers_of(obj):
        local = {name: p for name, p, _ in layer.parameters()}
        for name, (shape, layout) in layer.parameter_layouts().items():
            out.append(Param(f"{prefix}.{name}" if prefix else name, local[name], shape, layout,
                             layer.grid))
    return out


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


def _write(p: Param, filename: str) -> int:
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


def _read(p: Param, filename: str, header_bytes: int, dtype: np.dtype, into: np.ndarray
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


def _agree_root(comm: MPI.Comm, task: Optional[Callable[[], Any]]) -> Any:
    """Run ``task()`` on rank 0 and broadcast its result, or raise its error on every rank
    (any exception: nothing escapes on rank 0 alone). ``task`` may be None on other ranks."""
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            assert task is not None, "rank 0 runs the task"
            result = task()
        except Exception as exc:  # noqa: BLE001 - reported on every rank
            error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    result, error = comm.bcast((result, error), root=0)
    if error:
        raise ValueError(error)
    return result


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the save lock


def _read_holder(filename: str) -> Optional[dict]:
    """The holder recorded in lock file ``filename`` (None if unreadable or being written)."""
    try:
        with open(filename) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class SaveLock:
    """``path/.lock``, created with ``O_CREAT|O_EXCL`` (atomic on local and parallel file
    systems), holding ``{"pid", "host", "since", "token"}``; a heartbeat thread refreshes its
    mtime every :data:`HEARTBEAT_S` while the save runs."""

    def __init__(self, path: str, token: str):
        self.path, self.file, self.token = path, os.path.join(path, LOCK), token
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _is_stale(self, holder: Optional[dict]) -> bool:
        try:
            age = time.time() - os.path.getmtime(self.file)
        except OSError:
            return False  # gone meanwhile: the next attempt creates it
        if age > LOCK_STALE_S:
            return True
        if holder and holder.get("host") == socket.gethostname() and \
                isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # its process died on this host
            except OSError:
                pass  # alive (another user's process)
        return False

    def _break(self, holder: Optional[dict]) -> None:
        """Remove the stale lock ``holder``, unless another saver replaced it meanwhile."""
        aside = f"{self.file}.tmp-stale-{self.token}"
        try:
            os.rename(self.file, aside)
        except OSError:
            return
        if _read_holder(aside) != holder:  # not the one judged stale: put it back
            os.rename(aside, self.file)
            return
        os.remove(aside)

    def acquire(self) -> None:
        """Take the lock or raise ValueError naming its holder."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.file)
                if self._is_stale(holder):
                    self._break(holder)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                       f"{holder.get('since')}") if holder else "a save that is starting"
                raise ValueError(
                    f"checkpoint {self.path!r} is being saved by another job ({who}); "
                    f"concurrent saves to one path are refused: wait for it, or remove "
                    f"{self.file} if no save is running") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                          name="tpmpi-checkpoint-lock")
            self._beat.start()
            return
        raise ValueError(f"checkpoint {self.path!r}: could not take the lock {self.file}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.file)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if (_read_holder(self.file) or {}).get("token") == self.token:
            os.remove(self.file)


# --------------------------------------------------------------------------- save


def _ours(name: str) -> bool:
    """Names a save creates in a checkpoint directory (the rest is the user's, left alone)."""
    return bool(VERSION_DIR.match(name)) or ".tmp-" in name


def _remove(where: str) -> None:
    if os.path.isdir(where) and not os.path.islink(where):
        shutil.rmtree(where, ignore_errors=True)
    else:
        try:
            os.remove(where)
        except FileNotFoundError:
            pass


def _committed(path: str) -> Optional[dict]:
    """The committed manifest of ``path`` if it is a valid one, else None."""
    try:
        return check_manifest(path, _load_json(path))
    except ValueError:
        return None


def _referenced(manifest: Optional[dict]) -> set:
    """Top-level names in the checkpoint directory that ``manifest`` uses."""
    if manifest is None:
        return set()
    return {e["file"].split("/")[0] for e in manifest["parameters"].values()}


class _Save:
    """Rank 0's side of a save: lock, clean, new version directory, commit, cleanup."""

    def __init__(self, path: str):
        self.path, self.token = path, uuid.uuid4().hex[:12]
        self.lock = SaveLock(path, self.token)
        self.previous: Optional[dict] = None
        self.version = ""

    def prepare(self) -> str:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"checkpoint path {self.path!r} is a file: expected a directory")
        os.makedirs(self.path, exist_ok=True)
        self.lock.acquire()
        try:
            _step("locked")
            self.previous = _committed(self.path)
            keep = _referenced(self.previous)
            if self.previous is None and os.path.isfile(os.path.join(self.path, MANIFEST)):
                keep = set(os.listdir(self.path))  # damaged manifest: remove nothing of it
            for name in os.listdir(self.path):
                if _ours(name) and name not in keep:
                    _remove(os.path.join(self.path, name))
            _step("cleaned")
            numbers = [int(n[1:]) for n in keep if VERSION_DIR.match(n)]
            self.version = f"v{max(numbers, default=0) + 1:06d}"
            os.mkdir(os.path.join(self.path, self.version))
            _step("version-dir")
        except BaseException:
            self.lock.release()
            raise
        return self.version

    def commit(self, manifest: dict) -> None:
        """Fsync, switch ``manifest.json`` (one rename), then remove the previous version."""
        try:
            tmp = os.path.join(self.path, f".{MANIFEST}.tmp-{self.token}")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(os.path.join(self.path, self.version))
            _step("manifest-written")
            os.replace(tmp, os.path.join(self.path, MANIFEST))  # the commit
            _step("switched")
            _fsync_dir(self.path)
            _step("dir-synced")
            for name in _referenced(self.previous) - {self.version}:
                _remove(os.path.join(self.path, name))
            _step("old-removed")
        finally:
            self.lock.release()
        _step("unlocked")

    def abort(self) -> None:
        """After a failed write: drop the new version directory and the lock."""
        if self.version:
            _remove(os.path.join(self.path, self.version))
        self.lock.release()


def save_checkpoint(path: Union[str, os.PathLike[str]], layer: Any) -> None:
    """Write ``layer`` (a ParallelLinear or a composite of them) to the directory ``path`` as
    one ``.npy`` per parameter plus ``manifest.json``, committed as a whole by one rename (see
    the module docstring); a concurrent save to the same path is refused. Collective over the
    layer's grid (argument agreement, MPI-IO ``Write_all``, checksum Allreduces, broadcasts)."""
    params = parameters(layer)
    comm = params[0].grid.comm
    try:
        path = os.path.abspath(os.fspath(path))
    except TypeError:
        pass  # reported by local_checks

    def local_checks() -> None:
        if not isinstance(path, str):
            raise ValueError(f"path={path!r}: expected a str or os.PathLike")
        if any(p.grid.comm is not comm for p in params):
            raise ValueError("the layers of a composite must share one grid to be saved")

    agree_checks(comm, local_checks, call=Same(Text("save_checkpoint()"), CALL_ORDER), path=path,
                 layer=Same(identities(layer), "every rank must save the same layer object"),
                 parameters=[(p.name, p.shape, str(p.local.dtype)) for p in params])
    _step("agreed")
    assert isinstance(path, str)  # else local_checks raised on every rank
    save = _Save(path) if comm.Get_rank() == 0 else None
    version = _agree_root(comm, save.prepare if save else None)
    _step("prepared")
    entries, error = {}, None
    try:
        for p in params:
            filename = os.path.join(path, version, f"{p.name}.npy")
            header_bytes = _write(p, filename)
            _step(f"written:{p.name}")
            nbytes = math.prod(p.shape) * p.local.dtype.itemsize
            entries[p.name] = {
                "file": f"{version}/{p.name}.npy", "shape": list(p.shape),
                "dtype": p.local.dtype.name, "npy_dtype": file_dtype(p.local.dtype).str,
                "layout": p.layout, "header_bytes": header_bytes,
                "checksum": {"algorithm": CHECKSUM, "chunk_bytes": CHUNK_BYTES,
                             "value": checksum(comm, filename, header_bytes, nbytes)}}
            _step(f"checksum:{p.name}")
    except Exception as exc:  # noqa: BLE001 - agreed below, the save undone on rank 0
        error = f"save_checkpoint({path!r}) failed: {type(exc).__name__}: {exc}"
    try:
        agree(comm, error)
    except ValueError:
        if save is not None:
            save.abort()
        raise
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tpmpi_version": __version__,
        "class": type(layer).__name__,
        "config": layer.config() if hasattr(layer, "config") else None,
        "layers": {prefix: type(sub).__name__ for prefix, sub in layers_of(layer)},
        "grid": list(params[0].grid.shape), "world_size": comm.Get_size(),
        "parameters": entries}
    _agree_root(comm, (lambda: save.commit(manifest)) if save else None)


# --------------------------------------------------------------------------- load


def _load_json(path: str) -> dict:
    where = os.path.join(path, MANIFEST)
    if not os.path.isfile(where):
        raise ValueError(f"no checkpoint at {path!r}: {MANIFEST} is missing")
    try:
        with open(where) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable checkpoint manifest {where!r}: {exc}") from None


def _field(where: str, entry: Any, key: str, kind: Union[type, tuple[type, ...]], what: str
           ) -> Any:
    """``entry[key]`` if ``entry`` is a dict holding a ``kind``, else a ValueError naming the
    field, its value and ``what`` was expected."""
    if not isinstance(entry, dict) or key not in entry:
        raise ValueError(f"{where}: field {key!r} is missing: expected {what}")
    value = entry[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where}: field {key!r} is {value!r}: expected {what}")
    return value


def check_manifest(path: str, manifest: Any) -> dict:
    """``manifest`` after checking its schema (types of every field used by load); ValueError
    naming the first bad field, its value and what was expected. Local."""
    where = f"checkpoint manifest {os.path.join(path, MANIFEST)!r}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where} is not a tpmpi checkpoint manifest (no \"format\": "
                         f"\"{FORMAT}\")")
    version = _field(where, manifest, "format_version", int, "an integer")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: format_version {version} is not one this tpmpi "
                         f"({__version__}) reads ({', '.join(map(str, READABLE_VERSIONS))}); "
                         "upgrade tpmpi")
    _field(where, manifest, "class", str, "a class name")
    if manifest.get("config") is not None:
        _field(where, manifest, "config", dict, "an object of constructor options or null")
    entries = _field(where, manifest, "parameters", dict, "a non-empty object of parameters")
    if not entries:
        raise ValueError(f"{where}: field 'parameters' is {{}}: expected a non-empty object of "
                         "parameters")
    for name, entry in entries.items():
        at = f"{where}, parameter {name!r}"
        filename = _field(at, entry, "file", str, "a file name inside the checkpoint")
        if os.path.isabs(filename) or ".." in filename.split("/"):
            raise ValueError(f"{at}: field 'file' is {filename!r}: expected a file name inside "
                             "the checkpoint")
        shape = _field(at, entry, "shape", list, "a list of non-negative integers")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError(f"{at}: field 'shape' is {shape!r}: expected a list of "
                             "non-negative integers")
        dtype = _field(at, entry, "dtype", str, f"one of {', '.join(SUPPORTED)}")
        if dtype not in SUPPORTED:
            raise ValueError(f"{at}: field 'dtype' is {dtype!r}: expected one of "
                             f"{', '.join(SUPPORTED)}")
        if version >= 2:
            _field(at, entry, "npy_dtype", str, "a .npy dtype string")
        layout = _field(at, entry, "layout", str, f"one of {', '.join(LAYOUTS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"{at}: field 'layout' is {layout!r}: expected one of "
                             f"{', '.join(LAYOUTS)}")
        _field(at, entry, "header_bytes", int, "an integer")
        crc = _field(at, entry, "checksum", dict, "an object with 'value' and 'chunk_bytes'")
        _field(at + ", checksum", crc, "value", int, "an integer")
        chunk = crc.get("chunk_bytes", CHUNK_BYTES)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"{at}, checksum: field 'chunk_bytes' is {chunk!r}: expected a "
                             "positive integer")
    return manifest


def _header_dtypes(entry: dict) -> tuple:
    """The .npy dtypes an entry's file may hold (format 1 wrote bfloat16 as ``|V2``)."""
    if "npy_dtype" in entry:
        return (np.dtype(entry["npy_dtype"]),)
    dt = np.dtype(entry["dtype"])
    return (dt, np.dtype("<u2"), np.dtype("V2")) if dt.name == "bfloat16" else (dt,)


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint ``path`` after checking its schema and every file it lists:
    present, a .npy header matching the manifest's shape, dtype and header size, and exactly
    the expected size. Local; ValueError naming the problem."""
    manifest = check_manifest(path, _load_json(path))
    for name, entry in manifest["parameters"].items():
        resolve_dtype(entry["dtype"], argument=f"parameter {name} dtype")  # e.g. ml_dtypes
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
        allowed = _header_dtypes(entry)
        if (tuple(shape), fortran) != (tuple(entry["shape"]), False) or dtype not in allowed:
            raise ValueError(f"checkpoint {path!r}: {entry['file']} holds shape {tuple(shape)} "
                             f"{dtype.str} (fortran_order={fortran}), the manifest says "
                             f"{tuple(entry['shape'])} {allowed[0].str}")
        if header_bytes != entry["header_bytes"]:
            raise ValueError(f"checkpoint {path!r}: {entry['file']} has a {header_bytes}-byte "
                             f".npy header, the manifest says header_bytes="
                             f"{entry['header_bytes']}")
        size, expected = os.path.getsize(filename), \
            header_bytes + math.prod(shape) * dtype.itemsize
        if size != expected:
            raise ValueError(f"checkpoint {path!r}: {entry['file']} is "
                             f"{'truncated' if size < expected else 'too long'}: {size} bytes, "
                             f"expected {expected}")
    return manifest


def _layer_class(name: str) -> type:
    """The ParallelLinear or Composite subclass called ``name`` (tpmpi's, or one defined by
    the program that loads)."""
    todo = [ParallelLinear, Composite]
    while todo:
        klass = todo.pop(0)
        if klass.__name__ == name:
            return klass
        todo.extend(klass.__subclasses__())
    raise ValueError(f"checkpoint class {name!r} is not a tpmpi layer")


def _cast(name: str, src: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, Optional[str]]:
    """``src`` cast to ``dtype``, and a message (the same on every rank) if finite values
    became infinite."""
    with np.errstate(over="ignore"):
        cast = src.astype(dtype)
    if cast.dtype == src.dtype or not (np.isfinite(src.astype(np.float64)) &
                                       ~np.isfinite(cast.astype(np.float64))).any():
        return cast, None
    return cast, (f"parameter {name} holds values beyond the range of dtype={dtype.name} (the "
                  f"saved dtype is {src.dtype.name}): the cast would give inf; load with a "
                  "wider dtype")


def _target(grid: Optional[ProcessGrid], into: Any) -> ProcessGrid:
    """The grid a load reads onto: ``into``'s, else ``grid``, else the default grid."""
    if into is not None:
        layers = layers_of(into)
        return layers[0][1].grid
    return grid if grid is not None else default_grid()


def load_checkpoint(path: Union[str, os.PathLike[str]], grid: Optional[ProcessGrid] = None, *,
                    cls: Optional[type] = None, into: Any = None, verify: bool = True,
                    **options: Any) -> Any:
    """The layer saved in ``path``, re-sharded onto ``grid`` (default: 1D over COMM_WORLD; any
    size and shape). ``cls`` requires the saved class; ``options`` override saved constructor
    options (``dtype`` casts; a cast that overflows raises). ``into``: read into an existing
    layer or composite instead (its grid is used; ``grid``, if given, must be it). ``verify``
    recomputes the checksums. Collective: every argument agreed, the manifest checked on rank
    0 and broadcast, each rank ``Read_all``s its block; errors are raised on every rank."""
    if grid is not None and not isinstance(grid, ProcessGrid):
        raise ValueError(f"grid is a {type(grid).__module__}.{type(grid).__name__}: expected a "
                         "tpmpi.ProcessGrid")
    try:
        target, into_error = _target(grid, into), None
    except ValueError as exc:  # into= is not a layer: reported by every rank together
        target, into_error = grid if grid is not None else default_grid(), f"into: {exc}"
    comm = target.comm
    path = _agree_load(comm, path, cls=cls, into=into, into_error=into_error,
                       other_grid=into is not None and grid is not None and target is not grid,
                       verify=verify, options=options)
    manifest = _agree_root(comm, lambda: read_manifest(path))
    want = type(into) if into is not None else cls
    if want not in (None, ParallelLinear, Composite) and manifest["class"] != want.__name__:
        raise ValueError(f"checkpoint {path!r} holds a {manifest['class']}, not a "
                         f"{want.__name__}")
    entries = manifest["parameters"]
    if verify:
        _verify(comm, path, entries)
    if into is None:
        if manifest["config"] is None:
            raise ValueError(f"checkpoint {path!r}: {manifest['class']} has no saved config; "
                             "construct it and pass into=")
        into = _layer_class(manifest["class"])(grid=target, **{**manifest["config"], **options})
    params = parameters(into)

    def shapes_match() -> None:
        have = {p.name: p.shape for p in params}
        saved = {name: tuple(e["shape"]) for name, e in entries.items()}
        if have != saved:
            raise ValueError(f"checkpoint {path!r}: parameter shapes {saved} do not match the "
                             f"layer's {have}")

    agree_checks(comm, shapes_match)
    _read_all(path, params, entries)
    return into


def _agree_load(comm: MPI.Comm, path: Any, *, cls: Any, into: Any, into_error: Optional[str],
                other_grid: bool, verify: Any, options: dict) -> str:
    """The absolute ``path`` after agreeing every argument of :func:`load_checkpoint` (the same
    ValueError on every rank for a bad or differing one). Collective."""
    def local_checks() -> None:
        if into_error:
            raise ValueError(into_error)
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path={path!r}: expected a str or os.PathLike")
        if not isinstance(verify, bool):
            raise ValueError(f"verify={verify!r}: expected True or False")
        if cls is not None and not isinstance(cls, type):
            raise ValueError(f"cls={cls!r}: expected a layer class or None")
        if other_grid:
            raise ValueError("into= and grid= name different grids: pass one of them (into's "
                             "grid is used)")
        if into is not None and options:
            raise ValueError(f"options {sorted(options)} are not used with into= (the layer is "
                             "already built): drop them")

    where = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path
    agree_checks(comm, local_checks, call=Same(Text("load_checkpoint()"), CALL_ORDER), path=where,
                 cls=None if cls is None else f"{cls.__module__}.{cls.__qualname__}"
                 if isinstance(cls, type) else repr(cls),
                 into=Same(None if into is None or into_error else identities(into),
                           "every rank must pass into= the same layer object, or none"),
                 verify=verify, options=options)
    return where


def _verify(comm: MPI.Intracomm, path: str, entries: dict) -> None:
    """Recompute the checksum of every parameter file of the manifest ``entries``; the same
    ValueError on every rank for a corrupted one. Collective."""
    for entry in entries.values():
        nbytes = math.prod(entry["shape"]) * np.dtype(entry["dtype"]).itemsize
        got = checksum(comm, os.path.join(path, entry["file"]), entry["header_bytes"], nbytes,
                       entry["checksum"].get("chunk_bytes", CHUNK_BYTES))
        if got != entry["checksum"]["value"]:
            raise ValueError(f"checkpoint {path!r}: {entry['file']} is corrupted (checksum "
                             f"{got} != {entry['checksum']['value']} in the manifest)")


def _read_all(path: str, params: list[Param], entries: dict) -> None:
    """Read every parameter's block; casts are checked for overflow on every rank before any
    parameter is changed. Collective."""
    casts, problems = [], []
    for p in params:
        entry = entries[p.name]
        dtype = np.dtype(entry["dtype"])
        filename = os.path.join(path, entry["file"])
        if isinstance(p.local, np.ndarray) and p.local.dtype == dtype and \
                p.local.flags.c_contiguous:
            continue  # read in place below, after the agreement
        host = np.empty(p.local.shape, dtype)
        _read(p, filename, entry["header_bytes"], dtype, host)
        cast, problem = _cast(p.name, host, np.dtype(p.local.dtype))
        problems.append(problem)
        casts.append((p, cast))
    errors = [f"checkpoint {path!r}: {msg}" for msg in problems if msg]
    agree(params[0].grid.comm, errors[0] if errors else None)
    for p in params:
        entry = entries[p.name]
        if not any(q is p for q, _ in casts):
            _read(p, os.path.join(path, entry["file"]), entry["header_bytes"],
                  np.dtype(entry["dtype"]), p.local)
    for p, cast in casts:
        p.local[...] = backend_of(p.local).asarray(cast)


def _load_as(cls: type, path: Union[str, os.PathLike[str]], grid: Optional[ProcessGrid] = None,
             **options: Any) -> Any:
    """A layer of this class from the checkpoint directory ``path``, re-sharded onto ``grid``
    (any shape and size); ``options`` override saved constructor options. Collective (see
    :func:`load_checkpoint`)."""
    return load_checkpoint(path, grid=grid, cls=cls, **options)


# ``Layer.load_checkpoint(path, grid=..., **options)``, the classmethod of every layer and
# composite, attached here: checkpoints depend on the layers, the layers never on checkpoints.
for _base in (ParallelLinear, Composite):
    # attached at runtime: the layer classes do not declare it
    setattr(_base, "load_checkpoint", classmethod(_load_as))  # noqa: B010
