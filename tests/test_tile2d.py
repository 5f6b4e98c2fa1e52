"""TileParallelLinear (2D SUMMA, gather and panel forms) at world sizes 1-4 against a serial
float64 reference, on every grid shape of each world size."""
from functools import partial

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, counting, rel_err
from problems import linear_problem
from tpmpi.core.partition import block_partition
from tpmpi.core.schedule import Collective
from tpmpi.layers.tile2d import k_segments

# even, uneven, empty tiles (m or n smaller than the grid), K = 0, M = 0
SHAPES = [(8, 6, 4), (7, 5, 3), (1, 2, 3), (5, 0, 3), (0, 4, 5), (3, 7, 1)]
PANELS = [None, 1, 2, 3, 100]


def tiles(a, grid):
    return tpmpi.scatter(a, grid, "tiles")


@pytest.mark.mpi
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("panel", PANELS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_serial(grids, m, k, n, panel, bias):
    X, W, b, dY = linear_problem(m, k, n)
    Y = X @ W + (b if bias else 0)
    for grid in grids():
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
def test_two_chained_layers_float32(grids, panels):
    rng = np.random.default_rng(1)
    X, W1, W2, dY = (rng.standard_normal(s).astype(np.float32)
                     for s in [(9, 6), (6, 7), (7, 5), (9, 5)])
    b1, b2 = rng.standard_normal(7).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    X64, W164, W264, dY64 = (a.astype(np.float64) for a in (X, W1, W2, dY))
    H = X64 @ W164 + b1
    Y = H @ W264 + b2
    dH = dY64 @ W264.T
    for grid in grids():
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
def test_init_is_layout_invariant_and_bytes(grids, panel):
    for grid in grids():
        layer = tpmpi.TileParallelLinear(6, 11, grid=grid, seed=42, dtype="float64", panel=panel)
        assert np.array_equal(layer.gather_weight(), tpmpi.init_weight((6, 11), 42, "float64"))
        x = tiles(np.ones((5, 6)), grid)
        count = counting(layer)
        layer.backward(layer(x))
        # the profiler counts only collectives over more than one rank, like the schedule;
        # rank (0, 0) holds the largest tiles, as the schedule does
        moved = sum(s.nbytes for s in layer.schedule(5).steps() if isinstance(s, Collective))
        if grid.rank == 0:
            assert count.bytes == moved
        if grid.size == 1:
            assert moved == 0


def test_k_segments_split_at_panel_and_owner_boundaries():
    segs = k_segments(7, 3, block_partition(7, 2), block_partition(7, 3))
    # X owners: [0,4) [4,7); W owners: [0,3) [3,5) [5,7); panels: 0, 3, 6
    assert segs == [(0, 3, 0, 0), (3, 4, 0, 1), (4, 5, 1, 1), (5, 6, 1, 2), (6, 7, 1, 2)]
    assert k_segments(0, 2, block_partition(0, 2), block_partition(0, 1)) == []
    assert k_segments(4, 100, [(0, 4)], [(0, 4)]) == [(0, 4, 0, 0)]


def assert_errors_on(grid, comm, X, W, b, dY) -> None:
    """The panel and input errors of a tile layer on ``grid``, each raised on every rank."""
    rank = comm.Get_rank()
    for bad in (0, -2, 1.5, True, "4"):
        all_ranks_raise(comm, partial(tpmpi.TileParallelLinear, 4, 6, grid=grid, panel=bad),
                        rf"panel={bad!r}: expected None or a positive integer")
    if comm.Get_size() > 1:
        all_ranks_raise(comm, lambda: tpmpi.TileParallelLinear(4, 6, grid=grid, panel=1 + rank),
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
def test_errors_are_raised_on_every_rank(world, grids):
    X, W, b, dY = linear_problem(5, 4, 6)
    for grid in grids():
        assert_errors_on(grid, world.comm, X, W, b, dY)
