"""ColumnParallelLinear against a serial float64 reference at world sizes 1-4, and its
pipelined form (``chunks=c``: bitwise equal to ``chunks=1``)."""
from functools import partial

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, assert_input_errors, counting, rel_err
from problems import LINEAR_SHAPES, LINEAR_TOL, linear_problem
from tpmpi.layers.column import CHUNK_ROWS, chunk_bounds


@pytest.mark.mpi
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("gather_output", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_serial(grid, m, k, n, dtype, gather_output, bias):
    X, W, b, dY = linear_problem(m, k, n, dtype)
    tol = LINEAR_TOL[dtype]
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b if bias else None, grid=grid,
                                                  gather_output=gather_output)
    X64, W64, b64, dY64 = (a.astype(np.float64) for a in (X, W, b, dY))
    Y64 = X64 @ W64 + (b64 if bias else 0)
    cols = layer.shard[1]
    y = layer(X)
    assert y.dtype == np.dtype(dtype)
    if gather_output:
        assert y.shape == (m, n) and y.flags.c_contiguous
        assert rel_err(y, Y64) <= tol
        dy = dY
    else:
        assert y.shape == (m, cols.stop - cols.start)
        assert rel_err(y, Y64[:, cols]) <= tol
        dy = np.ascontiguousarray(dY[:, cols])
    for _ in range(2):  # gradients accumulate
        dx = layer.backward(dy)
        assert dx.shape == (m, k)
        assert rel_err(dx, dY64 @ W64.T) <= tol
    assert rel_err(layer.grad_weight, 2 * (X64.T @ dY64)[:, cols]) <= tol
    if bias:
        assert rel_err(layer.grad_bias, 2 * dY64.sum(0)[cols]) <= tol
    else:
        assert layer.bias is None and layer.grad_bias is None
    assert np.array_equal(layer.gather_weight(), W)
    layer.zero_grad()
    assert not layer.grad_weight.any()


@pytest.mark.mpi
def test_init_is_layout_invariant(grid):
    layer = tpmpi.ColumnParallelLinear(6, 11, grid=grid, seed=42, dtype="float64")
    assert np.array_equal(layer.gather_weight(), tpmpi.init_weight((6, 11), 42, "float64"))
    assert np.array_equal(layer.gather_bias(),
                          tpmpi.init_weight((11,), 42, "float64", stream=1, bound=1 / np.sqrt(6)))
    assert np.array_equal(layer.weight, tpmpi.init_weight((6, 11), 42, "float64",
                                                          cols=layer.shard[1]))


@pytest.mark.mpi
def test_ranks_beyond_columns_hold_empty_shards(grid):
    X, W, b, dY = linear_problem(3, 4, 2, "float64", seed=3)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    width = layer.shard[1].stop - layer.shard[1].start
    assert width == tpmpi.core.partition.block_sizes(2, grid.size)[grid.rank]
    if grid.size > 2:
        assert width == (0 if grid.rank >= 2 else 1)
    assert rel_err(layer(X), X @ W + b) <= 1e-12
    assert rel_err(layer.backward(dY), dY @ W.T) <= 1e-12


@pytest.mark.mpi
def test_errors_are_raised_on_every_rank(world, grid):
    comm, rank = world.comm, world.comm.Get_rank()
    X, W, b, dY = linear_problem(4, 5, 6, "float32")
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


# --------------------------------------------------------------------------- chunks


def test_chunk_bounds_tile_rows_at_granule_boundaries():
    assert chunk_bounds(0, 3) == [(0, 0)]
    assert chunk_bounds(CHUNK_ROWS - 1, 4) == [(0, CHUNK_ROWS - 1)]
    assert chunk_bounds(2 * CHUNK_ROWS + 5, 1) == [(0, 2 * CHUNK_ROWS + 5)]
    assert chunk_bounds(2 * CHUNK_ROWS + 5, 2) == [(0, CHUNK_ROWS),
                                                   (CHUNK_ROWS, 2 * CHUNK_ROWS + 5)]
    for m in (1, 47, 48, 95, 96, 200, 1000):
        for c in (1, 2, 3, 7, 10**6):
            rows = chunk_bounds(m, c)
            assert rows[0][0] == 0 and rows[-1][1] == m and len(rows) <= c
            assert all(a < b for a, b in rows) and all(b == a2 for (_, b), (a2, _) in
                                                       zip(rows, rows[1:]))
            assert all(b % CHUNK_ROWS == 0 for _, b in rows[:-1])


@pytest.mark.mpi
@pytest.mark.parametrize("m,k,n", [(150, 7, 9), (101, 16, 5), (0, 4, 6), (30, 5, 3),
                                   (2 * CHUNK_ROWS, 3, 1)])
@pytest.mark.parametrize("chunks", [2, 3, 10**4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_chunked_equals_unchunked_bitwise(grid, m, k, n, chunks, dtype):
    X, W, b, dY = linear_problem(m, k, n, dtype, seed=m + k + n)
    plain = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
    chunked = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid, chunks=chunks)
    plain_count, chunked_count = counting(plain), counting(chunked)
    for _ in range(2):  # reused local buffer
        y = chunked(X)
        assert y.flags.c_contiguous and np.array_equal(y, plain(X))
    assert np.array_equal(chunked.backward(dY), plain.backward(dY))
    assert np.array_equal(chunked.grad_weight, plain.grad_weight)
    if grid.size > 1 and m > 0:  # one gather per chunk, the same bytes in all
        assert chunked_count.calls["allgather"] == 2 * len(chunk_bounds(m, chunks))
        assert chunked_count.bytes == plain_count.bytes


@pytest.mark.mpi
def test_chunks_validated_on_every_rank(world, grid):
    comm, rank = world.comm, world.comm.Get_rank()
    for bad in (0, -1, 2.0, True, None):
        all_ranks_raise(comm, partial(tpmpi.ColumnParallelLinear, 4, 5, grid=grid, chunks=bad),
                        rf"chunks={bad!r}: expected a positive integer")
    if comm.Get_size() > 1:
        all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(4, 5, grid=grid,
                                                                 chunks=1 + rank),
                        "chunks differs across ranks")
