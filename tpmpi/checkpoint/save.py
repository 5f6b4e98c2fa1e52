"""Saving a checkpoint: rank 0 locks the path, cleans what crashed saves left and creates the
next version directory; every rank writes its blocks; rank 0 writes the manifest and commits
by one ``os.replace`` of ``manifest.json``, then removes the previous version and the lock
(see :mod:`tpmpi.checkpoint` for the format and the crash guarantees)."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from typing import Any, Callable, Optional, Union

from .._version import __version__
from ..core.agreement import CALL_ORDER, Same, Text, agree, agree_checks, agree_on_root
from .lock import SaveLock
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, check_manifest, load_json
from .npyfile import CHECKSUM, CHUNK_BYTES, checksum, file_dtype, write_param
from .load import layers_of
from .params import identities, params_of

VERSION_DIR = re.compile(r"v\d{6}$")

STEP_HOOK: Optional[Callable[[str], None]] = None
"""Test hook: called with the name of each step of a save, on every rank that reaches it (the
kill-at-every-step test ends a rank there)."""


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        return check_manifest(path, load_json(path))
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
    leaves = layers_of(layer)
    params = params_of(leaves)
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
                 layer=Same(identities(leaves), "every rank must save the same layer object"),
                 parameters=[(p.name, p.shape, str(p.local.dtype)) for p in params])
    _step("agreed")
    assert isinstance(path, str)  # else local_checks raised on every rank
    save = _Save(path) if comm.Get_rank() == 0 else None
    version = agree_on_root(comm, save.prepare if save else None)
    _step("prepared")
    entries, error = {}, None
    try:
        for p in params:
            filename = os.path.join(path, version, f"{p.name}.npy")
            header_bytes = write_param(p, filename)
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
        "layers": {prefix: type(sub).__name__ for prefix, sub in leaves},
        "grid": list(params[0].grid.shape), "world_size": comm.Get_size(),
        "parameters": entries}
    agree_on_root(comm, (lambda: save.commit(manifest)) if save else None)
