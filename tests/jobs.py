"""Serial tests that launch their own small MPI jobs (checkpoint crashes, interrupts): the
launcher of the MPI library mpi4py loaded, and an environment free of this process's own MPI
initialisation."""
from __future__ import annotations

import os
import shutil
import sys

import pytest

RANKS = 2
"""Ranks of a launched job."""


def serial_only() -> None:
    """Skip unless this test runs in a job of one rank (it starts jobs of its own)."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("serial test: it launches its own MPI jobs")


def launcher() -> list:
    """``mpiexec -n 2`` of the MPI library mpi4py loaded (Open MPI: oversubscribed)."""
    from mpi4py import MPI

    if "Open MPI" in MPI.Get_library_version():
        exe = shutil.which("mpiexec.openmpi") or shutil.which("mpiexec")
        return [exe, "--oversubscribe", "-n", str(RANKS)]
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return [local if os.path.exists(local) else shutil.which("mpiexec"), "-n", str(RANKS)]


def job_env() -> dict:
    """This environment less what this process's own MPI initialisation or a SLURM job around
    it put there (a child launcher would take itself for part of that job), for a job of NumPy
    ranks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "HYDRA_", "MPIR_", "OPAL_", "ORTE_",
                                "SLURM_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               TPMPI_BACKEND="numpy", TPMPI_THREADS="1")
    return env


def listing(path: str) -> list:
    """Everything under ``path``, relative, sorted (a checkpoint directory's contents)."""
    out = []
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirs + files]
    return sorted(out)
