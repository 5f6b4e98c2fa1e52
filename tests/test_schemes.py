"""Every registered scheme runs, verifies and reports through the benchmark path."""
import pytest

from tpmpi.core.backend import get_backend
from tpmpi.studies.bench import run_case
from tpmpi.studies.schemes import KNOWN, REGISTRY, Problem, available, build

SHAPES = [(5, 6, 6, 7), (3, 4, 4, 2), (0, 3, 3, 5), (2, 1, 1, 1)]  # m, k, n, hidden


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", sorted(REGISTRY))
@pytest.mark.parametrize("shape", SHAPES)
def test_scheme_verifies_forward_and_backward(world, grids, scheme, shape):
    m, k, n, hidden = shape
    for grid in grids():
        problem = Problem(scheme=scheme, m=m, k=k, n=n, hidden=hidden, dtype="float64",
                          backward=True)
        rec = run_case(problem, grid, get_backend("numpy"), warmup=1, iters=2)
        assert rec["max_rel_err"] <= 1e-10, (grid.shape, rec["max_rel_err"])
        assert rec["grid"] == grid.label and rec["ranks"] == world.size


def test_unavailable_scheme_message():
    with pytest.raises(ValueError, match="available: " + ", ".join(available())):
        build(Problem(scheme="nope"), None, get_backend("numpy"))
    assert set(available()) <= set(KNOWN)
