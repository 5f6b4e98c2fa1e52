"""tpmpi.ProcessGrid: shapes, coordinates and row/column sub-communicators of every
factorisation of 1-4 ranks (node-aware order included), shape errors raised on every rank, the
communicator checks, freeing, the shared default grid, and that a grid leaves BLAS alone."""
from functools import partial

import pytest
from mpi4py import MPI

import tpmpi
from conftest import all_ranks_raise
from tpmpi.core.grid import default_grid, factorisations, parse_shape


def test_factorisations_and_shape_strings():
    assert factorisations(1) == [(1, 1)]
    assert factorisations(6) == [(1, 6), (2, 3), (3, 2), (6, 1)]
    assert factorisations(7) == [(1, 7), (7, 1)]
    assert parse_shape("2x3") == (2, 3) and parse_shape("4X1") == (4, 1)
    for bad in ("2by3", "2x", "x2", "2x3x1", "", "²x2", "١x2", "1_0x1"):
        with pytest.raises(ValueError, match=rf"grid={bad!r}: expected RxC, e.g. 2x2"):
            parse_shape(bad)


@pytest.mark.mpi
def test_default_shape_is_one_row(world, grid):
    rank, size = world.comm.Get_rank(), world.size
    assert grid.shape == (1, size) and grid.label == f"1x{size}"
    assert (grid.rank, grid.size, grid.coords) == (rank, size, (0, rank))
    assert grid.row_comm.Get_size() == size and grid.col_comm.Get_size() == 1
    assert repr(grid) == f"ProcessGrid(1x{size}, rank={rank}, coords=(0, {rank}))"
    assert not grid.freed


@pytest.mark.mpi
def test_every_factorisation_gives_row_major_grid(world):
    comm, size = world.comm, world.size
    for pr, pc in factorisations(size):
        for node_aware in (False, True):
            with tpmpi.ProcessGrid(comm, shape=f"{pr}x{pc}", node_aware=node_aware) as grid:
                r, c = divmod(comm.Get_rank(), pc)  # one node: node order == plain order
                assert grid.rank == comm.Get_rank() and grid.coords == (r, c)
                assert grid.row_comm.Get_size() == pc and grid.row_comm.Get_rank() == c
                assert grid.col_comm.Get_size() == pr and grid.col_comm.Get_rank() == r
                assert grid.row_comm.allgather(grid.rank) == [r * pc + j for j in range(pc)]
                assert grid.col_comm.allgather(grid.rank) == [i * pc + c for i in range(pr)]


@pytest.mark.mpi
@pytest.mark.parametrize("shape", [(1, 4), (2, 2), (4, 1)])
def test_grid_coordinates_and_subcommunicators(shape):
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 4:
        pytest.skip("needs exactly 4 ranks")
    with tpmpi.ProcessGrid(comm, shape=shape) as grid:
        r, c = divmod(comm.Get_rank(), shape[1])
        assert grid.coords == (r, c) and grid.shape == shape
        assert grid.row_comm.Get_size() == shape[1] and grid.row_comm.Get_rank() == c
        assert grid.col_comm.Get_size() == shape[0] and grid.col_comm.Get_rank() == r
        assert grid.row_comm.allgather(comm.Get_rank()) == [r * shape[1] + j
                                                            for j in range(shape[1])]
        assert grid.label == f"{shape[0]}x{shape[1]}"


@pytest.mark.mpi
def test_bad_shapes_raise_on_every_rank(world):
    comm, size = world.comm, world.size
    valid = ", ".join(f"{r}x{c}" for r, c in factorisations(size))
    all_ranks_raise(comm, lambda: tpmpi.ProcessGrid(comm, shape=(size + 1, 1)),
                    rf"pr\*pc must equal the {size} ranks; valid shapes: 1x{size}")
    for bad in [(size + 1, 1), (2, 2 * size), (0, size), (1, size, 1)]:
        all_ranks_raise(comm, partial(tpmpi.ProcessGrid, comm, shape=bad),
                        f"valid shapes: {valid}$")
    all_ranks_raise(comm, lambda: tpmpi.ProcessGrid(comm, shape="3"), "expected RxC")
    if size > 1:  # valid on every rank, but not the same shape
        mine = (1, size) if comm.Get_rank() == 0 else (size, 1)
        all_ranks_raise(comm, lambda: tpmpi.ProcessGrid(comm, shape=mine),
                        r"shape differs across ranks: \(1, \d\) on rank 0 and")


def test_communicator_is_checked_before_any_collective():
    with pytest.raises(ValueError, match=r"comm is a builtins\.str: expected an mpi4py "
                                         r"communicator"):
        tpmpi.ProcessGrid("world")
    with pytest.raises(ValueError, match=r"comm is MPI\.COMM_NULL"):
        tpmpi.ProcessGrid(MPI.COMM_NULL)
    with pytest.raises(ValueError, match=r"comm is a plain MPI\.Comm handle: expected an "
                                         r"intracommunicator"):
        tpmpi.ProcessGrid(MPI.Comm(MPI.COMM_SELF))


def test_free_and_context_manager():
    grid = tpmpi.ProcessGrid(MPI.COMM_SELF)
    assert not grid.freed
    grid.free()
    assert grid.freed and grid.row_comm == MPI.COMM_NULL and grid.col_comm == MPI.COMM_NULL
    grid.free()  # freeing twice is harmless
    with tpmpi.ProcessGrid(MPI.COMM_SELF) as grid:
        assert grid.shape == (1, 1)
    assert grid.freed


def test_default_grid_is_shared_and_made_again_when_freed():
    """Collective over COMM_WORLD (every rank runs this test)."""
    first = default_grid()
    assert first is default_grid() and first.shape == (1, MPI.COMM_WORLD.Get_size())
    first.free()
    again = default_grid()
    assert again is not first and not again.freed and again is default_grid()


def blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return next(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.mark.mpi
def test_grids_meshes_and_layers_leave_blas_alone(world):
    """BLAS threads are process-wide: only configure_blas_threads (the CLI, scripts, tests)
    sets them; ProcessGrid's blas_threads= still applies them, deprecated."""
    from threadpoolctl import threadpool_limits

    comm = world.comm
    with threadpool_limits(limits=2, user_api="blas"):  # restored on exit (conftest's 1)
        with tpmpi.ProcessGrid(comm) as grid, tpmpi.Mesh(comm):
            tpmpi.ColumnParallelLinear(4, 4, grid=grid)
            assert blas_threads() == 2
            assert tpmpi.configure_blas_threads(comm, 1) == 1 and blas_threads() == 1
            assert tpmpi.core.backend.configured_blas_threads() == 1
        with pytest.warns(DeprecationWarning, match=r"tpmpi.configure_blas_threads"):
            tpmpi.ProcessGrid(comm, blas_threads=2).free()
        assert blas_threads() == 2
        if world.size > 1:  # the deprecated keyword on some ranks only: no rank is left waiting
            given = 1 if comm.Get_rank() == 0 else None
            all_ranks_raise(comm, lambda: tpmpi.ProcessGrid(comm, blas_threads=given),
                            "blas_threads differs across ranks: given on rank 0 and not given "
                            "on ranks? [0-9,]+")
