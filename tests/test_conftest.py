"""The harness itself (tests/conftest.py): a ``world`` test runs on the world's members only,
``world_sizes`` restricts P, ``grid`` / ``grids`` build (and free) the grids of the world, and
``shared_tmp`` is one directory for all its ranks."""
import os

import pytest
from mpi4py import MPI

from tpmpi.core.grid import factorisations


@pytest.mark.mpi
def test_world_runs_on_its_members_only(world):
    assert world.member and world.comm.Get_size() == world.size
    assert world.comm.Get_rank() == MPI.COMM_WORLD.Get_rank() < world.size
    assert world.comm.allreduce(1) == world.size  # every member runs the body


@pytest.mark.mpi
@pytest.mark.world_sizes(3)
def test_world_sizes_restrict_p(world):
    assert world.size == 3


@pytest.mark.mpi
def test_grid_is_one_row_over_the_world(world, grid):
    assert grid.shape == (1, world.size) and grid.rank == world.comm.Get_rank()
    assert not grid.freed


@pytest.mark.mpi
def test_grids_build_each_shape_when_reached_and_free_it(world, grids):
    seen = []
    for g in grids():
        assert all(earlier.freed for earlier in seen) and not g.freed
        seen.append(g)
    assert [g.shape for g in seen] == factorisations(world.size) and seen[-1].freed
    assert [g.shape for g in grids([(1, world.size)])] == [(1, world.size)]


@pytest.mark.mpi
def test_shared_tmp_is_one_directory(world, shared_tmp):
    assert len(set(world.comm.allgather(str(shared_tmp)))) == 1 and shared_tmp.is_dir()
    if world.comm.Get_rank() == 0:
        (shared_tmp / "note").write_text("rank 0")
    world.comm.Barrier()
    assert (shared_tmp / "note").read_text() == "rank 0"
    assert os.listdir(shared_tmp) == ["note"]  # a new directory per test
