"""Same inputs, same grid -> bit-identical outputs and gradients, run to run (fresh grids,
layers and buffers); across grids results agree within the dtype tolerance only."""
import numpy as np
import pytest

import tpmpi
from conftest import rel_err
from tpmpi.core.grid import factorisations


def run(comm, shape, X, W, b, dY):
    with tpmpi.ProcessGrid(comm, shape=shape) as grid:
        layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid)
        y = layer(X)
        dx = layer.backward(dY)
        dx2 = layer.backward(dY)
        return y, dx, dx2, layer.gather_weight(), layer.grad_weight.copy(), layer.grad_bias.copy()


@pytest.mark.mpi
def test_bit_identical_run_to_run(world):
    rng = np.random.default_rng(7)
    X, W, b, dY = (rng.standard_normal(s).astype(np.float32)
                   for s in [(9, 13), (13, 11), (11,), (9, 11)])
    ref = (X.astype(np.float64) @ W + b, dY.astype(np.float64) @ W.T.astype(np.float64))
    for shape in factorisations(world.size):
        first, again = run(world.comm, shape, X, W, b, dY), run(world.comm, shape, X, W, b, dY)
        for a, c in zip(first, again):
            assert a.dtype == c.dtype and np.array_equal(a, c)
        assert np.array_equal(first[1], first[2])  # repeated backward: same dx
        assert rel_err(first[0], ref[0]) <= 2e-5 and rel_err(first[1], ref[1]) <= 2e-5
