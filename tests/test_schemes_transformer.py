"""Schemes attention, block and gpt (tpmpi/studies/schemes/transformer.py) at P = 1..4:
their check against the bare float64 code passes with and without sequence parallelism and
under a 2 x 2 mesh, and fails when a gradient is wrong (the check can fail)."""
import pytest

from tpmpi.core.backend import get_backend
from tpmpi.core.mesh import Mesh
from tpmpi.studies.problem import Problem
from tpmpi.studies.schemes.hybrid import build_case

SHAPE = dict(m=24, k=16, n=16, heads=4, kv_heads=2, seq=6, vocab=7, layers=2,
             dtype="float64", backward=True)


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", ["attention", "block", "gpt"])
@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_schemes_verify(grid, scheme, sp):
    p = Problem(scheme=scheme, options=(("sequence_parallel", sp),), **SHAPE)
    case = build_case(p, grid, get_backend("numpy"))
    case.forward()
    case.backward()
    assert case.verify() <= 1e-12


@pytest.mark.mpi
@pytest.mark.world_sizes(4)
@pytest.mark.parametrize("scheme", ["block", "gpt"])
def test_schemes_verify_on_a_mesh(world, scheme):
    mesh = Mesh(world.comm, dp=2)
    case = build_case(Problem(scheme=scheme, **SHAPE), mesh, get_backend("numpy"))
    assert case.verify() <= 1e-12


@pytest.mark.mpi
def test_a_wrong_gradient_fails_the_check(grid):
    case = build_case(Problem(scheme="block", **SHAPE), grid, get_backend("numpy"))
    ln = case.module.ln_2
    original = ln.backward

    def wrong(dy):
        dx = original(dy)
        ln.grad_weight *= 1.01
        return dx
    ln.backward = wrong
    assert case.verify() > 1e-3
