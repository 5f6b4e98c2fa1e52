"""What the command line prints and appends, on rank 0 only: lines, JSON-lines records, the
summary of a run, the facts of ``info`` and plan's calibration warning."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from mpi4py import MPI

from ..studies.bench import format_table
from ..studies.costmodel import Calibration
from ..studies.record import write_record
from ..studies.stats import short
from ..studies.table import columns


def rank0_printer(comm: MPI.Comm) -> Callable[[str], None]:
    """``print`` (flushed) on rank 0, nothing elsewhere."""
    return (lambda line: print(line, flush=True)) if comm.Get_rank() == 0 else \
        (lambda line: None)


def record_appender(path: Optional[str], comm: MPI.Comm) -> Callable[[Mapping[str, Any]], None]:
    """Append records to ``path`` as JSON lines (rank 0; the file opened per record)."""
    def append(rec: Mapping[str, Any]) -> None:
        if path:
            with open(path, "a") as fh:
                write_record(rec, fh)
    return append if comm.Get_rank() == 0 else (lambda rec: None)


def print_run(rec: Mapping[str, Any], ok: bool) -> None:
    """``run``'s table and summary lines of its record (check, baseline, flags, data
    parallelism, overlap). Local: call it on rank 0."""
    print(format_table([rec]))
    print(f"check: max_rel_err={rec['max_rel_err']:.3e} tolerance={rec['tolerance']:.1e}"
          f" -> {'PASS' if ok else 'FAIL'}  (vs float64 reference)")
    base = (rec.get("spread") or {}).get("baseline_s")
    if base:
        print(f"serial baseline (1 process, {rec['baseline_threads']} threads): "
              f"{base['median'] * 1e3:.3f} ms ({short(base['min'] * 1e3)}-"
              f"{short(base['max'] * 1e3)}); speedup {rec['speedup']:.3f}, eff/core "
              f"{rec['efficiency']:.3f}")
    if rec["flags"]:
        print(f"flags: {', '.join(rec['flags'])} (see docs/statistics.md)")
    if rec["mesh"]["dp"] > 1:
        print(f"data parallel: mesh {rec['mesh']['dp']}x({rec['grid']}), DP Allreduce "
              f"{rec['dp_bytes'] / 2**20:.3f} MiB per iteration, "
              f"{rec['dp_comm_s'] * 1e3:.3f} ms blocked in it")
    for phase, times in (rec.get("overlap") or {}).items():
        print(f"overlap {phase}: overall {times['overall_s'] * 1e3:.3f} ms, compute only "
              f"{times['compute_s'] * 1e3:.3f} ms, communication only "
              f"{times['comm_only_s'] * 1e3:.3f} ms -> overlap {times['overlap_pct']:.1f}%, "
              f"saved {times['saved_s'] * 1e3:.3f} ms")


def print_facts(facts: Mapping[str, Any]) -> None:
    """``info``'s facts, one ``name  value`` line each, names aligned. Local."""
    for line in columns([(name, str(value)) for name, value in facts.items()], left={0, 1}):
        print(line)


def calibration_warning(cal: Calibration, ranks: int, source: Optional[str]) -> Optional[str]:
    """A warning when the calibration's collectives were not fitted at ``ranks`` ranks."""
    fitted = sorted({int(p) for table in cal.alpha.values() for p in table})
    if ranks < 2 or not fitted or ranks in fitted:
        return None
    near = min(fitted, key=lambda q: (abs(q - ranks), q))
    return (f"tpmpi: warning: calibration {source or '(TPMPI_CALIBRATION)'} was measured on "
            f"{cal.machine.get('ranks', max(fitted))} ranks (collectives fitted at P = "
            f"{', '.join(map(str, fitted))}), not {ranks}: the collective costs of P = {near} "
            f"are used; run calibrate with {ranks} ranks for this size")
