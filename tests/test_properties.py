"""Property-based: the column layer against a serial float64 reference over random shapes
(zero sizes included), grids, dtypes and world sizes 1..size(COMM_WORLD).

Under MPI every rank draws the SAME examples (``derandomize=True``, no database, no shrinking)
and the verdict is reduced over COMM_WORLD before asserting, so all ranks pass or fail together.
"""
import numpy as np
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import tpmpi
from conftest import World, rel_err
from problems import LINEAR_TOL, linear_problem
from tpmpi.core.grid import factorisations

WORLD = MPI.COMM_WORLD
COLLECTIVE = settings(max_examples=20, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw):
    size = draw(st.integers(1, WORLD.Get_size()))
    return dict(size=size, grid=draw(st.sampled_from(factorisations(size))),
                m=draw(st.integers(0, 5)), k=draw(st.integers(0, 6)), n=draw(st.integers(0, 9)),
                dtype=draw(st.sampled_from(["float32", "float64"])), bias=draw(st.booleans()),
                gather_output=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def on_subworld(size: int, fn) -> float:
    """``fn(comm)`` on the first ``size`` ranks (0.0 elsewhere); the max over COMM_WORLD."""
    sub = World(size)
    value = 0.0
    if sub.member:
        try:
            value = fn(sub.comm)
        finally:
            sub.free()
    return WORLD.allreduce(value, op=MPI.MAX)


def column_error(p: dict, comm) -> float:
    """Worst relative error / tolerance over y, dx, grad_weight, grad_bias, gathered W."""
    dtype = p["dtype"]
    X, W, b, dY = linear_problem(p["m"], p["k"], p["n"], dtype, p["seed"])
    R = {name: a.astype(np.float64) for name, a in dict(X=X, W=W, b=b, dY=dY).items()}
    with tpmpi.ProcessGrid(comm, shape=p["grid"]) as grid:
        layer = tpmpi.ColumnParallelLinear.from_dense(W, b if p["bias"] else None, grid=grid,
                                                      gather_output=p["gather_output"])
        cols = layer.shard[1]
        Y = R["X"] @ R["W"] + (R["b"] if p["bias"] else 0)
        y = layer(X)
        dy = dY if p["gather_output"] else np.ascontiguousarray(dY[:, cols])
        errs = [rel_err(y, Y if p["gather_output"] else Y[:, cols]),
                rel_err(layer.backward(dy), R["dY"] @ R["W"].T),
                rel_err(layer.grad_weight, (R["X"].T @ R["dY"])[:, cols]),
                float(not np.array_equal(layer.gather_weight(), W))]
        if p["bias"]:
            errs.append(rel_err(layer.grad_bias, R["dY"].sum(0)[cols]))
        ok_types = y.dtype == np.dtype(dtype) and layer.grad_weight.dtype == np.dtype(dtype)
    return max(errs) / LINEAR_TOL[dtype] + (0.0 if ok_types else 1e9)


def _edge(size, grid, m, k, n):
    return dict(size=size, grid=grid, m=m, k=k, n=n, dtype="float32", bias=True,
                gather_output=True, seed=1)


@COLLECTIVE
@given(problems())
@example(_edge(1, (1, 1), 0, 3, 2))
@example(_edge(min(3, WORLD.Get_size()), (1, min(3, WORLD.Get_size())), 2, 0, 2))
@example(_edge(WORLD.Get_size(), (WORLD.Get_size(), 1), 3, 2, 1))
def test_column_matches_serial_reference(p):
    worst = on_subworld(p["size"], lambda comm: column_error(p, comm))
    assert worst <= 1.0, (p, worst)


@st.composite
def scheme_problems(draw):
    from tpmpi.studies.problem import TRANSFORMER
    from tpmpi.studies.schemes import REGISTRY

    size = draw(st.integers(1, WORLD.Get_size()))
    # the transformer schemes take their own shapes: tests/test_schemes_transformer.py
    scheme = draw(st.sampled_from(sorted(set(REGISTRY) - set(TRANSFORMER))))
    k = draw(st.integers(0, 6))
    options = {}
    if scheme == "tile2d":
        options["panel"] = draw(st.one_of(st.none(), st.integers(1, 7)))
    if scheme == "column":
        options["chunks"] = draw(st.integers(1, 3))
    if scheme == "mlp":
        options["mode"] = draw(st.sampled_from(["megatron", "book"]))
        options["activation"] = draw(st.sampled_from(["gelu", "gelu_erf", "relu"]))
    return dict(size=size, grid=draw(st.sampled_from(factorisations(size))), scheme=scheme,
                m=draw(st.integers(0, 5)), k=k,
                n=k if scheme == "mlp" else draw(st.integers(0, 9)),
                hidden=draw(st.integers(0, 9)), dtype=draw(st.sampled_from(["float32", "float64"])),
                options=tuple(sorted((a, v) for a, v in options.items() if v is not None)))


def scheme_error(p: dict, comm) -> float:
    """Max relative error / tolerance of every output and gradient of the scheme's layer(s)."""
    from tpmpi.core.backend import get_backend
    from tpmpi.core.dtypes import tolerance
    from tpmpi.studies.schemes import Problem, build

    problem = Problem(scheme=p["scheme"], m=p["m"], k=p["k"], n=p["n"], hidden=p["hidden"],
                      dtype=p["dtype"], backward=True, options=p["options"])
    with tpmpi.ProcessGrid(comm, shape=p["grid"]) as grid:
        return build(problem, grid, get_backend("numpy")).verify() / tolerance(
            p["dtype"], problem.longest_sum)


@COLLECTIVE
@given(scheme_problems())
def test_every_scheme_matches_serial_reference(p):
    worst = on_subworld(p["size"], lambda comm: scheme_error(p, comm))
    assert worst <= 1.0, (p, worst)
