"""Reading a checkpoint onto any grid, whatever the layer: every argument agreed, the manifest
checked on rank 0 and broadcast, the checksums recomputed, each rank reading only its block;
dtype casts that would overflow refused on every rank.

This module knows no layer class: the caller names the classes a checkpoint may hold and how
to list a module's leaf layers. It sits below the layers, whose ``load_checkpoint``
classmethods call it (:meth:`tpmpi.layers.ParallelLinear.load_checkpoint`,
:meth:`tpmpi.layers.Composite.load_checkpoint`); :func:`tpmpi.load_checkpoint`
(:mod:`tpmpi.checkpoint.load`) calls it for any layer or composite.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
from mpi4py import MPI

from ..core.agreement import CALL_ORDER, Same, Text, agree, agree_checks, agree_on_root
from ..core.backend import backend_of
from ..core.grid import ProcessGrid, default_grid
from ..core.mesh import Mesh, mesh_of
from .manifest import entries_of, read_manifest
from .npyfile import CHUNK_BYTES, checksum, read_param
from .params import Param, identities, params_of, state_params

Leaves = Callable[[Any], list[tuple[str, Any]]]
"""``(dotted name, leaf layer)`` of every leaf of a layer or composite, in forward order."""


def _layer_class(name: str, roots: Sequence[type]) -> type:
    """The class called ``name`` among ``roots`` and their subclasses (tpmpi's, or ones defined
    by the program that loads)."""
    todo = list(roots)
    while todo:
        klass = todo.pop(0)
        if klass.__name__ == name:
            return klass
        todo.extend(klass.__subclasses__())
    raise ValueError(f"checkpoint class {name!r} is not a "
                     f"{' or '.join(r.__name__ for r in roots)}")


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


def _target(grid: Optional[ProcessGrid], into: Any, leaves: Leaves) -> ProcessGrid:
    """The grid a load reads onto: ``into``'s, else ``grid``, else the default grid."""
    if into is not None:
        return leaves(into)[0][1].grid
    return grid if grid is not None else default_grid()


def read_checkpoint(path: Union[str, os.PathLike[str]], grid: Optional[ProcessGrid] = None, *,
                    roots: Sequence[type], leaves: Leaves, cls: Optional[type] = None,
                    into: Any = None, verify: bool = True, options: Optional[dict] = None,
                    state: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    meta: Optional[dict] = None, mesh: Optional[Mesh] = None) -> Any:
    """The layer or composite saved in ``path``, re-sharded onto ``grid`` (default: 1D over
    COMM_WORLD; any size and shape), or read ``into`` an existing one (its grid is used;
    ``grid``, if given, must be it). ``roots``: the classes that the saved class may be or
    derive from; ``cls`` (one of them, or a subclass) requires the saved class unless it is a
    root; ``leaves(obj)``: the ``(name, leaf layer)`` of a layer or composite
    (:func:`tpmpi.layers.named_layers`). ``options`` override saved constructor options
    (``dtype`` casts; a cast that overflows raises); ``verify`` recomputes the checksums of the
    files read.

    ``state`` (with ``into``): ``{group: {parameter name: local array}}`` filled in place from
    the saved state, each array of its parameter's local shape on this grid; ``meta``: a dict
    updated in place with the saved ``meta``.

    Collective: every argument agreed, the manifest checked on rank 0 and broadcast, each rank
    ``Read_at_all``s its block; errors are raised on every rank. Under a mesh (``mesh``, else
    the mesh whose TP grid is ``grid`` or ``into``'s grid) every rank of the mesh calls it,
    each replica reads its blocks, and the outcome is agreed over the whole mesh."""
    if mesh is None:
        mesh = _mesh(grid, into, leaves)
    if mesh is None:
        return _read(path, grid, roots=roots, leaves=leaves, cls=cls, into=into, verify=verify,
                     options=dict(options or {}), state=state, meta=meta)
    result, error = None, None
    try:
        result = _read(path, grid, roots=roots, leaves=leaves, cls=cls, into=into,
                       verify=verify, options=dict(options or {}), state=state, meta=meta)
    except ValueError as exc:  # raised on every rank of this replica
        error = str(exc)
    agree(mesh.comm, error, call=Same(Text("load_checkpoint() over a mesh"), CALL_ORDER),
          path=str(path))
    return result


