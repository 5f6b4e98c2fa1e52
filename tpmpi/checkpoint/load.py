"""Loading a checkpoint onto any grid: every argument agreed, the manifest checked on rank 0 and
broadcast, the checksums recomputed, each rank reading only its block; dtype casts that would
overflow refused on every rank. Also attaches ``load_checkpoint`` as a classmethod to every
layer and composite class (the layers never import checkpoints)."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np
from mpi4py import MPI

from ..core.agreement import CALL_ORDER, Same, Text, agree, agree_checks, agree_on_root
from ..core.backend import backend_of
from ..core.grid import ProcessGrid, default_grid
from ..core.mesh import mesh_of
from ..layers.base import ParallelLinear
from ..layers.module import Composite
from .manifest import entries_of, read_manifest
from .npyfile import CHUNK_BYTES, checksum, read_param
from .params import Param, identities, layers_of, parameters, state_params, unwrap


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
                    state: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    meta: Optional[dict] = None, **options: Any) -> Any:
    """The layer saved in ``path``, re-sharded onto ``grid`` (default: 1D over COMM_WORLD; any
    size and shape). ``cls`` requires the saved class; ``options`` override saved constructor
    options (``dtype`` casts; a cast that overflows raises). ``into``: read into an existing
    layer, composite or :class:`~tpmpi.DataParallel` instead (its grid is used; ``grid``, if
    given, must be it). ``verify`` recomputes the checksums of the files read.

    ``state`` (with ``into``): ``{group: {parameter name: local array}}`` filled in place from
    the saved state (:func:`tpmpi.save_checkpoint` ``state=``), each array of its parameter's
    local shape on this grid; ``meta``: a dict updated in place with the saved ``meta``.

    Collective: every argument agreed, the manifest checked on rank 0 and broadcast, each rank
    ``Read_at_all``s its block; errors are raised on every rank. Under a mesh (a DataParallel,
    or a grid that is ``mesh.tp``) every rank of the mesh calls it, each replica reads its
    blocks, and the outcome is agreed over the whole mesh."""
    if into is not None:
        into, mesh = unwrap(into)
    else:
        mesh = mesh_of(grid)
    if mesh is None:
        return _load(path, grid, cls=cls, into=into, verify=verify, state=state, meta=meta,
                     options=options)
    result, error = None, None
    try:
        result = _load(path, grid, cls=cls, into=into, verify=verify, state=state, meta=meta,
                       options=options)
    except ValueError as exc:  # raised on every rank of this replica
        error = str(exc)
    agree(mesh.comm, error, call=Same(Text("load_checkpoint() over a mesh"), CALL_ORDER),
          path=str(path))
    return result


def _load(path: Any, grid: Optional[ProcessGrid], *, cls: Any, into: Any, verify: Any,
          state: Any, meta: Any, options: dict) -> Any:
    """:func:`load_checkpoint` over one grid. Collective over it."""
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
                       verify=verify, options=options, state=state, meta=meta)
    manifest = agree_on_root(comm, lambda: read_manifest(path))
    want = type(into) if into is not None else cls
    if want not in (None, ParallelLinear, Composite) and manifest["class"] != want.__name__:
        raise ValueError(f"checkpoint {path!r} holds a {manifest['class']}, not a "
                         f"{want.__name__}")
    if into is None:
        if manifest["config"] is None:
            raise ValueError(f"checkpoint {path!r}: {manifest['class']} has no saved config; "
                             "construct it and pass into=")
        into = _layer_class(manifest["class"])(grid=target, **{**manifest["config"], **options})
    params = parameters(into)
    params += _agree_state(comm, path, manifest, params, state)
    entries = entries_of(manifest)
    if verify:
        _verify(comm, path, [entries[p.name] for p in params])
    _read_all(path, params, entries)
    if meta is not None:
        meta.update(manifest.get("meta") or {})
    return into


def _agree_state(comm: MPI.Comm, path: str, manifest: dict, params: list[Param], state: Any
                 ) -> list[Param]:
    """The arrays of ``state`` as Params to read, after agreeing that the layer's parameter
    shapes are the saved ones and that the checkpoint holds every state array asked for.
    Collective: the same ValueError on every rank otherwise."""
    saved = manifest.get("state") or {}
    try:
        extra, problem = (state_params(params, state) if state is not None else []), None
    except ValueError as exc:
        extra, problem = [], str(exc)

    def local_checks() -> None:
        have = {p.name: p.shape for p in params}
        shapes = {name: tuple(e["shape"]) for name, e in manifest["parameters"].items()}
        if have != shapes:
            raise ValueError(f"checkpoint {path!r}: parameter shapes {shapes} do not match the "
                             f"layer's {have}")
        if problem:
            raise ValueError(problem)
        for p in extra:
            _, group, name = p.name.split("/", 2)
            if name not in saved.get(group, {}):
                held = ", ".join(f"{g} ({', '.join(a)})" for g, a in saved.items()) or "none"
                raise ValueError(f"checkpoint {path!r} holds no state {group!r} of {name} "
                                 f"(its state: {held})")

    agree_checks(comm, local_checks, state=[p.name for p in extra])
    return extra


def _agree_load(comm: MPI.Comm, path: Any, *, cls: Any, into: Any, into_error: Optional[str],
                other_grid: bool, verify: Any, options: dict, state: Any, meta: Any) -> str:
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
        if state is not None and into is None:
            raise ValueError("state= needs into= (the state arrays are shaped like the shards "
                             "of a layer you built)")
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"meta is a {type(meta).__name__}: expected a dict to update")

    where = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path
    agree_checks(comm, local_checks, call=Same(Text("load_checkpoint()"), CALL_ORDER), path=where,
                 cls=None if cls is None else f"{cls.__module__}.{cls.__qualname__}"
                 if isinstance(cls, type) else repr(cls),
                 into=Same(None if into is None or into_error else identities(into),
                           "every rank must pass into= the same layer object, or none"),
                 verify=verify, options=options)
    return where


def _verify(comm: MPI.Intracomm, path: str, entries: list[dict]) -> None:
    """Recompute the checksum of the file of every manifest entry of ``entries``; the same
    ValueError on every rank for a corrupted one. Collective."""
    for entry in entries:
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
        read_param(p, filename, entry["header_bytes"], dtype, host)
        cast, problem = _cast(p.name, host, np.dtype(p.local.dtype))
        problems.append(problem)
        casts.append((p, cast))
    errors = [f"checkpoint {path!r}: {msg}" for msg in problems if msg]
    agree(params[0].grid.comm, errors[0] if errors else None)
    for p in params:
        entry = entries[p.name]
        if not any(q is p for q, _ in casts):
            read_param(p, os.path.join(path, entry["file"]), entry["header_bytes"],
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
