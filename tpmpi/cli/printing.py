"""What the command line prints and appends, on rank 0 only: lines, JSON-lines records, the
summary of a run, the facts of ``info`` and plan's calibration warning."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from mpi4py import MPI

from ..studies.bench import format_table
from ..studies.costmodel import Calibration
from ..studies.record import calibration_facts, write_record
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


def calibration_warning(cal: Calibration, backend: str, ranks: int, source: Optional[str]
                        ) -> Optional[str]:
    """What plan says on stderr about its calibration: a note when it uses the model's defaults;
    a warning when the calibration measured another backend than ``--backend`` (its GEMM
    rates would be the defaults) or fitted no collective while ``ranks`` > 1. Communicator
    sizes without a fit are no mismatch: the nearest fitted size's alpha and beta are used with
    the ring formulas' P factors, which is the model (docs/cli.md, plan)."""
    facts = calibration_facts(cal)
    name = source or "(TPMPI_CALIBRATION)"
    if facts["source"] == "defaults":
        return ("tpmpi: note: predictions use the cost model's defaults (uncalibrated); run "
                "calibrate on the machine you plan for")
    if facts["backend"] not in (None, backend):
        return (f"tpmpi: warning: calibration {name} measured the {facts['backend']} backend: "
                f"the {backend} GEMM rates are the model's defaults")
    if ranks > 1 and not facts["fitted"]:
        return (f"tpmpi: warning: calibration {name} fitted no collective (calibrate ran on "
                f"{facts['ranks']} rank(s)): the collectives use the model's defaults")
    return None
