"""RowParallelLinear against a serial float64 reference at world sizes 1-4."""
import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, assert_input_errors, counting, rel_err
from problems import LINEAR_SHAPES, LINEAR_TOL, linear_problem


@pytest.mark.mpi
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("input_is_parallel", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("overlap", [True, False])
def test_forward_backward_match_serial(world, grid, m, k, n, dtype, input_is_parallel, bias,
                                       overlap):
    X, W, b, dY = linear_problem(m, k, n, dtype)
    layer = tpmpi.RowParallelLinear.from_dense(W, b if bias else None, grid=grid,
                                               input_is_parallel=input_is_parallel,
                                               overlap=overlap)
    X64, W64, b64, dY64 = (a.astype(np.float64) for a in (X, W, b, dY))
    rows = layer.shard[0]
    assert layer.shard[1] == slice(0, n)
    x = np.ascontiguousarray(X[:, rows]) if input_is_parallel else X
    y = layer(x)
    assert y.dtype == np.dtype(dtype) and y.shape == (m, n) and y.flags.c_contiguous
    assert rel_err(y, X64 @ W64 + (b64 if bias else 0)) <= LINEAR_TOL[dtype]
    for _ in range(2):  # gradients accumulate
        dx = layer.backward(dY)
        dX64 = dY64 @ W64.T
        if input_is_parallel:
            assert dx.shape == (m, rows.stop - rows.start)
            assert rel_err(dx, dX64[:, rows]) <= LINEAR_TOL[dtype]
        else:
            assert dx.shape == (m, k) and dx.flags.c_contiguous
            assert rel_err(dx, dX64) <= LINEAR_TOL[dtype]
    assert rel_err(layer.grad_weight, 2 * (X64.T @ dY64)[rows]) <= LINEAR_TOL[dtype]
    if bias:
        assert layer.grad_bias.shape == (n,)
        assert rel_err(layer.grad_bias, 2 * dY64.sum(0)) <= LINEAR_TOL[dtype]
        assert len({g.tobytes() for g in world.comm.allgather(layer.grad_bias)}) == 1
    else:
        assert layer.bias is None and layer.grad_bias is None
    assert np.array_equal(layer.gather_weight(), W)
    if bias:
        assert np.array_equal(layer.gather_bias(), b)
    layer.zero_grad()
    assert not layer.grad_weight.any()


@pytest.mark.mpi
def test_init_is_layout_invariant(grid):
    layer = tpmpi.RowParallelLinear(11, 6, grid=grid, seed=42, dtype="float64")
    assert np.array_equal(layer.gather_weight(), tpmpi.init_weight((11, 6), 42, "float64"))
    assert np.array_equal(layer.bias, tpmpi.init_weight((6,), 42, "float64", stream=1,
                                                        bound=1 / np.sqrt(11)))
    assert np.array_equal(layer.weight, tpmpi.init_weight((11, 6), 42, "float64",
                                                          rows=layer.shard[0]))


@pytest.mark.mpi
def test_ranks_beyond_rows_hold_empty_shards(grid):
    X, W, b, dY = linear_problem(3, 2, 4, "float64", seed=3)
    for input_is_parallel in (False, True):
        layer = tpmpi.RowParallelLinear.from_dense(W, b, grid=grid,
                                                   input_is_parallel=input_is_parallel)
        rows = layer.shard[0]
        assert rows.stop - rows.start == tpmpi.core.partition.block_sizes(2, grid.size)[grid.rank]
        x = np.ascontiguousarray(X[:, rows]) if input_is_parallel else X
        assert rel_err(layer(x), X @ W + b) <= 1e-12
        dx = layer.backward(dY)
        assert rel_err(dx, (dY @ W.T)[:, rows] if input_is_parallel else dY @ W.T) <= 1e-12


@pytest.mark.mpi
@pytest.mark.parametrize("input_is_parallel", [False, True])
@pytest.mark.parametrize("overlap", [True, False])
def test_collectives_per_pass(grid, input_is_parallel, overlap):
    """Forward: one Allreduce; backward: one Allgather of dX, or none with parallel input."""
    X, W, b, dY = linear_problem(4, 5, 3, "float64")
    layer = tpmpi.RowParallelLinear.from_dense(W, b, grid=grid, overlap=overlap,
                                               input_is_parallel=input_is_parallel)
    count = counting(layer)
    layer(np.ascontiguousarray(X[:, layer.shard[0]]) if input_is_parallel else X)
    p = grid.size
    assert count.calls == ({"allreduce": 1} if p > 1 else {})
    assert count.bytes == (4 * 3 * 8 if p > 1 else 0)
    count.reset()
    layer.backward(dY)
    want = {} if input_is_parallel or p == 1 else {"allgather": 1}
    assert count.calls == want
    assert count.bytes == (4 * 5 * 8 if want else 0)


@pytest.mark.mpi
def test_errors_are_raised_on_every_rank(world, grid):
    comm, rank = world.comm, world.comm.Get_rank()
    X, W, b, dY = linear_problem(4, 5, 6, "float32")
    layer = tpmpi.RowParallelLinear.from_dense(W, b, grid=grid)
    assert_input_errors(comm, layer, X, dY)
    layer(X)
    all_ranks_raise(comm, lambda: layer.backward(dY[:, :5]), r"dy.shape=\(4, 5\): expected 6")
    all_ranks_raise(comm, lambda: layer.backward(dY[:3]), r"expected 4 rows")
    par = tpmpi.RowParallelLinear.from_dense(W, b, grid=grid, input_is_parallel=True)
    all_ranks_raise(comm, lambda: par(X[:, :5 - comm.Get_size()]), r"expected \d columns")
    all_ranks_raise(comm, lambda: tpmpi.RowParallelLinear(-5, 6, grid=grid), "in_features=-5")
    if comm.Get_size() > 1:
        all_ranks_raise(comm, lambda: tpmpi.RowParallelLinear(5, 6, grid=grid,
                                                              overlap=rank == 0),
                        "overlap differs across ranks")
        all_ranks_raise(comm, lambda: tpmpi.RowParallelLinear(
            5, 6, grid=grid, input_is_parallel=rank == 1), "input_is_parallel differs")
