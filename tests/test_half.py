"""float16 and bfloat16 through every scheme on the CPU at world sizes 1-4, against the
float64 reference within tpmpi.core.dtypes.tolerance (the products: test_gemm.py, the
activations: test_activations.py, the collectives' sums: test_comm.py)."""
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

