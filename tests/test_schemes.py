"""Every registered scheme runs, verifies and reports through the benchmark path (the
transformer schemes at a shape of their own)."""
import pytest

from tpmpi.core.backend import get_backend
from tpmpi.studies.bench import run_case
from tpmpi.studies.problem import TRANSFORMER
from tpmpi.studies.schemes import KNOWN, REGISTRY, Problem, available, build

SHAPES = [(5, 6, 6, 7), (3, 4, 4, 2), (0, 3, 3, 5), (2, 1, 1, 1)]  # m, k, n, hidden
MODEL = dict(m=6, k=4, n=4, heads=2, kv_heads=1, seq=3, vocab=5, layers=1)


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", sorted(set(REGISTRY) - set(TRANSFORMER)))
@pytest.mark.parametrize("shape", SHAPES)
def test_scheme_verifies_forward_and_backward(world, grids, scheme, shape):
    m, k, n, hidden = shape
    for grid in grids():
        problem = Problem(scheme=scheme, m=m, k=k, n=n, hidden=hidden, dtype="float64",
                          backward=True)
        rec = run_case(problem, grid, get_backend("numpy"), warmup=1, iters=2)
        assert rec["max_rel_err"] <= 1e-10, (grid.shape, rec["max_rel_err"])
        assert rec["grid"] == grid.label and rec["ranks"] == world.size


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", TRANSFORMER)
def test_transformer_scheme_reports_through_the_benchmark_path(grid, scheme):
    problem = Problem(scheme=scheme, dtype="float64", backward=True, **MODEL)
    rec = run_case(problem, grid, get_backend("numpy"), warmup=0, iters=1)
    assert rec["max_rel_err"] <= 1e-10
    assert rec["model"]["kv_heads"] == 1 and rec["mfu"] > 0 and rec["predicted_s"] > 0
    assert set(rec["split"]) == {"predicted", "measured"}


def test_unavailable_scheme_message():
    with pytest.raises(ValueError, match="available: " + ", ".join(available())):
        build(Problem(scheme="nope"), None, get_backend("numpy"))
    assert set(available()) <= set(KNOWN)
