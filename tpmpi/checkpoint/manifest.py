"""``manifest.json``: the checkpoint's commit point and its schema -- reading it, checking the
type of every field a load uses, and checking every file it lists (present, a matching .npy
header, the exact size). Every function here is local (rank 0 runs them; the caller agrees)."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from numpy.lib import format as npy

from .._version import __version__
from ..core.args import check_field
from ..core.dtypes import SUPPORTED, resolve_dtype
from ..core.layout import LAYOUTS
from .npyfile import CHUNK_BYTES
from .params import BLOCKS

SAVED_LAYOUTS = LAYOUTS + (BLOCKS,)
"""The layouts a manifest may name: the block layouts and the layer-placed blocks."""

MANIFEST = "manifest.json"


FORMAT = "tpmpi-checkpoint"


FORMAT_VERSION = 2


READABLE_VERSIONS = (1, 2)


def load_json(path: str) -> dict:
    where = os.path.join(path, MANIFEST)
    if not os.path.isfile(where):
        raise ValueError(f"no checkpoint at {path!r}: {MANIFEST} is missing")
    try:
        with open(where) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"unreadable checkpoint manifest {where!r}: {exc}") from None


def _check_entry(at: str, entry: Any, version: int) -> None:
    """ValueError naming the first field of a file entry (a parameter's or a state array's)
    that a load could not use."""
    filename = check_field(at, entry, "file", str, "a file name inside the checkpoint")
    if os.path.isabs(filename) or ".." in filename.split("/"):
        raise ValueError(f"{at}: field 'file' is {filename!r}: expected a file name inside "
                         "the checkpoint")
    shape = check_field(at, entry, "shape", list, "a list of non-negative integers")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"{at}: field 'shape' is {shape!r}: expected a list of "
                         "non-negative integers")
    dtype = check_field(at, entry, "dtype", str, f"one of {', '.join(SUPPORTED)}")
    if dtype not in SUPPORTED:
        raise ValueError(f"{at}: field 'dtype' is {dtype!r}: expected one of "
                         f"{', '.join(SUPPORTED)}")
    if version >= 2:
        check_field(at, entry, "npy_dtype", str, "a .npy dtype string")
    layout = check_field(at, entry, "layout", str, f"one of {', '.join(SAVED_LAYOUTS)}")
    if layout not in SAVED_LAYOUTS:
        raise ValueError(f"{at}: field 'layout' is {layout!r}: expected one of "
                         f"{', '.join(SAVED_LAYOUTS)}")
    check_field(at, entry, "header_bytes", int, "an integer")
    crc = check_field(at, entry, "checksum", dict, "an object with 'value' and 'chunk_bytes'")
    check_field(at + ", checksum", crc, "value", int, "an integer")
    chunk = crc.get("chunk_bytes", CHUNK_BYTES)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"{at}, checksum: field 'chunk_bytes' is {chunk!r}: expected a "
                         "positive integer")


def entries_of(manifest: dict) -> dict:
    """Every file entry of a checked manifest by the name of its Param: the parameters
    (``fc1.weight``) and the state arrays (``state/<group>/<parameter>``)."""
    return {**manifest["parameters"],
            **{f"state/{group}/{name}": entry
               for group, arrays in manifest.get("state", {}).items()
               for name, entry in arrays.items()}}


def check_manifest(path: str, manifest: Any) -> dict:
    """``manifest`` after checking its schema (types of every field used by load); ValueError
    naming the first bad field, its value and what was expected. Local."""
    where = f"checkpoint manifest {os.path.join(path, MANIFEST)!r}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where} is not a tpmpi checkpoint manifest (no \"format\": "
                         f"\"{FORMAT}\")")
    version = check_field(where, manifest, "format_version", int, "an integer")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: format_version {version} is not one this tpmpi "
                         f"({__version__}) reads ({', '.join(map(str, READABLE_VERSIONS))}); "
                         "upgrade tpmpi")
    check_field(where, manifest, "class", str, "a class name")
    if manifest.get("config") is not None:
        check_field(where, manifest, "config", dict, "an object of constructor options or null")
    entries = check_field(where, manifest, "parameters", dict, "a non-empty object of parameters")
    if not entries:
        raise ValueError(f"{where}: field 'parameters' is {{}}: expected a non-empty object of "
                         "parameters")
    for name, entry in entries.items():
        _check_entry(f"{where}, parameter {name!r}", entry, version)
    state = check_field(where, manifest, "state", dict, "an object {group: {parameter: entry}}") \
        if "state" in manifest else {}
    for group, arrays in state.items():
        at = f"{where}, state {group!r}"
        if not isinstance(arrays, dict):
            raise ValueError(f"{at} is {arrays!r}: expected an object {{parameter: entry}}")
        for name, entry in arrays.items():
            _check_entry(f"{at}, parameter {name!r}", entry, version)
            if entry["shape"] != entries.get(name, {}).get("shape"):
                raise ValueError(f"{at}, parameter {name!r}: field 'shape' is "
                                 f"{entry['shape']!r}: expected the shape of a parameter "
                                 f"{name!r}")
    if manifest.get("meta") is not None:
        check_field(where, manifest, "meta", dict, "an object or null")
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
    manifest = check_manifest(path, load_json(path))
    for name, entry in entries_of(manifest).items():
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
