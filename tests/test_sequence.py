"""Sequence parallelism and the FFN modes as compositions of tpmpi.core.mappings: every mode of
ParallelMLP on every grid of 1-4 ranks against the serial float64 reference (outputs, dX and all
four gradients), mode "sequence" equal to "megatron", the sequence-parallel linear layers alone,
their adjoints, the collectives they run and their input errors."""
import re

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, counting, profiled_calls, rel_err
from problems import MLP_TOL, linear_problem, mlp_problem, mlp_reference
from tpmpi.core.grid import factorisations
from tpmpi.layers.mlp import MODES
from tpmpi.core.layout import Layouts

IO_LAYOUT = {"megatron": "replicated", "book": "replicated", "sequence": "rows",
             "tile2d": "tiles"}  # of x and y, by mode

# (M, d_model, d_hidden): even, uneven, M < P (empty row blocks), d_hidden < P, M = 0
SHAPES = [(8, 4, 8), (7, 3, 5), (2, 4, 6), (5, 2, 3), (0, 3, 4)]


def shapes_for(size, mode):
    return factorisations(size) if mode == "tile2d" else [(1, size), (size, 1)]


def check_mlp(mlp, grid, X, W1, b1, W2, b2, dY, activation, dtype, times=1):
    """Forward/backward of ``mlp`` against the serial reference, in the mode's layout."""
    lay = mlp.layouts.x  # the same as y's in every mode
    Y, dX, dW1, db1, dW2, db2 = mlp_reference(X, W1, b1, W2, b2, dY, activation)
    y = mlp(tpmpi.scatter(X, grid, lay))
    assert rel_err(y, tpmpi.scatter(Y, grid, lay)) <= MLP_TOL[dtype]
    assert rel_err(tpmpi.gather(y, grid, lay, Y.shape), Y) <= MLP_TOL[dtype]
    for _ in range(times):
        dx = mlp.backward(tpmpi.scatter(dY.astype(dtype), grid, lay))
    assert rel_err(dx, tpmpi.scatter(dX, grid, lay)) <= MLP_TOL[dtype]
    for layer, dW, db in ((mlp.fc1, dW1, db1), (mlp.fc2, dW2, db2)):
        assert rel_err(layer.grad_weight, times * dW[layer.shard]) <= MLP_TOL[dtype]
        assert rel_err(layer.grad_bias, times * db[layer.bias_slice]) <= MLP_TOL[dtype]
    return y, dx


@pytest.mark.mpi
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,d,h", SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_mode_on_every_grid_matches_serial(world, grids, mode, m, d, h, dtype):
    X, W1, b1, W2, b2, dY = mlp_problem(m, d, h, dtype, seed=3)
    for grid in grids(shapes_for(world.size, mode)):
        mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode=mode)
        assert mlp.layouts == Layouts(IO_LAYOUT[mode], IO_LAYOUT[mode])
        assert mlp.children() == [("fc1", mlp.fc1), ("fc2", mlp.fc2)]
        check_mlp(mlp, grid, X, W1, b1, W2, b2, dY, "gelu", dtype, times=2)
        assert np.array_equal(mlp.fc1.gather_weight(), W1)
        assert np.array_equal(mlp.fc2.gather_bias(), b2)


@pytest.mark.mpi
@pytest.mark.parametrize("m,d,h", SHAPES)
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_sequence_equals_megatron(world, grid, m, d, h, activation):
    """Same seeds -> same parameters; SP output rows and every gradient equal Megatron's."""
    meg = tpmpi.ParallelMLP(d, h, grid=grid, mode="megatron", seed=5, dtype="float64",
                            activation=activation)
    seq = tpmpi.ParallelMLP(d, h, grid=grid, mode="sequence", seed=5, dtype="float64",
                            activation=activation)
    for a, b in zip(meg.parameters(), seq.parameters()):
        assert a[0] == b[0] and np.array_equal(a[1], b[1])
    rng = np.random.default_rng(1)
    X, dY = rng.standard_normal((m, d)), rng.standard_normal((m, d))
    rows = tpmpi.core.layout.local_slices((m, d), grid, "rows")
    y_meg, y_seq = meg(X), seq(np.ascontiguousarray(X[rows]))
    assert rel_err(y_seq, y_meg[rows]) <= 1e-13
    dx_meg, dx_seq = meg.backward(dY), seq.backward(np.ascontiguousarray(dY[rows]))
    assert rel_err(dx_seq, dx_meg[rows]) <= 1e-13
    for (name, _, g_meg), (_, _, g_seq) in zip(meg.parameters(), seq.parameters()):
        assert rel_err(g_seq, g_meg) <= 1e-13, name


