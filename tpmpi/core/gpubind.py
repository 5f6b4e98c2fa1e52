"""Binding a process to its GPU, with no MPI call: the launcher's node-local rank modulo the
visible devices (:func:`bind_gpu`). ``CUDA_VISIBLE_DEVICES`` is respected, never overwritten.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

from .args import parse_int

LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                        "MV2_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID", "SLURM_LOCALID")
"""Variables in which launchers give a process its rank among the processes of its node, in
the order :func:`bind_gpu` reads them: Open MPI's mpirun/prterun, MPICH's Hydra and Intel MPI
(``MPI_LOCALRANKID``; ``PMI_LOCAL_RANK``), MVAPICH2, HPE Cray PALS, Slurm's srun. Slurm's
comes last: an mpirun inside an ``sbatch`` script inherits the batch step's ``SLURM_LOCALID=0``."""


def cupy_usable() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - ImportError, CUDARuntimeError without a driver, ...
        return False


def local_rank() -> Optional[tuple[str, int]]:
    """``(variable, value)`` of the first of :data:`LOCAL_RANK_VARIABLES` set to an integer, or
    None when no launcher variable gives the node-local rank."""
    for var in LOCAL_RANK_VARIABLES:
        try:
            return var, parse_int(var, os.environ.get(var, ""))
        except ValueError:
            continue  # unset, or not a rank
    return None


def bind_gpu() -> int:
    """Select this process's GPU, make it current and return its index among the visible
    devices. No MPI call: it runs once per process, whichever communicator asks first.

    The index is the node-local rank the launcher gives (:func:`local_rank`) modulo the number
    of devices this process sees. ``CUDA_VISIBLE_DEVICES`` is respected, never overwritten:

    * ``srun --gpus-per-task=1`` (or ``--gpu-bind=single:1``): Slurm shows each task only its
      own device, as device 0, so every rank takes index 0, each on a different GPU;
    * ``srun --gpus-per-node=G`` without binding, ``mpirun``/``mpiexec`` on a workstation with
      G GPUs: every process sees all G devices and node-local rank r takes device r % G;
    * ``CUDA_VISIBLE_DEVICES=0,1`` set by the user: the same modulo over those two.

    Without a launcher variable (an unknown launcher, a plain ``python`` run) the process takes
    device 0, with a RuntimeWarning when it sees more than one: give each rank its device with
    ``CUDA_VISIBLE_DEVICES`` then. More ranks than GPUs is legal (the tests run 4 ranks on one
    GPU); :func:`device_facts` warns when ranks of a communicator share a device. Runs before
    any CuPy allocation of tpmpi and before any NCCL communicator it could create.
    """
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    found = local_rank()
    if found is None and count > 1:
        warnings.warn(f"no launcher variable gives this process's node-local rank (none of "
                      f"{', '.join(LOCAL_RANK_VARIABLES)} is set): using GPU 0 of the {count} "
                      "visible; set CUDA_VISIBLE_DEVICES per rank to spread ranks over the GPUs",
                      RuntimeWarning, stacklevel=2)
    device = found[1] % count if found is not None else 0
    cupy.cuda.Device(device).use()
    return device


