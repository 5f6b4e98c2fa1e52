"""tpmpi.core.threads: BLAS threads per rank, agreed (a bad count on one rank raises on every
rank) and shared out over the node's ranks. (Grids, meshes and layers leave BLAS alone:
test_grid.py.)"""
from __future__ import annotations

import os

import pytest

import tpmpi
from conftest import all_ranks_raise
from tpmpi.core.threads import blas_info, configure_blas_threads, configured_blas_threads


@pytest.mark.mpi
def test_bad_thread_count_raises_on_every_rank(world, monkeypatch):
    comm = world.comm
    all_ranks_raise(comm, lambda: tpmpi.configure_blas_threads(comm, 0),
                    r"^threads=0: expected None or a positive integer$")
    if comm.Get_rank() == 0:
        monkeypatch.setenv("TPMPI_THREADS", "two")
    else:
        monkeypatch.delenv("TPMPI_THREADS", raising=False)
    all_ranks_raise(comm, lambda: tpmpi.configure_blas_threads(comm),
                    r"TPMPI_THREADS='two': expected a positive integer \(digits 0-9\)" +
                    (r" \(rank 0\)" if world.size > 1 else "$"))


@pytest.mark.mpi
def test_threads_share_the_node_cores(world, monkeypatch):
    """Without a request, a rank gets the CPUs of its mask divided by the ranks of its node
    whose masks overlap it (all of this job's ranks here: one node, one mask)."""
    from threadpoolctl import threadpool_limits

    monkeypatch.delenv("TPMPI_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    with threadpool_limits(limits=1):  # restored on exit (conftest's setting)
        assert configure_blas_threads(world.comm) == max(1, cpus // world.size)
        assert configured_blas_threads() == max(1, cpus // world.size)
        assert configure_blas_threads(world.comm, 3) == 3
        assert blas_info()["threads"] == 3
        configure_blas_threads(world.comm, 1)


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 4)
def test_a_thread_count_that_differs_across_ranks_is_refused(world, monkeypatch):
    """A record states one threads_per_rank and its efficiency divides by it: TPMPI_THREADS
    (or threads=) set differently on one rank is the same ValueError everywhere."""
    from threadpoolctl import threadpool_limits

    comm, odd = world.comm, world.comm.Get_rank() == world.size - 1
    monkeypatch.setenv("TPMPI_THREADS", "2" if odd else "1")
    with threadpool_limits(limits=1):
        all_ranks_raise(comm, lambda: configure_blas_threads(comm),
                        rf"TPMPI_THREADS differs across ranks: 1 on ranks? [\d,]+ and 2 on "
                        rf"rank {world.size - 1}; every rank must run the same BLAS threads")
        monkeypatch.delenv("TPMPI_THREADS")
        all_ranks_raise(comm, lambda: configure_blas_threads(comm, 1 + odd),
                        r"threads differs across ranks: 1 on ranks? [\d,]+ and 2 on rank")
        assert configure_blas_threads(comm, 1) == 1
