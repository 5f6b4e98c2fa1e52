"""ColumnParallelLinear against a serial float64 reference at world sizes 1-4."""
import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, assert_input_errors, rel_err

SHAPES = [(6, 5, 7), (9, 8, 8), (1, 3, 2), (0, 4, 5), (5, 3, 1), (4, 2, 3), (3, 0, 4)]


def problem(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X, W, b, dY = (rng.standard_normal(s) for s in [(m, k), (k, n), (n,), (m, n)])
    return [a.astype(dtype) for a in (X, W, b, dY)]


def tol(dtype):
    return 1e-12 if dtype == "float64" else 2e-5


@pytest.mark.mpi
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gather_output", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_serial(world, m, k, n, dtype, gather_output, bias):
    if not world.member:
        return
    X, W, b, dY = problem(m, k, n, dtype)
    grid = tpmpi.ProcessGrid(world.comm)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b if bias else None, grid=grid,
                                                  gather_output=gather_output)
    X64, W64, b64, dY64 = (a.astype(np.float64) for a in (X, W, b, dY))
    Y64 = X64 @ W64 + (b64 if bias else 0)
    cols = layer.shard[1]
    y = layer(X)
    assert y.dtype == np.dtype(dtype)
    if gather_output:
        assert y.shape == (m, n) and y.flags.c_contiguous
        assert rel_err(y, Y64) <= tol(dtype)
        dy = dY
    else:
        assert y.shape == (m, cols.stop - cols.start)
        assert rel_err(y, Y64[:, cols]) <= tol(dtype)
        dy = np.ascontiguousarray(dY[:, cols])
    for _ in range(2):  # gradients accumulate
        dx = layer.backward(dy)
        assert dx.shape == (m, k)
        assert rel_err(dx, dY64 @ W64.T) <= tol(dtype)
    assert rel_err(layer.grad_weight, 2 * (X64.T @ dY64)[:, cols]) <= tol(dtype)
    if bias:
        assert rel_err(layer.grad_bias, 2 * dY64.sum(0)[cols]) <= tol(dtype)
    else:
        assert layer.bias is None and layer.grad_bias is None
    assert np.array_equal(layer.gather_weight(), W)
    layer.zero_grad()
    assert not layer.grad_weight.any()
    grid.free()


@pytest.mark.mpi
def test_init_is_layout_invariant(world):
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    layer = tpmpi.ColumnParallelLinear(6, 11, grid=grid, seed=42, dtype="float64")
    assert np.array_equal(layer.gather_weight(), tpmpi.init_weight((6, 11), 42, "float64"))
    assert np.array_equal(layer.gather_bias(),
                          tpmpi.init_weight((11,), 42, "float64", stream=1, bound=1 / np.sqrt(6)))
    assert np.array_equal(layer.weight, tpmpi.init_weight((6, 11), 42, "float64",
                                                          cols=layer.shard[1]))
    grid.free()


@pytest.mark.mpi
def test_ranks_beyond_columns_hold_empty_shards(world):
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    X, W, b, dY = problem(3, 4, 2, "float64", seed=3)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    width = layer.shard[1].stop - layer.shard[1].start
    assert width == tpmpi.core.partition.block_sizes(2, grid.size)[grid.rank]
    if grid.size > 2:
        assert width == (0 if grid.rank >= 2 else 1)
    assert rel_err(layer(X), X @ W + b) <= 1e-12
    assert rel_err(layer.backward(dY), dY @ W.T) <= 1e-12
    grid.free()


