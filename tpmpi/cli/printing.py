"""What the command line prints and appends, on rank 0 only: lines, JSON-lines records, the
summary of a run, the facts of ``info`` and plan's calibration warning."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional

from mpi4py import MPI

from ..studies.bench import format_table
from ..studies.costmodel import Calibration
from ..studies.record import calibration_facts, write_record
from ..studies.stats import overlap_implausible, short
from ..studies.table import columns


def rank0_printer(comm: MPI.Comm) -> Callable[[str], None]:
    """``print`` (flushed) on rank 0, nothing elsewhere."""
    return (lambda line: print(line, flush=True)) if comm.Get_rank() == 0 else \
        (lambda line: None)


class RecordFile:
    """Appends records to ``path`` (``--json``; None: nowhere) as JSON lines on rank 0, the file
    opened per record. A write that fails (disk or quota full, the file made unwritable during
    the run) loses no figures and ends no rank alone: the line it cut short is taken back (a
    regular file is truncated to its size before the record), that record and the later ones
    are printed on stdout as JSON lines instead, the work goes on, and :meth:`close` raises the
    failure on every rank (exit 3, a runtime error)."""

    def __init__(self, path: Optional[str], comm: MPI.Comm) -> None:
        self.path, self.comm = path, comm
        self.error: Optional[str] = None

    def __call__(self, rec: Mapping[str, Any]) -> None:
        if not self.path or self.comm.Get_rank() != 0:
            return
        if self.error is None:
            size = os.path.getsize(self.path) if os.path.isfile(self.path) else None
            try:
                with open(self.path, "a") as fh:
                    write_record(rec, fh)
                return
            except OSError as exc:
                self.error = f"--json {self.path}: {exc.strerror or exc}"
                if size is not None:
                    with contextlib.suppress(OSError):
                        os.truncate(self.path, size)
        write_record(rec, sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        """Raise the failed write, if any, on every rank (ValueError). Collective (a bcast)."""
        error = self.comm.bcast(self.error, root=0)
        if error:
            raise ValueError(f"{error}: the records from then on are printed on stdout "
                             "instead (JSON lines)")


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
              f"saved {times['saved_s'] * 1e3:.3f} ms"
              + (" (implausible: the whole call ran faster than its local work alone; "
                 "flag overlap-implausible)" if overlap_implausible(times) else ""))


def print_facts(facts: Mapping[str, Any]) -> None:
    """``info``'s facts, one ``name  value`` line each, names aligned. Local."""
    for line in columns([(name, str(value)) for name, value in facts.items()], left={0, 1}):
        print(line)


def calibration_warning(cal: Calibration, backend: str, ranks: int, source: Optional[str]
                        ) -> Optional[str]:
    """What plan says on stderr about its calibration: a note when it uses the model's defaults
    or a file without curves of local work (:attr:`Calibration.local`);
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
    if cal.curves("float32", backend) is None:
        return (f"tpmpi: note: calibration {name} has no curves of local work (a file "
                "from before calibrate measured the product grid, the element-wise kernels and "
                "the per-step overhead): its shape-class GEMM rates price products and its "
                "'thin' rate element-wise work; calibrate again for the curves")
    return None