def _mesh(grid: Optional[ProcessGrid], into: Any, leaves: Leaves) -> Optional[Mesh]:
    """The mesh whose TP grid ``into`` is built on (else ``grid``), or None. Local."""
    if into is None:
        return mesh_of(grid)
    try:
        return mesh_of(leaves(into)[0][1].grid)
    except ValueError:
        return None  # not a module: the argument checks say so on every rank


def _read(path: Any, grid: Optional[ProcessGrid], *, roots: Sequence[type], leaves: Leaves,
          cls: Any, into: Any, verify: Any, options: dict, state: Any, meta: Any) -> Any:
    """:func:`read_checkpoint` over one grid. Collective over it."""
    if grid is not None and not isinstance(grid, ProcessGrid):
        raise ValueError(f"grid is a {type(grid).__module__}.{type(grid).__name__}: expected a "
                         "tpmpi.ProcessGrid")
    try:
        target, into_error = _target(grid, into, leaves), None
    except ValueError as exc:  # into= is not a layer: reported by every rank together
        target, into_error = grid if grid is not None else default_grid(), f"into: {exc}"
    comm = target.comm
    path = _agree_load(comm, path, cls=cls, into=into, into_error=into_error, leaves=leaves,
                       other_grid=into is not None and grid is not None and target is not grid,
                       verify=verify, options=options, state=state, meta=meta)
    manifest = agree_on_root(comm, lambda: read_manifest(path))
    want = type(into) if into is not None else cls
    if want is not None and want not in roots and manifest["class"] != want.__name__:
        raise ValueError(f"checkpoint {path!r} holds a {manifest['class']}, not a "
                         f"{want.__name__}")
    if into is None:
        if manifest["config"] is None:
            raise ValueError(f"checkpoint {path!r}: {manifest['class']} has no saved config; "
                             "construct it and pass into=")
        into = _layer_class(manifest["class"], roots)(grid=target,
                                                      **{**manifest["config"], **options})
    params = params_of(leaves(into))
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
                leaves: Leaves, other_grid: bool, verify: Any, options: dict, state: Any,
                meta: Any) -> str:
    """The absolute ``path`` after agreeing every argument of :func:`read_checkpoint` (the same
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
                 into=Same(None if into is None or into_error else identities(leaves(into)),
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
    comm = params[0].grid.comm
    # read_param is collective, so every rank must read a parameter in the same loop below:
    # in place only where every rank can (a view, e.g. a piece of a fused weight, may be
    # contiguous on a rank that holds none of it and not on the others)
    inplace = np.array([isinstance(p.local, np.ndarray) and p.local.flags.c_contiguous
                        and p.local.dtype == np.dtype(entries[p.name]["dtype"])
                        for p in params], dtype=np.int8)
    comm.Allreduce(MPI.IN_PLACE, inplace, op=MPI.MIN)
    for p, direct in zip(params, inplace):
        entry = entries[p.name]
        dtype = np.dtype(entry["dtype"])
        filename = os.path.join(path, entry["file"])
        if direct:
            continue  # read in place below, after the agreement
        host = np.empty(p.local.shape, dtype)
        read_param(p, filename, entry["header_bytes"], dtype, host)
        cast, problem = _cast(p.name, host, np.dtype(p.local.dtype))
        problems.append(problem)
        casts.append((p, cast))
    errors = [f"checkpoint {path!r}: {msg}" for msg in problems if msg]
    agree(comm, errors[0] if errors else None)
    for p, direct in zip(params, inplace):
        entry = entries[p.name]
        if direct:
            read_param(p, os.path.join(path, entry["file"]), entry["header_bytes"],
                       np.dtype(entry["dtype"]), p.local)
    for p, cast in casts:
        p.local[...] = backend_of(p.local).asarray(cast)
