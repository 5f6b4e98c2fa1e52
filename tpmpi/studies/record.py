"""Result records: typed dataclasses whose fields are the documented JSON schema
(docs/record-schema.md), and :func:`write_record`, the one function that writes JSON lines.

A record reads like the JSON object it becomes (a read-only mapping: ``rec["time_s"]``,
``rec.get("speedup")``), so that tables, flags and reports take a fresh record and one loaded
from a file alike. Fields marked bench-only are left out of the JSON object while unset.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Optional, TextIO

from mpi4py import MPI

from .._version import __version__


def first_line(version: str) -> str:
    """The first line of an MPI library version string, read as C reads it: up to the first
    NUL (Open MPI 4.1's string carries its terminator, and JSON would keep it as ``\\u0000``),
    without surrounding white space."""
    lines = version.split("\x00", 1)[0].strip().splitlines()
    return lines[0].strip() if lines else ""


@functools.lru_cache(maxsize=1)
def mpi_library() -> str:
    """First line of ``MPI_Get_library_version``, as :func:`first_line` cleans it."""
    return first_line(MPI.Get_library_version())


def utc_timestamp() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _Record(Mapping):
    """The JSON object of a dataclass record: its fields in order, without the unset
    :attr:`OPTIONAL` ones."""

    OPTIONAL: ClassVar[tuple] = ()

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name not in self.OPTIONAL or getattr(self, f.name) is not None]

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


@dataclasses.dataclass(eq=False)
class RunRecord(_Record):
    """A scheme record of ``run`` and ``bench`` (docs/record-schema.md, "Scheme record")."""

    OPTIONAL: ClassVar[tuple] = ("sweep",)

    scheme: str
    ranks: int
    grid: str
    mesh: dict
    m: int
    k: int
    n: int
    hidden: Optional[int]
    dtype: str
    backend: str
    gpu_aware: bool
    threads_per_rank: Optional[int]
    warmup: int
    iters: int
    backward: bool
    options: dict
    time_s: dict  # {median, min, max} (tpmpi.studies.stats.summary)
    fwd_s: Optional[float]
    bwd_s: Optional[float]
    gemm_s: float
    comm_s: float
    spread: dict
    gflops: Optional[float]
    comm_bytes: float
    d2h_bytes: int
    h2d_bytes: int
    staging_s: float
    collectives: dict
    dp_bytes: float
    dp_comm_s: float
    algbw_gbs: Optional[float]
    busbw_gbs: Optional[float]
    mem_peak_bytes: int
    max_rel_err: Optional[float]
    tolerance: float
    predicted_s: Optional[float]
    predicted: Optional[dict]
    overlap: Optional[dict]
    baseline_s: Optional[float]
    baseline_threads: Optional[int]
    speedup: Optional[float]
    efficiency: Optional[float]
    load_per_cpu: float
    oversubscription: float
    blas: dict
    flags: list = dataclasses.field(default_factory=list)  # tpmpi.studies.stats.flags of the record
    mpi_library: str = dataclasses.field(default_factory=mpi_library)
    version: str = __version__
    timestamp: str = dataclasses.field(default_factory=utc_timestamp)
    sweep: Optional[dict] = None  # bench only: {kind, dim}


@dataclasses.dataclass(eq=False)
class CollectiveRecord(_Record):
    """A record of ``bench --collective`` (docs/record-schema.md, "Collective record")."""

    collective: str
    ranks: int
    size: int
    count: int
    dtype: str
    backend: str
    gpu_aware: bool
    buffers: str
    warmup: int
    iters: int
    time_s: float
    algbw_gbs: Optional[float]
    busbw_gbs: Optional[float]
    wrong: Optional[int]
    mpi_library: str = dataclasses.field(default_factory=mpi_library)
    version: str = __version__
    timestamp: str = dataclasses.field(default_factory=utc_timestamp)


def write_record(rec: Mapping, fh: Optional[TextIO]) -> None:
    """Append ``rec`` (a record, or any JSON-ready mapping) to ``fh`` as one JSON line and
    flush (call on rank 0 only; nothing without a file)."""
    if fh is not None:
        fh.write(json.dumps(dict(rec)) + "\n")
        fh.flush()