@pytest.mark.mpi
def test_errors_are_raised_on_every_rank(world):
    if not world.member:
        return
    comm, rank = world.comm, world.comm.Get_rank()
    grid = tpmpi.ProcessGrid(comm)
    X, W, b, dY = problem(4, 5, 6, "float32")
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    assert_input_errors(comm, layer, X, dY)
    layer(X)
    all_ranks_raise(comm, lambda: layer.backward(dY[:3]), r"expected 4 rows")
    all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(5, -1, grid=grid),
                    "out_features=-1: expected a non-negative integer")
    all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(5, 6, grid=grid, dtype="int8"),
                    "dtype='int8'")
    if comm.Get_size() > 1:
        all_ranks_raise(comm, lambda: layer(X[: 4 - (rank == 1)]),
                        r"x.shape\[0\] differs across ranks: 4 on rank")
        all_ranks_raise(comm, lambda: layer(X[:, : 5 - (rank == 1)]),
                        r"x.shape=\(4, 4\): expected 5 columns \(rank 1\)")
        all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(5, 6 + (rank == 1), grid=grid),
                        "out_features differs across ranks")
        all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(5, 6, grid=grid, seed=rank),
                        "seed differs across ranks")
    size = comm.Get_size()
    all_ranks_raise(comm, lambda: tpmpi.ProcessGrid(comm, shape=(size + 1, 1)),
                    rf"pr\*pc must equal the {size} ranks; valid shapes: 1x{size}")
    grid.free()


@pytest.mark.mpi
def test_scatter_gather_roundtrip_all_layouts(world):
    if not world.member:
        return
    from tpmpi.core.grid import factorisations

    A = np.arange(7 * 5, dtype=np.float64).reshape(7, 5)
    v = np.arange(5, dtype=np.float32)
    for shape in factorisations(world.size):
        grid = tpmpi.ProcessGrid(world.comm, shape=shape)
        for layout in ("replicated", "cols", "rows", "tiles"):
            local = tpmpi.scatter(A, grid, layout)
            assert local.flags.c_contiguous
            assert np.array_equal(tpmpi.gather(local, grid, layout, A.shape), A)
            if layout != "rows":
                assert np.array_equal(tpmpi.gather(tpmpi.scatter(v, grid, layout), grid, layout,
                                                   v.shape), v)
        all_ranks_raise(world.comm, lambda: tpmpi.gather(A, grid, "cols", (7, 5 * world.size + 1)),
                        "a_local.shape=" if world.size > 1 else "a_local.shape=")
        grid.free()


@pytest.mark.mpi
@pytest.mark.parametrize("shape", [(1, 4), (2, 2), (4, 1)])
def test_grid_coordinates_and_subcommunicators(shape):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() != 4:
        pytest.skip("needs exactly 4 ranks")
    with tpmpi.ProcessGrid(comm, shape=shape) as grid:
        r, c = divmod(comm.Get_rank(), shape[1])
        assert grid.coords == (r, c) and grid.shape == shape
        assert grid.row_comm.Get_size() == shape[1] and grid.row_comm.Get_rank() == c
        assert grid.col_comm.Get_size() == shape[0] and grid.col_comm.Get_rank() == r
        assert grid.row_comm.allgather(comm.Get_rank()) == [r * shape[1] + j for j in range(shape[1])]
        assert grid.label == f"{shape[0]}x{shape[1]}"


@pytest.mark.mpi
def test_bad_thread_count_raises_on_every_rank(world, monkeypatch):
    if not world.member:
        return
    comm = world.comm
    all_ranks_raise(comm, lambda: tpmpi.configure_blas_threads(comm, 0),
                    r"^threads=0: expected None or a positive integer$")
    if comm.Get_rank() == 0:
        monkeypatch.setenv("TPMPI_THREADS", "two")
    else:
        monkeypatch.delenv("TPMPI_THREADS", raising=False)
    all_ranks_raise(comm, lambda: tpmpi.configure_blas_threads(comm),
                    r"TPMPI_THREADS='two': expected a positive integer" +
                    (r" \(rank 0\)" if world.size > 1 else "$"))


def blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return next(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.mark.mpi
def test_grids_meshes_and_layers_leave_blas_alone(world):
    """BLAS threads are process-wide: only configure_blas_threads (the CLI, scripts, tests)
    sets them; ProcessGrid's blas_threads= still applies them, deprecated."""
    from threadpoolctl import threadpool_limits

    if not world.member:
        return
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
