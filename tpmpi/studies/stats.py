"""Summary statistics of timing samples and the flags that mark suspicious figures.

Every timed figure of a record is summarised as ``{median, min, max}`` over the timed
iterations (each iteration's value is the maximum over ranks). The *spread* of a summary is
``(max - min) / median``. A record's ``flags`` (docs/statistics.md) name figures that should not
reach a paper unexplained:

* ``superlinear``: per-core efficiency against the serial baseline above :data:`SUPERLINEAR`;
* ``noisy``: spread of the step time above :data:`NOISY`;
* ``noisy-baseline``: spread of the serial baseline above :data:`NOISY`;
* ``oversubscribed``: a node's 1-minute load average above its CPU count during the run, or the
  job's ranks x BLAS threads above the CPUs they may use;
* ``slow-baseline``: on one rank (no TP, no DP: the parallel run *is* the serial product, with
  no more threads than the baseline) a speedup above 1 + :data:`NOISY`: the baseline ran slower
  than it can, so speedup and efficiency measure its trouble (threads competing for cores);
* ``overlap-implausible``: ``--measure-overlap`` timed the whole call faster than its local
  work alone by more than :data:`NOISY` of the communication: the time saved (capped at the
  communication's) and the overlap % are noise;
* ``pred-defaults``: ``predicted_s`` comes from the cost model's documented defaults (no
  calibration: typically several times off);
* ``pred-other-machine``: the calibration was measured with another MPI library, backend or
  BLAS kernel than the record's;
* ``pred-other-ranks``: a communicator of the record (the TP grid's rows and columns, the DP
  replicas) has a size the calibration fitted no collective at (the nearest fit is used).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np

SUPERLINEAR = 1.15  # efficiency above this is suspicious (cache effects, a slow baseline...)
NOISY = 0.10        # a spread above 10 % of the median is flagged
FLAGS = ("superlinear", "noisy", "noisy-baseline", "oversubscribed", "slow-baseline",
         "overlap-implausible", "pred-defaults", "pred-other-machine", "pred-other-ranks")
PREDICTION_FLAGS = tuple(f for f in FLAGS if f.startswith("pred-"))
"""The flags about ``predicted_s`` rather than the measurement (tables mark ``pred_ms``)."""


def summary(samples: Sequence[float]) -> Optional[dict]:
    """``{"median", "min", "max"}`` of ``samples`` (None when there are none)."""
    if len(samples) == 0:
        return None
    a = np.asarray(samples, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def spread(s: Optional[dict]) -> Optional[float]:
    """``(max - min) / median`` of a summary (None without one or with a zero median)."""
    if not s or not s.get("median"):
        return None
    return (s["max"] - s["min"]) / s["median"]


def short(value: float) -> str:
    """Three significant digits without an exponent below 10^6 (``1440``, ``285``, ``0.0118``)."""
    return f"{value:.0f}" if 1000 <= abs(value) < 1e6 else f"{value:.3g}"


def load_per_cpu() -> Optional[float]:
    """This node's 1-minute load average divided by its CPU count (None where the OS has no
    load average)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None


def _prediction(rec: Mapping) -> dict[str, bool]:
    """Which of :data:`PREDICTION_FLAGS` apply: the record's ``calibration`` against its own
    facts (none for a record without ``predicted_s`` or from before the field existed)."""
    cal = rec.get("calibration")
    if not rec.get("predicted_s") or not isinstance(cal, Mapping):
        return dict.fromkeys(PREDICTION_FLAGS, False)
    measured = cal.get("source") != "defaults"
    blas = rec.get("blas") or {}
    other_machine = measured and (
        cal.get("mpi_library") not in (None, rec.get("mpi_library"))
        or cal.get("backend") not in (None, rec.get("backend"))
        or any((cal.get("blas") or {}).get(k) not in (None, blas.get(k))
               for k in ("library", "kernel")))
    pr, pc = (int(v) for v in str(rec.get("grid", "1x1")).split("x"))
    sizes = {pr, pc, (rec.get("mesh") or {}).get("dp", 1)} - {1}
    return {"pred-defaults": not measured, "pred-other-machine": bool(other_machine),
            "pred-other-ranks": measured and bool(sizes - set(cal.get("fitted") or ()))}


def prediction_mark(rec: Mapping) -> str:
    """The mark after a table's ``pred_ms``: ``*`` from the model's defaults, ``~`` calibrated
    on another machine or at other communicator sizes, else nothing."""
    which = _prediction(rec)
    return "*" if which["pred-defaults"] else "~" if any(which.values()) else ""


PREDICTION_NOTE = ("pred_ms: * the cost model's defaults (uncalibrated: run calibrate), ~ "
                   "calibrated on another machine or number of ranks (flags pred-*)")


def overlap_implausible(times: Mapping) -> bool:
    """True when an overlap measurement (``overall_s``, ``compute_s``, ``comm_only_s``) timed
    the whole call faster than its local work alone by more than :data:`NOISY` of the
    communication: overlap can hide the communication, never speed the computation up."""
    return times["compute_s"] - times["overall_s"] > NOISY * times["comm_only_s"]


def flags(rec: Mapping) -> list[str]:
    """The names of :data:`FLAGS` that apply to the record ``rec`` (see the module doc), in
    that order."""
    applies = {**_prediction(rec),
        "superlinear": (rec.get("efficiency") or 0.0) > SUPERLINEAR,
        "noisy": (spread(rec.get("time_s")) or 0.0) > NOISY,
        "noisy-baseline": (spread((rec.get("spread") or {}).get("baseline_s")) or 0.0) > NOISY,
        "oversubscribed": (rec.get("load_per_cpu") or 0.0) > 1.0
        or (rec.get("oversubscription") or 0.0) > 1.0,
        "slow-baseline": rec.get("ranks") == 1 and (rec.get("speedup") or 0.0) > 1 + NOISY,
        "overlap-implausible": any(overlap_implausible(t) for t in
                                   (rec.get("overlap") or {}).values()),
    }
    return [name for name in FLAGS if applies[name]]
