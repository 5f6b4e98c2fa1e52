"""Where the ranks are: the ranks of a node (:func:`node_comm`), a node's leader, and the
ranks that share a physical device (:func:`device_leaders`); the communicators are context
managers that free themselves.
"""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

from mpi4py import MPI

DeviceKey = tuple[str, Optional[str]]
"""``(host name, device key)`` of a rank: ranks on one physical device share it; a rank on host
memory (device key None) shares its device with no other."""


@contextlib.contextmanager
def node_comm(comm: MPI.Comm) -> Iterator[MPI.Comm]:
    """The ranks of ``comm`` on this node (shared-memory split), ordered by rank, freed on
    leaving the block, an error included. Collective (``Split_type``)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        yield local
    finally:
        local.Free()


def node_leader(comm: MPI.Comm) -> int:
    """The lowest rank of ``comm`` on this rank's node. Collective (a node split and one
    Allreduce on it)."""
    with node_comm(comm) as local:
        return int(local.allreduce(comm.Get_rank(), op=MPI.MIN))


def device_keys(comm: MPI.Comm, device: Optional[str]) -> list[DeviceKey]:
    """The :data:`DeviceKey` of every rank of ``comm`` in rank order, from each rank's
    ``device`` (e.g. :meth:`tpmpi.core.arraylib.Backend.device_key`). Collective (one
    allgather)."""
    return comm.allgather((MPI.Get_processor_name(), device))


def leads_its_device(keys: Sequence[DeviceKey], rank: int) -> bool:
    """True when ``rank`` is the lowest rank on its device (every rank on host memory)."""
    return keys[rank][1] is None or keys.index(keys[rank]) == rank


def ranks_per_device(keys: Sequence[DeviceKey]) -> int:
    """Most ranks on one physical device (1 when every rank is on host memory)."""
    per_device = collections.Counter(key for key in keys if key[1] is not None)
    return max(per_device.values(), default=1)


@contextlib.contextmanager
def device_leaders(comm: MPI.Comm, device: Optional[str]) -> Iterator[MPI.Comm]:
    """The ranks of ``comm`` that lead their device (:func:`leads_its_device`) as a new
    communicator (COMM_NULL on the others), freed on leaving the block, an error included.
    Collective (an allgather and a Split)."""
    lead = leads_its_device(device_keys(comm, device), comm.Get_rank())
    leaders = comm.Split(0 if lead else MPI.UNDEFINED, comm.Get_rank())
    try:
        yield leaders
    finally:
        if leaders != MPI.COMM_NULL:
            leaders.Free()
