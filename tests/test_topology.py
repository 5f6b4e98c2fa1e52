"""tpmpi.core.topology: the node communicator (freed on leaving its block, an error included),
the node leader, and the ranks that share a physical device."""
from __future__ import annotations

import pytest
from mpi4py import MPI

from tpmpi.core import topology


@pytest.mark.mpi
def test_node_comm_is_freed_on_leaving_the_block_even_after_an_error(world):
    held = []
    with topology.node_comm(world.comm) as local:
        held.append(local)
        assert local.Get_size() == world.size  # one node: the tests' job
        assert local.Get_rank() == world.comm.Get_rank()  # ordered by rank
    with pytest.raises(RuntimeError, match="inside"), topology.node_comm(world.comm) as local:
        held.append(local)
        raise RuntimeError("inside")
    assert all(c == MPI.COMM_NULL for c in held)


@pytest.mark.mpi
def test_node_leader_is_the_lowest_rank_of_the_node(world):
    assert topology.node_leader(world.comm) == 0


def test_device_grouping():
    keys = [("a", "gpu0"), ("a", "gpu0"), ("a", "gpu1"), ("b", "gpu0"), ("b", None), ("b", None)]
    assert [topology.leads_its_device(keys, r) for r in range(6)] == [True, False, True, True,
                                                                       True, True]
    assert topology.ranks_per_device(keys) == 2
    assert topology.ranks_per_device([("a", None)] * 3) == 1


@pytest.mark.mpi
@pytest.mark.parametrize("device", [None, "0000:01:00.0"], ids=["host", "one-gpu"])
def test_device_leaders_are_the_first_rank_on_each_device(world, device):
    keys = topology.device_keys(world.comm, device)
    assert keys == [(MPI.Get_processor_name(), device)] * world.size
    with topology.device_leaders(world.comm, device) as leaders:
        held = leaders
        leads = leaders != MPI.COMM_NULL
        assert leads == (device is None or world.comm.Get_rank() == 0)
        if leads:
            assert leaders.Get_size() == (world.size if device is None else 1)
    assert held == MPI.COMM_NULL  # freed, or never made
