"""What every parallel layer shares (tpmpi/layers/base.py): inputs enter C-ordered whatever
their memory layout (Fortran order, strided views, on one rank or all), and the input that
backward reads is the layer's own copy (the caller may refill its buffer), for every layer, MLP
mode and DataParallel, against the serial float64 reference."""
import numpy as np
import pytest

import tpmpi
from conftest import rel_err
from problems import MLP_TOL, linear_problem, mlp_problem, mlp_reference
from tpmpi.core.grid import factorisations
from tpmpi.layers.base import enter_array
from tpmpi.layers.mlp import MODES


def test_enter_array_keeps_c_order_and_copies_only_when_asked():
    a = np.arange(12.0).reshape(3, 4)
    assert enter_array(np, a) is a  # C-ordered: no copy
    for odd in (np.asfortranarray(a), a[:, ::2], a.T, a[::2]):
        out = enter_array(np, odd)
        assert out.flags.c_contiguous and np.array_equal(out, odd)
    kept = enter_array(np, a, keep=True)
    assert kept is not a and np.array_equal(kept, a) and kept.flags.c_contiguous
    again = enter_array(np, a + 1, kept, keep=True)
    assert again is kept and np.array_equal(kept, a + 1)  # reused: same shape and dtype
    other = enter_array(np, a[:2], kept, keep=True)
    assert other is not kept and other.shape == (2, 4)


def layouts(a, odd):
    """``a`` as a Fortran-ordered array and as a strided view, the last rank's only (``odd``)
    or every rank's."""
    big = np.zeros((2 * a.shape[0], a.shape[1]), dtype=a.dtype)
    big[::2] = a
    strided = big[::2]
    assert strided.flags.c_contiguous == (a.shape[0] < 2 or a.shape[1] == 0)
    return {"fortran": np.asfortranarray(a), "strided": strided,
            "fortran on one rank": np.asfortranarray(a) if odd else a,
            "strided on one rank": strided if odd else a}


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,d,h", [(7, 3, 5), (2, 4, 6)])
def test_every_input_layout_gives_the_reference(world, grids, mode, m, d, h):
    X, W1, b1, W2, b2, dY = mlp_problem(m, d, h, "float64", seed=8)
    Y, dX, dW1, db1, dW2, db2 = mlp_reference(X, W1, b1, W2, b2, dY)
    odd = world.comm.Get_rank() == world.size - 1
    shapes = factorisations(world.size) if mode == "tile2d" else [(1, world.size)]
    tol = MLP_TOL["float64"]
    for grid in grids(shapes):
        lay = tpmpi.ParallelMLP.layouts_for(mode=mode).x
        x, dy = tpmpi.scatter(X, grid, lay), tpmpi.scatter(dY, grid, lay)
        for (name, xin), (_, dyin) in zip(layouts(x, odd).items(), layouts(dy, odd).items()):
            mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode=mode)
            y = mlp(xin)
            assert rel_err(y, tpmpi.scatter(Y, grid, lay)) <= tol, name
            assert rel_err(mlp.backward(dyin), tpmpi.scatter(dX, grid, lay)) <= tol, name
            for layer, dW, db in ((mlp.fc1, dW1, db1), (mlp.fc2, dW2, db2)):
                assert rel_err(layer.grad_weight, dW[layer.shard]) <= tol, (name, mode)
                assert rel_err(layer.grad_bias, db[layer.bias_slice]) <= tol, (name, mode)


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cls,options", [
    (tpmpi.ColumnParallelLinear, {}), (tpmpi.ColumnParallelLinear, {"sequence_parallel": True}),
    (tpmpi.RowParallelLinear, {}), (tpmpi.RowParallelLinear, {"sequence_parallel": True}),
    (tpmpi.TileParallelLinear, {}), (tpmpi.TileParallelLinear, {"panel": 2})])
def test_a_refilled_input_buffer_does_not_change_the_gradients(world, grid, cls, options):
    """A data loader refills x's buffer between forward and backward: dW is the forward
    input's (the layer keeps its own copy), with Fortran-ordered inputs too."""
    X, W, b, dY = linear_problem(7, 5, 3, seed=2)
    layer = cls.from_dense(W, b, grid=grid, **options)
    lay_x = "tiles" if cls is tpmpi.TileParallelLinear else layer.layouts.x
    lay_y = "tiles" if cls is tpmpi.TileParallelLinear else layer.layouts.y
    for order in ("C", "F"):
        buffer = np.array(tpmpi.scatter(X, grid, lay_x), order=order)
        y = layer(buffer)
        assert rel_err(y, tpmpi.scatter(X @ W + b, grid, lay_y)) <= 1e-12
        buffer[...] = 1e3  # the next batch
        layer.zero_grad()
        layer.backward(np.array(tpmpi.scatter(dY, grid, lay_y), order=order))
        assert rel_err(layer.grad_weight, (X.T @ dY)[layer.shard]) <= 1e-12, order


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.world_sizes(2, 4)
def test_data_parallel_sequence_mlp_takes_fortran_and_strided_inputs(world):
    X, W1, b1, W2, b2, dY = mlp_problem(8, 4, 6, "float64", seed=5)
    odd = world.comm.Get_rank() == world.size - 1
    with tpmpi.Mesh(world.comm, dp=2) as mesh:
        rows = slice(4 * mesh.dp_rank, 4 * mesh.dp_rank + 4)
        Y, dX, dW1, *_ = mlp_reference(X[rows], W1, b1, W2, b2, dY[rows])
        dW1 = sum(mlp_reference(X[r:r + 4], W1, b1, W2, b2, dY[r:r + 4])[2]
                  for r in (0, 4)) / 2
        mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=mesh.tp, mode="sequence")
        model = tpmpi.DataParallel(mlp, mesh)
        x, dy = (tpmpi.scatter(a[rows], mesh.tp, "rows") for a in (X, dY))
        for (name, xin), (_, dyin) in zip(layouts(x, odd).items(), layouts(dy, odd).items()):
            model.zero_grad()
            assert rel_err(model(xin), tpmpi.scatter(Y, mesh.tp, "rows")) <= 1e-12, name
            assert rel_err(model.backward(dyin), tpmpi.scatter(dX, mesh.tp, "rows")) <= 1e-12
            assert rel_err(mlp.fc1.grad_weight, dW1[mlp.fc1.shard]) <= 1e-12, name
