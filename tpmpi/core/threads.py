"""BLAS threads per rank: set collectively so that the ranks of a node never oversubscribe its
cores (:func:`configure_blas_threads`, env ``TPMPI_THREADS``), and what the library reports.
"""
from __future__ import annotations

import os
from typing import Optional

from mpi4py import MPI

from .agreement import CALL_ORDER, Same, Text, agree
from .args import check_int, parse_int
from .arraylib import Backend
from .topology import node_comm

_THREADS: list[int] = []  # the threads configure_blas_threads last applied


def configure_blas_threads(comm: MPI.Comm, threads: Optional[int] = None) -> int:
    """Set this rank's BLAS/OpenMP threads so that the ranks of a node never oversubscribe.
    Process-wide, hence explicit: the CLI, the benchmarks, the scripts and the tests call it;
    grids, meshes and layers never do.

    ``threads`` (or env ``TPMPI_THREADS``) wins; otherwise the CPUs in this rank's affinity mask
    are divided by the number of ranks on the node whose masks overlap it (a shared-memory
    split), so ``srun --cpus-per-task=c`` gives ``c`` threads and ``mpiexec -n 4`` on 2 cores
    gives 1. Every rank runs the same count (a record states one, and its efficiency divides
    by it): a ``threads`` or ``TPMPI_THREADS`` that differs across ranks is the same ValueError
    on every rank, and the automatic count is the smallest any rank's CPUs give. Collective over
    ``comm``. Returns the thread count applied.
    """
    from threadpoolctl import threadpool_limits

    error, source = None, "threads" if threads is not None else "TPMPI_THREADS"
    try:
        if threads is None and os.environ.get("TPMPI_THREADS"):
            env = os.environ["TPMPI_THREADS"]
            threads = parse_int("TPMPI_THREADS", env, 1)
        threads = check_int("threads", threads, 1, allow_none=True)
    except ValueError as exc:
        error = str(exc)
    # one thread count for every rank: records state one, and efficiency divides by it
    agree(comm, error, call=Same(Text("configure_blas_threads()"), CALL_ORDER),
          **{source: Same(threads, "every rank must run the same BLAS threads (records and "
                                   "efficiencies state one count)")})
    mine = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        frozenset(range(os.cpu_count() or 1))
    with node_comm(comm) as local:
        masks = local.allgather(mine)
    if threads is None:  # the fewest any rank's CPUs allow, on every rank
        sharing = sum(1 for m in masks if m & mine)
        threads = comm.allreduce(max(1, len(mine) // max(1, sharing)), op=MPI.MIN)
    threadpool_limits(limits=threads)
    _THREADS[:] = [threads]
    return threads


def configured_blas_threads() -> Optional[int]:
    """The BLAS threads per rank that :func:`configure_blas_threads` last set in this process
    (what records report as ``threads_per_rank``), or None if it never ran. No MPI call."""
    return _THREADS[0] if _THREADS else None


def blas_info(backend: Optional[Backend] = None) -> dict:
    """BLAS library, kernel and threads as threadpoolctl reports them; the device on a GPU."""
    if backend is not None and backend.is_gpu:
        return {"library": "cublas", "device": backend.device_name()}
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return {"library": pool.get("internal_api"), "version": pool.get("version"),
                    "kernel": pool.get("architecture"), "threads": pool.get("num_threads"),
                    "coretype_env": os.environ.get("OPENBLAS_CORETYPE")}
    return {"library": "unknown"}

