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
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, ClassVar, Optional, TextIO

from mpi4py import MPI

from .._version import __version__
from ..core.args import check_field, is_number
from ..core.grid import parse_shape


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
    calibration: Optional[dict] = None  # calibration_facts of the model behind predicted_s
    model: Optional[dict] = None  # transformer schemes: tpmpi.studies.transformer.model_fields
    split: Optional[dict] = None  # transformer schemes: {predicted, measured} seconds by part
    gemm_peak_gflops: Optional[float] = None  # the job's GEMM rate MFU is measured against
    mfu: Optional[float] = None  # gflops / gemm_peak_gflops
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


def calibration_facts(cal: Any) -> dict:
    """What a record says about the :class:`~tpmpi.studies.costmodel.Calibration` behind its
    ``predicted_s``: ``source`` ("defaults", or "calibrate" for a file it wrote), the ``ranks``
    of the calibrate job, the communicator sizes its collectives were ``fitted`` at, and the
    machine it measured (``mpi_library``, ``backend``, ``blas`` library and kernel)."""
    machine = cal.machine if isinstance(cal.machine, dict) else {}
    blas = machine.get("blas")
    blas = blas if isinstance(blas, dict) else {}
    return {"source": machine.get("source", "file"), "ranks": machine.get("ranks"),
            "fitted": sorted({int(p) for table in cal.alpha.values() for p in table}),
            "mpi_library": machine.get("mpi_library"), "backend": machine.get("backend"),
            "blas": {k: blas.get(k) for k in ("library", "kernel")}}


def read_lines(paths: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """``("file:line", object)`` of every JSON line of the files, blank lines skipped;
    ValueError naming the file and the line of one that is not JSON."""
    for path in paths:
        with open(path) as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield f"{path}:{i}", json.loads(line)
                    except ValueError as exc:
                        raise ValueError(f"{path}:{i}: not JSON ({exc})") from None


def write_record(rec: Mapping, fh: Optional[TextIO]) -> None:
    """Append ``rec`` (a record, or any JSON-ready mapping) to ``fh`` as one JSON line and
    flush (call on rank 0 only; nothing without a file)."""
    if fh is not None:
        fh.write(json.dumps(dict(rec)) + "\n")
        fh.flush()


def _is_shape(text: str) -> bool:
    try:
        return min(parse_shape(text)) >= 1
    except ValueError:
        return False


def _from(low: float, above: bool = False) -> Callable[[Any], bool]:
    """A field test: a finite number >= ``low`` (> ``low`` when ``above``)."""
    return lambda v: is_number(v) and (v > low if above else v >= low)


_INT, _NUM = (int,), (int, float)
_COUNT = (_INT, _from(0), "an integer >= 0", True)
_SECONDS = (_NUM, _from(0), "seconds >= 0", True)
_MEDIAN = (_NUM, _from(0, above=True), "a positive number (seconds)", True)
_OPTIONAL_SECONDS = (_NUM, _from(0), "seconds >= 0", False)
_OPTIONAL_NUMBER = (_NUM, is_number, "a number or null", False)
# field (dotted path) -> (types, test, what is expected, required); an optional field may be
# absent or null. What report reads, each checked once so that tables and figures can trust it.
RUN_FIELDS: dict[str, tuple] = {
    "scheme": (str, bool, "a scheme name", True),
    "ranks": (_INT, _from(1), "a positive integer", True),
    "grid": (str, _is_shape, "a grid RxC of positive integers", True),
    "m": _COUNT, "k": _COUNT, "n": _COUNT,
    "hidden": (_INT, _from(0), "an integer >= 0 or null", False),
    "dtype": (str, bool, "a dtype name", True),
    "backward": (bool, None, "true or false", False),
    "iters": (_INT, _from(1), "a positive integer", False),
    "options": (dict, None, "an object or null", False),
    "mesh": (dict, None, "an object or null", False),
    "mesh.dp": (_INT, _from(1), "a positive integer", False),
    "sweep": (dict, None, "an object or null", False),
    "sweep.kind": (str, ("strong", "weak", "sizes").__contains__, "strong, weak or sizes", False),
    "sweep.dim": (str, ("m", "k", "n", "hidden").__contains__, "m, k, n or hidden", False),
    "time_s": (dict, None, "a summary {median, min, max} in seconds", True),
    "time_s.median": _MEDIAN, "time_s.min": _OPTIONAL_SECONDS, "time_s.max": _OPTIONAL_SECONDS,
    "gemm_s": _SECONDS, "comm_s": _SECONDS,
    "spread": (dict, None, "an object of summaries or null", False),
    **{f"spread.{t}": (dict, None, "a summary or null", False) for t in ("gemm_s", "comm_s")},
    **{f"spread.{t}.{s}": _OPTIONAL_SECONDS for t in ("gemm_s", "comm_s")
       for s in ("median", "min", "max")},
    "mem_peak_bytes": (_NUM, _from(0), "bytes >= 0", True),
    "predicted_s": (_NUM, _from(0, above=True), "a positive number or null", False),
    **dict.fromkeys(("gflops", "busbw_gbs", "speedup", "efficiency", "max_rel_err"),
                    _OPTIONAL_NUMBER),
    "flags": (list, lambda v: all(isinstance(f, str) for f in v), "a list of flag names",
              False),
    "calibration": (dict, None, "an object or null", False),
    "model": (dict, None, "an object or null", False),
    "split": (dict, None, "an object or null", False),
    **dict.fromkeys(("mfu", "gemm_peak_gflops"), _OPTIONAL_NUMBER),
}
COLLECTIVE_FIELDS: dict[str, tuple] = {
    "collective": (str, bool, "a collective name", True),
    "ranks": (_INT, _from(1), "a positive integer", True),
    "size": (_INT, _from(0), "bytes >= 0", True), "count": _COUNT,
    "dtype": (str, bool, "a dtype name", True),
    "time_s": _MEDIAN,
    **dict.fromkeys(("algbw_gbs", "busbw_gbs"), _OPTIONAL_NUMBER),
    "wrong": (_INT, _from(0), "an integer >= 0 or null", False),
}


def check_record(rec: Any, where: str) -> str:
    """The kind of ``rec`` ("scheme" for run/bench, "collective" for bench --collective) after
    checking every field report reads (:data:`RUN_FIELDS`, :data:`COLLECTIVE_FIELDS`): type,
    range and presence. ValueError ``"<where>: field 'time_s.median' is 0: expected a positive
    number (seconds)"`` for the first bad one (``where`` is ``file:line``)."""
    if not isinstance(rec, dict) or not ({"scheme", "collective"} & set(rec)):
        raise ValueError(f"{where}: neither 'scheme' nor 'collective': expected a record of "
                         "run/bench --json or bench --collective --json")
    kind, spec = ("scheme", RUN_FIELDS) if "scheme" in rec else ("collective", COLLECTIVE_FIELDS)
    for path, (types, test, what, required) in spec.items():
        *parents, key = path.split(".")
        obj: Any = rec
        for parent in parents:
            obj = obj.get(parent) if isinstance(obj, dict) else None
        if not required and (not isinstance(obj, dict) or obj.get(key) is None):
            continue
        check_field(where, obj, key, types, what, test, label=path)
    if (rec.get("sweep") or {}).get("kind") == "weak":  # report divides it by the ranks
        check_field(where, rec, rec["sweep"]["dim"], _INT, "an integer (the weak sweep's "
                    "dimension)")
    return kind
