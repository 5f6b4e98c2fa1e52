"""Saving a checkpoint: rank 0 locks the path, cleans what crashed saves left and creates the
next version directory; every rank writes its blocks; rank 0 writes the manifest and commits
by one ``os.replace`` of ``manifest.json``, then removes the previous version and the lock
(see :mod:`tpmpi.checkpoint` for the format and the crash guarantees). Under a mesh, replica 0
writes for every replica; a failed write anywhere is agreed before the commit, undone, and
reported on every rank."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from .._version import __version__
from ..core.agreement import CALL_ORDER, Same, Text, agree, agree_checks, agree_on_root
from ..core.mesh import Mesh
from ..layers.data_parallel import replica_differences
from .lock import SaveLock
from .load import layers_of, unwrap
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, check_manifest, entries_of, load_json
from .npyfile import CHECKSUM, CHUNK_BYTES, checksum, file_dtype, fsync_path, io_reason, write_param
from .params import Param, identities, params_of, state_params

VERSION_DIR = re.compile(r"v\d{6}$")

STEP_HOOK: Optional[Callable[[str], None]] = None
"""Test hook: called with the name of each step of a save, on every rank that reaches it (the
kill-at-every-step test ends a rank there)."""


def _step(name: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(name)


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
    return {e["file"].split("/")[0] for e in entries_of(manifest).values()}


class _Save:
    """Rank 0's side of a save: lock, clean, new version directory, commit, cleanup."""

    def __init__(self, path: str, groups: list[str]):
        self.path, self.token, self.groups = path, uuid.uuid4().hex[:12], groups
        self.lock = SaveLock(path, self.token)
        self.previous: Optional[dict] = None
        self.version = ""
        self.switched = False

    def prepare(self) -> tuple[str, Optional[str]]:
        """Lock, clean, create the next version directory; returns ``(new version, the
        committed version or None)``. ValueError naming the file and the reason."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"checkpoint path {self.path!r} is a file: expected a directory")
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock.acquire()
        except OSError as exc:
            raise ValueError(f"creating {exc.filename or self.path}: {io_reason(exc)}") from None
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
            for group in self.groups:
                os.makedirs(os.path.join(self.path, self.version, "state", group))
            _step("version-dir")
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise ValueError(f"creating {exc.filename or self.path}: {io_reason(exc)}"
                                 ) from None
            raise
        return self.version, _version_of(self.previous)

    def commit(self, manifest: dict) -> Optional[str]:
        """Fsync, switch ``manifest.json`` (one rename), then remove the previous version and
        the lock. A failure before the switch raises (the caller aborts: the previous version
        stays committed); a failure to sync the directory after it is returned as a message
        (the new version is committed, the previous one kept)."""
        tmp = os.path.join(self.path, f".{MANIFEST}.tmp-{self.token}")
        folder = os.path.join(self.path, self.version)
        doing = f"writing {tmp}"
        try:
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            doing = f"syncing the directory {folder}"
            fsync_path(folder)
            _step("manifest-written")
            doing = f"renaming {tmp} to {MANIFEST}"
            os.replace(tmp, os.path.join(self.path, MANIFEST))  # the commit
        except OSError as exc:
            _remove(tmp)
            raise ValueError(f"{doing}: {io_reason(exc)}") from None
        self.switched = True
        _step("switched")
        try:
            fsync_path(self.path)
        except OSError as exc:
            self.release()
            return (f"{self.version} is committed, but syncing the directory {self.path} failed "
                    f"({io_reason(exc)}), so the switch may not survive a crash: the previous "
                    f"version ({_version_of(self.previous) or 'none'}) is kept")
        _step("dir-synced")
        for name in _referenced(self.previous) - {self.version}:
            _remove(os.path.join(self.path, name))
        _step("old-removed")
        self.release()
        _step("unlocked")
        return None

    def release(self) -> None:
        """Release the lock; nothing raised (the save's own outcome is what is reported)."""
        with contextlib.suppress(OSError):
            self.lock.release()

    def abort(self) -> None:
        """After a failure: drop the new version directory unless it was committed, and the
        lock."""
        if self.version and not self.switched:
            _remove(os.path.join(self.path, self.version))
        self.release()


def _version_of(manifest: Optional[dict]) -> Optional[str]:
    """The version directory a committed manifest names (None for none)."""
    return next(iter(sorted(_referenced(manifest))), None)


def _write(p: Param, path: str, version: str) -> dict:
    """Write ``p`` into the version directory; its manifest entry (with the checksum of the
    file as written). Collective over ``p.grid.comm``; agreed failures raise everywhere."""
    filename = os.path.join(path, version, f"{p.name}.npy")
    header_bytes = write_param(p, filename)
    _step(f"written:{p.name}")
    nbytes = math.prod(p.shape) * p.local.dtype.itemsize
    entry = {"file": f"{version}/{p.name}.npy", "shape": list(p.shape),
             "dtype": p.local.dtype.name, "npy_dtype": file_dtype(p.local.dtype).str,
             "layout": p.layout, "header_bytes": header_bytes,
             "checksum": {"algorithm": CHECKSUM, "chunk_bytes": CHUNK_BYTES,
                          "value": checksum(p.grid.comm, filename, header_bytes, nbytes)}}
    _step(f"checksum:{p.name}")
    return entry


def _agree_replicas(mesh: Mesh, params: list[Param]) -> None:
    """The same ValueError on every rank of ``mesh`` unless every data-parallel replica holds
    the same values (bitwise: crc32 of each local block) as replica 0, whose copy is written.
    Collective (:func:`tpmpi.layers.data_parallel.replica_differences`, an agreement over the
    mesh)."""
    differ, error = replica_differences(mesh, [(p.name, p.local) for p in params]), None
    if differ:
        name, ranks = differ[0]
        error = (f"the data-parallel replicas hold different values of {name} (replica(s) "
                 f"{', '.join(map(str, ranks))} differ from replica 0): save_checkpoint writes "
                 "replica 0's copy for every replica, so they must be identical (the same "
                 "seeds, gradients averaged by DataParallel, the same updates)")
    agree(mesh.comm, error, call=Same(Text("save_checkpoint(): replica check"), CALL_ORDER))


def _extras(params: list[Param], state: Any, meta: Any
            ) -> tuple[list[Param], Optional[str], Optional[str]]:
    """``(state arrays as Params, meta as JSON text, the problem with either or None)``: the
    problem is reported by every rank together. Local."""
    try:
        extra = state_params(params, state) if state is not None else []
    except ValueError as exc:
        return [], None, str(exc)
    if meta is None:
        return extra, None, None
    if not isinstance(meta, Mapping):
        return extra, None, f"meta is a {type(meta).__name__}: expected a dict"
    try:
        return extra, json.dumps(dict(meta), sort_keys=True), None
    except (TypeError, ValueError) as exc:
        return extra, None, f"meta: {exc}: expected a JSON-serialisable dict"


def _sections(entries: dict, groups: list[str]) -> dict:
    """The manifest's ``parameters`` and ``state`` sections of the written ``entries``."""
    return {"parameters": {name: e for name, e in entries.items() if "/" not in name},
            "state": {g: {name.split("/", 2)[2]: e for name, e in entries.items()
                          if name.startswith(f"state/{g}/")} for g in groups}}


def save_checkpoint(path: Union[str, os.PathLike[str]], module: Any, *,
                    state: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``module`` (a ParallelLinear, a composite of them, or a
    :class:`~tpmpi.DataParallel` of either) to the directory ``path`` as one ``.npy`` per
    parameter plus ``manifest.json``, committed as a whole by one rename (see the module
    docstring); a concurrent save to the same path is refused.

    ``state``: arrays that follow the parameters' layouts, e.g. an optimizer's moments,
    ``{group: {parameter name: local array of that parameter's local shape}}`` (``{"adam.m":
    {"fc1.weight": m1, ...}, "adam.v": {...}}``); saved as ``state/<group>/<name>.npy`` and
    re-sharded on load like the parameters (:func:`tpmpi.load_checkpoint` ``state=``).
    ``meta``: a small JSON-serialisable dict (step, learning rate, ...) kept in the manifest.

    Collective over the module's grid, or under a mesh (a DataParallel, or a module built on
    ``mesh.tp``) over the whole mesh: every rank calls it, replica 0 writes (its TP ranks in
    parallel; mesh rank 0 locks and commits), the other replicas check that they hold the same
    values and return, or raise, with replica 0. A write that fails on any rank (a full or
    failing file system) raises the same ValueError on every rank, naming the file and the
    reason, and leaves the previous checkpoint committed and loadable."""
    module, mesh = unwrap(module)
    leaves = layers_of(module)
    params = params_of(leaves)
    scope = mesh.comm if mesh is not None else params[0].grid.comm
    try:
        path = os.path.abspath(os.fspath(path))
    except TypeError:
        pass  # reported by local_checks
    extra, meta_text, problem = _extras(params, state, meta)

    def local_checks() -> None:
        if not isinstance(path, str):
            raise ValueError(f"path={path!r}: expected a str or os.PathLike")
        if any(p.grid.comm is not params[0].grid.comm for p in params):
            raise ValueError("the layers of a composite must share one grid to be saved")
        if problem:
            raise ValueError(problem)

    agree_checks(scope, local_checks, call=Same(Text("save_checkpoint()"), CALL_ORDER),
                 path=path, layer=Same(identities(leaves), "every rank must save the same "
                                                           "layer object"),
                 parameters=[(p.name, p.shape, str(p.local.dtype)) for p in params],
                 state=[(p.name, str(p.local.dtype)) for p in extra], meta=meta_text)
    _step("agreed")
    assert isinstance(path, str)  # else local_checks raised on every rank
    params += extra
    if mesh is not None and mesh.dp > 1:
        _agree_replicas(mesh, params)
    groups = sorted({p.name.split("/")[1] for p in extra})
    save = _Save(path, groups) if scope.Get_rank() == 0 else None
    try:
        version, previous = agree_on_root(scope, save.prepare if save else None)
    except ValueError as exc:
        raise ValueError(f"save_checkpoint({path!r}) failed: {exc}; {path!r} is unchanged"
                         ) from None
    _step("prepared")
    entries: dict = {}
    try:
        error = None
        if mesh is None or mesh.dp_rank == 0:  # the writers
            try:
                entries = {p.name: _write(p, path, version) for p in params}
            except Exception as exc:  # noqa: BLE001 - agreed below (I/O errors: AgreedFile's)
                error = str(exc) if isinstance(exc, ValueError) else \
                    f"{type(exc).__name__}: {exc}"
        agree(scope, error)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "tpmpi_version": __version__,
            "class": type(module).__name__,
            "config": module.config() if hasattr(module, "config") else None,
            "layers": {prefix: type(sub).__name__ for prefix, sub in leaves},
            "grid": list(params[0].grid.shape), "world_size": params[0].grid.size,
            "dp": mesh.dp if mesh is not None else 1, **_sections(entries, groups),
            "meta": json.loads(meta_text) if meta_text else None}
        late = agree_on_root(scope, (lambda: save.commit(manifest)) if save else None)
    except ValueError as exc:
        if save is not None:
            save.abort()
        kept = f"{path!r} still holds {previous}, unchanged" if previous else \
            f"there was no checkpoint at {path!r} before and there is none now"
        raise ValueError(f"save_checkpoint({path!r}) failed: {exc}; {kept}") from None
    if late:
        raise ValueError(f"save_checkpoint({path!r}): {late}")
