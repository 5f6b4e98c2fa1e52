"""TileParallelLinear (2D SUMMA, gather and panel forms) and 2D ProcessGrid at world sizes 1-4,
against a serial float64 reference; every grid shape of each world size."""
import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, rel_err
from tpmpi.core.grid import factorisations
from tpmpi.layers.tile2d import k_segments
from tpmpi.core.partition import block_partition

# even, uneven, empty tiles (m or n smaller than the grid), K = 0, M = 0
SHAPES = [(8, 6, 4), (7, 5, 3), (1, 2, 3), (5, 0, 3), (0, 4, 5), (3, 7, 1)]
PANELS = [None, 1, 2, 3, 100]


def problem(m, k, n, dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(m, k), (k, n), (n,), (m, n)]]


def tiles(a, grid):
    return tpmpi.scatter(a, grid, "tiles")


def grids(world):
    for shape in factorisations(world.size):
        grid = tpmpi.ProcessGrid(world.comm, shape=shape)
        yield grid
        grid.free()


@pytest.mark.mpi
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("panel", PANELS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_serial(world, m, k, n, panel, bias):
    if not world.member:
        return
    X, W, b, dY = problem(m, k, n)
    Y = X @ W + (b if bias else 0)
    for grid in grids(world):
        layer = tpmpi.TileParallelLinear.from_dense(W, b if bias else None, grid=grid,
                                                    panel=panel)
        y = layer(tiles(X, grid))
        assert y.shape == tiles(Y, grid).shape
        assert rel_err(y, tiles(Y, grid)) <= 1e-12
        for _ in range(2):  # gradients accumulate
            dx = layer.backward(tiles(dY, grid))
            assert rel_err(dx, tiles(dY @ W.T, grid)) <= 1e-12
        assert rel_err(layer.grad_weight, 2 * tiles(X.T @ dY, grid)) <= 1e-12
        if bias:
            assert rel_err(layer.grad_bias, 2 * tiles(dY.sum(0), grid)) <= 1e-12
        assert np.array_equal(layer.gather_weight(), W)


@pytest.mark.mpi
@pytest.mark.parametrize("panels", [(None, None), (2, 1), (None, 3), (100, None)])
def test_two_chained_layers_float32(world, panels):
    if not world.member:
        return
    rng = np.random.default_rng(1)
    X, W1, W2, dY = (rng.standard_normal(s).astype(np.float32)
                     for s in [(9, 6), (6, 7), (7, 5), (9, 5)])
    b1, b2 = rng.standard_normal(7).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    X64, W164, W264, dY64 = (a.astype(np.float64) for a in (X, W1, W2, dY))
    H = X64 @ W164 + b1
    Y = H @ W264 + b2
    dH = dY64 @ W264.T
    for grid in grids(world):
        l1 = tpmpi.TileParallelLinear.from_dense(W1, b1, grid=grid, panel=panels[0])
        l2 = tpmpi.TileParallelLinear.from_dense(W2, b2, grid=grid, panel=panels[1])
        y = l2(l1(tiles(X, grid)))  # no redistribution between the layers
        assert y.dtype == np.float32 and rel_err(y, tiles(Y, grid)) <= 2e-5
        dx = l1.backward(l2.backward(tiles(dY, grid)))
        assert rel_err(dx, tiles(dH @ W164.T, grid)) <= 2e-5
        assert rel_err(l2.grad_weight, tiles(H.T @ dY64, grid)) <= 2e-5
        assert rel_err(l1.grad_weight, tiles(X64.T @ dH, grid)) <= 2e-5
        assert rel_err(l1.grad_bias, tiles(dH.sum(0), grid)) <= 2e-5


@pytest.mark.mpi
@pytest.mark.parametrize("panel", [None, 4])
def test_init_is_layout_invariant_and_bytes(world, panel):
    if not world.member:
        return
    for grid in grids(world):
        layer = tpmpi.TileParallelLinear(6, 11, grid=grid, seed=42, dtype="float64", panel=panel)
        assert np.array_equal(layer.gather_weight(), tpmpi.init_weight((6, 11), 42, "float64"))
        x = tiles(np.ones((5, 6)), grid)
        layer.profiler.reset()
        layer.backward(layer(x))
        pr, pc = grid.shape
        moved = layer.comm_bytes(5) + layer.comm_bytes(5, backward=True)
        # the profiler counts only collectives over more than one rank, like comm_bytes
        assert layer.profiler.bytes == moved
        if pr * pc == 1:
            assert moved == 0


def test_k_segments_split_at_panel_and_owner_boundaries():
    segs = k_segments(7, 3, block_partition(7, 2), block_partition(7, 3))
    # X owners: [0,4) [4,7); W owners: [0,3) [3,5) [5,7); panels: 0, 3, 6
    assert segs == [(0, 3, 0, 0), (3, 4, 0, 1), (4, 5, 1, 1), (5, 6, 1, 2), (6, 7, 1, 2)]
    assert k_segments(0, 2, block_partition(0, 2), block_partition(0, 1)) == []
    assert k_segments(4, 100, [(0, 4)], [(0, 4)]) == [(0, 4, 0, 0)]


@pytest.mark.mpi
def test_errors_are_raised_on_every_rank(world):
    if not world.member:
        return
    comm, rank = world.comm, world.comm.Get_rank()
    X, W, b, dY = problem(5, 4, 6)
    for grid in grids(world):
        for bad in (0, -2, 1.5, True, "4"):
            all_ranks_raise(comm, lambda: tpmpi.TileParallelLinear(4, 6, grid=grid, panel=bad),
                            rf"panel={bad!r}: expected None or a positive integer")
        if comm.Get_size() > 1:
            all_ranks_raise(comm, lambda: tpmpi.TileParallelLinear(4, 6, grid=grid,
                                                                   panel=1 + rank),
                            "panel differs across ranks")
        layer = tpmpi.TileParallelLinear.from_dense(W, b, grid=grid, panel=2)
        x = tiles(X, grid)
        all_ranks_raise(comm, lambda: layer.backward(tiles(dY, grid)),
                        r"backward\(\) called before forward")
        all_ranks_raise(comm, lambda: layer(x.astype(np.float32)),
                        "x.dtype=float32: expected float64")
        all_ranks_raise(comm, lambda: layer(x.tolist()), "expected a numpy array")
        if grid.shape[1] > 1:  # the global X is not a tile
            all_ranks_raise(comm, lambda: layer(X), r"x.shape=\(\d+, 4\): expected .* tile")
        if grid.size > 1:  # the last rank (never an empty tile here) passes a row too few
            short = x[:-1] if rank == grid.size - 1 else x
            all_ranks_raise(comm, lambda: layer(short),
                            rf"x.shape=.*expected .* in layout 'tiles' on grid "
                            rf"{grid.label} \(rank {grid.size - 1}\)")
        y = layer(x)
        all_ranks_raise(comm, lambda: layer.backward(np.zeros((y.shape[0], y.shape[1] + 1))),
                        r"dy.shape=.*expected")


@pytest.mark.mpi
def test_every_factorisation_gives_row_major_grid(world):
    if not world.member:
        return
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
    valid = ", ".join(f"{r}x{c}" for r, c in factorisations(size))
    for bad in [(size + 1, 1), (2, 2 * size), (0, size), "3"]:
        all_ranks_raise(comm, lambda: tpmpi.ProcessGrid(comm, shape=bad),
                        "expected RxC" if bad == "3" else f"valid shapes: {valid}$")


@pytest.mark.mpi
def test_measure_overlap_on_panel_layer(world):
    if not world.member:
        return
    from tpmpi.studies.overlap import measure_overlap

    for grid in grids(world):
        layer = tpmpi.TileParallelLinear(16, 12, grid=grid, panel=4, dtype="float64")
        x = tiles(np.ones((10, 16)), grid)
        times = measure_overlap(layer, lambda: layer(x), iters=2)
        assert min(times.overall_s, times.compute_s, times.comm_s) >= 0
        assert 0 <= times.overlap_pct <= 100
        assert set(times.as_dict()) == {"overall_s", "compute_s", "comm_only_s", "overlap_pct",
                                        "saved_s"}
        assert rel_err(layer(x), tiles(np.ones((10, 16)) @ layer.gather_weight()
                                       + layer.gather_bias(), grid)) <= 1e-12
        all_ranks_raise(grid.comm, lambda: measure_overlap(layer, lambda: None, iters=0),
                        "iters=0: expected a positive integer")