@pytest.mark.mpi
def test_sequence_collectives_per_pass(world, grid):
    """Forward: Allgather of x rows + Reduce_scatter of y; backward: Allgather of dY, the
    re-gather of x and the Reduce_scatter of dX."""
    X, W1, b1, W2, b2, dY = mlp_problem(6, 3, 8, "float64")
    mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode="sequence")
    count = counting(mlp)
    rows = tpmpi.core.layout.local_slices(X.shape, grid, "rows")
    one = grid.size == 1
    mlp(np.ascontiguousarray(X[rows]))
    assert profiled_calls(count) == ({} if one else {"allgather": 1, "reduce_scatter": 1})
    mlp.backward(np.ascontiguousarray(dY[rows]))
    assert profiled_calls(count) == ({} if one else {"allgather": 2, "reduce_scatter": 1})


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["column", "column_gather", "row", "row_parallel_input"])
@pytest.mark.parametrize("m,k,n", [(7, 5, 6), (2, 3, 5), (5, 2, 3)])
@pytest.mark.parametrize("overlap", [True, False])
def test_sequence_parallel_layers(world, grid, kind, m, k, n, overlap):
    """Each SP layer alone against the serial reference, and its backward the adjoint of its
    forward (inner products summed over ranks for the distributed layouts)."""
    comm = world.comm
    X, W, b, dY = linear_problem(m, k, n, seed=9)
    column = kind.startswith("column")
    if column:
        opts = dict(gather_output=kind == "column_gather")
        cls, x_lay, y_lay = tpmpi.ColumnParallelLinear, "rows", \
            "replicated" if opts["gather_output"] else "cols"
    else:
        opts = dict(input_is_parallel=kind == "row_parallel_input")
        cls, x_lay, y_lay = tpmpi.RowParallelLinear, \
            "cols" if opts["input_is_parallel"] else "replicated", "rows"
    layer = cls.from_dense(W, b, grid=grid, sequence_parallel=True, overlap=overlap,
                           **opts)
    x, dy = tpmpi.scatter(X, grid, x_lay), tpmpi.scatter(dY, grid, y_lay)
    y = layer(x)
    dx = layer.backward(dy)
    assert rel_err(y, tpmpi.scatter(X @ W + b, grid, y_lay)) <= 1e-12
    assert rel_err(dx, tpmpi.scatter(dY @ W.T, grid, x_lay)) <= 1e-12
    assert rel_err(layer.grad_weight, (X.T @ dY)[layer.shard]) <= 1e-12
    assert rel_err(layer.grad_bias, dY.sum(0)[layer.bias_slice]) <= 1e-12

    def dot(lay, a, c):
        local = float(np.vdot(a, c))
        return local if lay == "replicated" else comm.allreduce(local)

    nobias = cls.from_dense(W, None, grid=grid, sequence_parallel=True, **opts)
    lhs = dot(y_lay, nobias(x), dy)
    rhs = dot(x_lay, x, nobias.backward(dy))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)
    assert nobias.config()["sequence_parallel"] is True


@pytest.mark.mpi
def test_sequence_input_errors(world, grid):
    comm, rank, p = world.comm, world.comm.Get_rank(), world.size
    mlp = tpmpi.ParallelMLP(3, 5, grid=grid, mode="sequence", dtype="float64")
    m = 4 * p + 1
    a, b = tpmpi.block_partition(m, p)[rank]
    x = np.zeros((b - a, 3))
    all_ranks_raise(comm, lambda: mlp.backward(x), r"backward\(\) called before")
    if p > 1:  # two extra rows on the last rank: not the block partition of the total
        bad = np.zeros((b - a + 2 * (rank == p - 1), 3))
        counts = tuple(q - o + 2 * (r == p - 1)
                       for r, (o, q) in enumerate(tpmpi.block_partition(m, p)))
        want = tuple(q - o for o, q in tpmpi.block_partition(m + 2, p))
        all_ranks_raise(comm, lambda: mlp(bad),
                        rf"x rows per rank {re.escape(str(counts))}: expected "
                        rf"{re.escape(str(want))}, the block partition of the {m + 2} rows "
                        rf"in layout 'rows' over {p} ranks")
    mlp(x)
    dy = np.zeros((1 if rank == 0 else 0, 3))
    all_ranks_raise(comm, lambda: mlp.backward(dy),
                    rf"dy: 1 rows in all .*: expected {m} rows in all \(the forward "
                    r"input's\)")
    all_ranks_raise(comm, lambda: mlp(np.zeros((b - a, 4))), r"expected 3 columns")


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["sequence", "tile2d"])
def test_new_modes_checkpoint_and_reload_on_another_grid(world, shared_tmp, mode):
    comm = world.comm
    path = str(shared_tmp / mode)
    X, W1, b1, W2, b2, dY = mlp_problem(5, 3, 7, "float64", seed=2)
    shapes = factorisations(world.size)
    with tpmpi.ProcessGrid(comm, shapes[-1]) as grid:
        tpmpi.save_checkpoint(path, tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid,
                                                                 mode=mode))
    with tpmpi.ProcessGrid(comm, shapes[0]) as grid:
        mlp = tpmpi.ParallelMLP.load_checkpoint(path, grid=grid)
        assert mlp.mode == mode and mlp.layouts == Layouts(IO_LAYOUT[mode], IO_LAYOUT[mode])
        for layer, (W, b) in zip((mlp.fc1, mlp.fc2), [(W1, b1), (W2, b2)]):
            assert np.array_equal(layer.weight, W[layer.shard])
            assert np.array_equal(layer.bias, b[layer.bias_slice])
        check_mlp(mlp, grid, X, W1, b1, W2, b2, dY, "gelu", "float64")
