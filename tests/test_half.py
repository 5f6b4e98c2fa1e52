"""float16 and bfloat16 through every scheme on the CPU at world sizes 1-4, against the
float64 reference within tpmpi.core.dtypes.tolerance (the products: test_gemm.py, the
activations: test_activations.py, the collectives' sums: test_comm.py)."""
import numpy as np
import pytest

import tpmpi
from problems import HALFS
from tpmpi.core.dtypes import tolerance
from tpmpi.studies.schemes import Problem, build


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", HALFS)
@pytest.mark.parametrize("scheme", ["column", "row", "mlp", "tile2d"])
@pytest.mark.parametrize("m,k,n", [(40, 24, 24), (7, 5, 3)])
def test_every_scheme_in_half_precision(world, grids, scheme, dtype, m, k, n):
    """Forward and backward of every scheme (tile2d on every grid, gather and panel forms)
    within the tolerance of the float64 reference."""
    if scheme == "mlp":
        n = k
    for grid in grids(None if scheme == "tile2d" else [(1, world.size)]):
        for options in ([(), (("panel", 2),)] if scheme == "tile2d" else [()]):
            p = Problem(scheme=scheme, m=m, k=k, n=n, hidden=3, dtype=dtype, backward=True,
                        options=options)
            err = build(p, grid, tpmpi.core.backend.get_backend("numpy")).verify()
            assert err <= tolerance(dtype, p.longest_sum), (grid.shape, options, err)
            assert err > 0  # really computed in half precision



def cancelling(m, k, n, seed=0):
    """float16 ``X (m, k), W (k, n), dY (m, n)`` whose products ``X W`` and ``dY W^T`` sum
    halves that cancel: every rank's partial sum over its share of K (or N) lies beyond
    float16's 65504, the whole sum within it (the second halves are the first ones times -0.9),
    and ``X^T dY`` is small."""
    rng = np.random.default_rng(seed)
    u = np.tile(rng.uniform(0.5, 1.0, (k // 2, n // 2)), (2, 2))
    w = 2000 * u * np.outer(np.repeat([1.0, -0.9], k // 2), np.repeat([1.0, -0.9], n // 2))
    x = 40 * np.tile(rng.uniform(0.5, 1.0, (m, k // 2)), (1, 2))
    dy = 40 * np.tile(rng.uniform(0.5, 1.0, (m, n // 2)), (1, 2))
    return x.astype(np.float16), w.astype(np.float16), dy.astype(np.float16)


@pytest.mark.mpi
@pytest.mark.parametrize("cls,options", [
    (tpmpi.RowParallelLinear, {}), (tpmpi.RowParallelLinear, {"sequence_parallel": True}),
    (tpmpi.ColumnParallelLinear, {}), (tpmpi.ColumnParallelLinear, {"sequence_parallel": True}),
    (tpmpi.TileParallelLinear, {}), (tpmpi.TileParallelLinear, {"panel": 1})])
def test_half_partial_sums_beyond_float16_are_reduced_in_float32(world, grids, cls, options):
    """Row forward, column dX and the SUMMA products: the ranks' float16 partial sums would be
    inf; reduced in float32 and rounded once, y and dX are the serial float16 product's
    (float32 accumulation, one rounding), within float16's rounding of the float64 sums."""
    X, W, dY = cancelling(6, 8, 8)
    Y, dX, dW = (a.astype(np.float64) @ b.astype(np.float64)
                 for a, b in ((X, W), (dY, W.T), (X.T, dY)))
    assert np.abs(X.astype(np.float32)[:, :4] @ W[:4].astype(np.float32)).max() > 65504
    assert max(np.abs(Y).max(), np.abs(dX).max(), np.abs(dW).max()) < 65504
    tile = cls is tpmpi.TileParallelLinear
    for grid in grids(None if tile else [(1, world.size)]):
        layer = cls.from_dense(W, grid=grid, **options)
        lay_x, lay_y = ("tiles", "tiles") if tile else (layer.layouts.x, layer.layouts.y)
        y = layer(tpmpi.scatter(X, grid, lay_x))
        dx = layer.backward(tpmpi.scatter(dY, grid, lay_y))
        for got, want, lay in ((y, Y, lay_y), (dx, dX, lay_x),
                               (layer.grad_weight, dW[layer.shard], None)):
            want = want if lay is None else tpmpi.scatter(want, grid, lay)
            assert got.dtype == np.float16 and np.isfinite(got).all(), (grid.shape, options)
            assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max(), (grid.shape, options)
