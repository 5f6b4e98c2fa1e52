"""What the ranks of one communicator decide together about their devices, once per
communicator and kept on it (:func:`device_facts`): whether MPI may read their device buffers
directly (the GPU-aware probe, :func:`probe_gpu_aware`; env ``TPMPI_GPU_AWARE=0/1`` overrides
it) and how many ranks share one physical device.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Optional

import numpy as np
from mpi4py import MPI

from .agreement import agree
from .arraylib import Backend
from .cache import comm_cache
from .topology import device_keys, ranks_per_device


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the ranks of one communicator decided together about their devices."""

    gpu_aware: bool        # MPI may read and write the device buffers directly
    ranks_per_device: int  # most ranks of the communicator on one physical device


_SHARING_WARNED: list[bool] = []  # the device-sharing warning is given once per process


def device_facts(comm: MPI.Comm, backend: Backend) -> DeviceFacts:
    """``comm``'s :class:`DeviceFacts` for ``backend``.

    Host backends: not GPU-aware, one rank per device, no MPI call. GPU backends: decided
    collectively over ``comm`` the first time (:func:`probe_gpu_aware`, then one allgather of
    the ranks' device ids, warning once per process when ranks share a device), then cached on
    ``comm``; every rank of ``comm`` must ask at the same point, as layer construction does.
    """
    if not backend.is_gpu:
        return DeviceFacts(False, 1)
    cache = comm_cache(comm)
    if backend.name not in cache:
        aware = probe_gpu_aware(comm, backend)
        cache[backend.name] = DeviceFacts(aware, _ranks_per_device(comm, backend))
    return cache[backend.name]


def _ranks_per_device(comm: MPI.Comm, backend: Backend) -> int:
    """Most ranks of ``comm`` on one physical device (:func:`~tpmpi.core.topology.device_keys`
    of :meth:`Backend.device_key`), warning once per process when ranks of this node share a
    device. Collective (one allgather)."""
    keys = device_keys(comm, backend.device_key())
    host = keys[comm.Get_rank()][0]
    first_on_host = next(r for r, (h, _) in enumerate(keys) if h == host) == comm.Get_rank()
    message = sharing_message([dev for h, dev in keys if h == host and dev is not None])
    if message and first_on_host and not _SHARING_WARNED:
        _SHARING_WARNED.append(True)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return ranks_per_device(keys)


def sharing_message(buses: Sequence[str]) -> Optional[str]:
    """The warning for the node-local ranks' PCI bus ids ``buses`` when some share a GPU."""
    if len(set(buses)) == len(buses):
        return None
    return (f"{len(buses)} ranks share {len(set(buses))} GPU(s) on this node: correct, but they "
            "share the device's memory and compute (fine for tests, not for measurements)")


def _library_cuda_support() -> Optional[bool]:
    """``MPIX_Query_cuda_support()`` of the loaded MPI library, or None if it has none.

    dlsym on mpi4py's extension module searches the libmpi it links (as ``python -m mpi4py
    --mpi-library`` does).
    """
    try:
        fn = getattr(ctypes.CDLL(MPI.__file__), "MPIX_Query_cuda_support", None)
    except OSError:
        return None
    return None if fn is None else bool(fn())


def probe_gpu_aware(comm: MPI.Comm, backend: Backend) -> bool:
    """True when MPI may read and write device buffers directly. Collective; uncached (see
    :func:`device_facts`).

    ``TPMPI_GPU_AWARE=1`` claims support without a test, ``=0`` forces host staging (any other
    value: the same ValueError on every rank). Otherwise the library must report CUDA support
    (``MPIX_Query_cuda_support``; Cray MPICH needs ``MPICH_GPU_SUPPORT_ENABLED=1``, MPICH
    ``MPIR_CVAR_ENABLE_GPU=1``, conda-forge Open MPI ``OMPI_MCA_opal_cuda_support=true``) AND a
    small Allreduce on device buffers must return the expected values. The answer is True only
    if every rank claims support; the device test runs (on every rank) when any rank's claim
    comes from its library, and device buffers never reach MPI unless every rank claims it.
    """
    if not backend.is_gpu:
        return False
    forced = os.environ.get("TPMPI_GPU_AWARE", "")
    agree(comm, None if forced in ("", "0", "1") else
          f"TPMPI_GPU_AWARE={forced!r}: expected 0 or 1 (or unset)")
    claim = forced == "1" if forced else bool(_library_cuda_support())
    votes = np.array([int(claim), -int(not forced)], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, votes, op=MPI.MIN)  # [every rank claims, -(any rank tests)]
    if not votes[0]:
        return False
    if not votes[1]:
        return True  # every rank forced it
    return bool(comm.allreduce(int(_device_allreduce_ok(comm, backend)), op=MPI.MIN))


def _device_allreduce_ok(comm: MPI.Comm, backend: Backend) -> bool:
    """One Allreduce on device buffers gives the right sums. Collective."""
    xp = backend.xp
    try:
        send = xp.arange(4, dtype=xp.float64) + comm.Get_rank()
        recv = xp.zeros_like(send)
        backend.synchronize()
        comm.Allreduce(send, recv)
        backend.synchronize()
        size = comm.Get_size()
        return bool(np.array_equal(backend.to_host(recv),
                                   np.arange(4) * size + size * (size - 1) / 2))
    except Exception:  # noqa: BLE001 - any failure means staging
        return False


