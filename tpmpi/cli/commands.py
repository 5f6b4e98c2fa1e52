"""The subcommands: each sets up what its flags ask for inside :func:`~tpmpi.core.launch.usage`
(a failure there is a usage error, exit 2, on every rank), then does the work (a failure there
is a runtime error, exit 3) and returns its exit code."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from mpi4py import MPI

from .._version import __version__
from ..core.backend import get_backend
from ..core.dtypes import SUPPORTED
from ..core.grid import ProcessGrid, parse_shape
from ..core.launch import EXIT_CHECK, UsageError, usage
from ..core.mesh import Mesh
from ..core.threads import blas_info, configure_blas_threads
from ..core.topology import node_comm
from ..studies.bench import case_progress, format_table, run_case
from ..studies.clusterplan import (default_dtype, explain_step, format_cluster_plan,
                                   parse_model, parse_sizes, plan_cluster, plan_records)
from ..studies.collbench import calibrate, sizes_sweep
from ..studies.costmodel import explain, format_plan, plan, plan_transformer
from ..studies.machine import CalibratedCluster
from ..studies.problem import Problem
from ..studies.record import mpi_library
from ..studies.schemes.hybrid import largest_replica
from ..studies.sweep import collective_sweep, default_ranks, run_sweep
from ..studies.transformer import check_shape
from .checks import (agree_calibration, agree_output_file, agree_problems, agree_target,
                     bench_configs, check_plan_flags, model_shape, problem_from_args)
from .fit import agree_fits
from .printing import RecordFile, calibration_warning, print_facts, print_run, rank0_printer


def cmd_run(args: argparse.Namespace, comm: MPI.Comm) -> int:
    with usage():
        problem = problem_from_args(args)
        shape = parse_shape(args.grid) if args.grid else None
        configure_blas_threads(comm, args.threads)
        mesh = Mesh(comm, dp=args.dp, tp=shape) if args.dp > 1 else None
        tp = mesh.tp if mesh is not None else ProcessGrid(comm, shape)
        grid = mesh if mesh is not None else tp
        replica = largest_replica(problem, args.dp)  # what one replica's TP group holds and runs
        backend = get_backend(args.backend, comm)
        agree_problems([problem], backend, comm, [args.dp])
        agree_fits([(replica, tp.shape)], backend, comm)
        cal = agree_calibration(args.calibration, comm)
    timing = {"warmup": args.warmup, "iters": args.iters, "baseline": args.baseline,
              "overlap": args.measure_overlap}
    rec = run_case(problem, grid, backend, calibration=cal, bucket_bytes=args.bucket_bytes,
                   progress=case_progress(replica, tp, backend, cal, **timing), **timing)
    ok = rec["max_rel_err"] is not None and rec["max_rel_err"] <= rec["tolerance"]
    if comm.Get_rank() == 0:
        print_run(rec, ok)
    save = RecordFile(args.json, comm)
    save(rec)
    grid.free()
    save.close()
    return 0 if ok or not args.check else EXIT_CHECK


def cmd_info(args: argparse.Namespace, comm: MPI.Comm) -> int:
    with usage():  # TPMPI_THREADS / TPMPI_BACKEND
        threads = configure_blas_threads(comm)
        backend = get_backend("auto", comm)
    with node_comm(comm) as local:
        nodes = comm.allreduce(1 if local.Get_rank() == 0 else 0)
    import mpi4py
    import numpy

    vendor, version = MPI.get_vendor()
    facts = {
        "tpmpi": __version__, "mpi4py": mpi4py.__version__, "numpy": numpy.__version__,
        "mpi_library": mpi_library(), "mpi_vendor": f"{vendor} {'.'.join(map(str, version))}",
        "ranks": comm.Get_size(), "nodes": nodes, "backend(auto)": backend.name,
        "gpu_aware": backend.gpu_aware, "threads_per_rank": threads,
        "blas": blas_info(backend), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    if comm.Get_rank() == 0:
        print_facts(facts)
    return 0


def cmd_bench(args: argparse.Namespace, comm: MPI.Comm) -> int:
    world = comm.Get_size()
    with usage():
        ranks = args.ranks or default_ranks("sizes" if args.collective else args.sweep, world)
        if max(ranks) > world:
            raise UsageError(f"--ranks {max(ranks)} exceeds the job's {world} ranks")
        if (args.begin is None) != (args.end is None):
            raise UsageError("-b and -e go together")
        sizes = sizes_sweep(args.begin, args.end, args.factor) if args.begin is not None else []
        backend = get_backend(args.backend, comm)
        if args.collective and not sizes:
            raise UsageError("--collective needs a size sweep: -b BYTES -e BYTES [-f F]")
        if args.collective and len(args.dtype) > 1:
            raise UsageError("--collective takes one --dtype")
    save = RecordFile(args.json, comm)
    if args.collective:
        collective_sweep(comm, args.collective, sizes, ranks, args.dtype[0], backend,
                         warmup=args.warmup, iters=args.iters, on_record=save,
                         out=rank0_printer(comm))
        save.close()
        return 0
    with usage():
        cfgs = bench_configs(args, ranks, sizes)
        agree_problems([c.problem for c in cfgs], backend, comm, [c.dp for c in cfgs])
        agree_fits([(largest_replica(c.problem, c.dp), c.grid) for c in cfgs], backend, comm)
        calibration = agree_calibration(args.calibration, comm)
        threads = configure_blas_threads(comm, args.threads)
    records: list[Mapping[str, Any]] = []

    def on_record(rec: Mapping[str, Any]) -> None:
        records.append(rec)
        save(rec)
    run_sweep(comm, cfgs, backend, threads=threads, warmup=args.warmup, iters=args.iters,
              baseline=args.baseline, calibration=calibration,
              on_record=on_record, measure_overlap=args.measure_overlap,
              bucket_bytes=args.bucket_bytes)
    rank0_printer(comm)(format_table(records))
    save.close()
    return 0


def cmd_calibrate(args: argparse.Namespace, comm: MPI.Comm) -> int:
    with usage():
        backend = get_backend(args.backend, comm)
        threads = configure_blas_threads(comm, args.threads)
        sizes = sizes_sweep(args.begin, args.end, args.factor)
    out = rank0_printer(comm)
    dtypes = args.dtype or (SUPPORTED if backend.is_gpu else ["float32", "float64"])
    cal = calibrate(comm, backend, dtypes=dtypes, sizes=sizes, threads=threads,
                    iters=args.iters, progress=lambda what: out(f"calibrating {what}"))
    if comm.Get_rank() == 0:
        with open(args.json, "w") as fh:
            json.dump(cal.to_json(), fh, indent=1)
        out(f"wrote {args.json}")
    return 0


def cmd_plan(args: argparse.Namespace, comm: MPI.Comm) -> int:
    with usage():
        check_plan_flags(args)
    if args.cluster is not None:
        return _plan_cluster(args, comm)
    cal = agree_calibration(args.calibration, comm)
    with usage():  # plan computes from the flags (and the calibration file) alone
        if args.scheme:
            problem = Problem(scheme=args.scheme, m=args.m, k=args.k, n=args.k,
                              dtype=args.dtype or "float32", backward=args.backward,
                              options=() if args.overlap else (("overlap", False),),
                              **model_shape(args))
            check_shape(problem)
            preds = plan_transformer(problem, args.ranks, backend=args.backend,
                                     calibration=cal, bucket_bytes=args.bucket_bytes)
        else:
            preds = plan(args.m, args.k, args.n, args.ranks, hidden=args.hidden,
                         dtype=args.dtype or "float32", backward=args.backward,
                         backend=args.backend, calibration=cal,
                         bucket_bytes=args.bucket_bytes, overlap=args.overlap)
    warning = calibration_warning(cal, args.backend, args.ranks, args.calibration)
    if warning and comm.Get_rank() == 0:
        sys.stderr.write(warning + "\n")
    rank0_printer(comm)(format_plan(preds))
    rank0_printer(comm)(explain(preds))
    return 0


def _plan_cluster(args: argparse.Namespace, comm: MPI.Comm) -> int:
    """plan --cluster: the ranking of every tp x dp asked for (when more than one) and the
    first one term by term; exit 1 when no configuration fits."""
    with usage():
        shape = parse_model(args.model)
        tp, dp = parse_sizes("tp", args.tp), parse_sizes("dp", args.dp)
    target = agree_target(args.cluster, comm)
    agree_output_file(args.json, comm)
    if isinstance(target, CalibratedCluster) and comm.Get_rank() == 0:
        note = calibration_warning(target.device.calibration, target.device.backend,
                                   max(tp), args.cluster)
        if note:
            sys.stderr.write(note + "\n")
    with usage():
        preds = plan_cluster(target, shape, micro_batch=args.micro_batch,
                             global_batch=args.global_batch, tp=tp, dp=dp, gpus=args.gpus,
                             sequence_parallel=args.sequence_parallel, recompute=args.recompute,
                             dtype=args.dtype or default_dtype(target), overlap=args.overlap,
                             ddp=args.ddp, bucket_bytes=args.bucket_bytes,
                             optimizer=args.optimizer)
    out = rank0_printer(comm)
    if len(preds) > 1:
        out(format_cluster_plan(preds, args.top))
    out(explain_step(preds[0]))
    if args.json and comm.Get_rank() == 0:
        with open(args.json, "w") as fh:
            for rec in plan_records(preds):
                fh.write(json.dumps(rec) + "\n")
    return EXIT_CHECK if all(p.refused for p in preds) else 0


def cmd_report(args: argparse.Namespace, comm: MPI.Comm) -> int:
    """Rank 0 writes the report; a file it cannot open (an input missing, --out not writable)
    is a usage error, records it cannot use a runtime error, on every rank."""
    error = None
    if comm.Get_rank() == 0:
        from ..studies.report import report

        try:
            print(f"wrote {report(args.files, args.out)}")
        except OSError as exc:
            error = (True, str(exc))
        except ValueError as exc:
            error = (False, str(exc))
    error = comm.bcast(error, root=0)
    if error:
        raise (UsageError if error[0] else ValueError)(error[1])
    return 0


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "calibrate": cmd_calibrate, "plan": cmd_plan,
            "report": cmd_report, "info": cmd_info}
