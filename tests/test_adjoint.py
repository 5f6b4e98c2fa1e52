"""Dot-product (adjoint) tests in float64: ``<F x, y> = <x, F* y>``.

Spaces: a *replicated* array is one logical array (its inner product is counted once, computed
locally); a *distributed* array is one block per rank (inner product = sum over ranks). The
conjugate pairs used by the layers (Megatron's f/g and scatter/gather):

* Allreduce, partial sums -> replicated (row forward, column dX), adjoint: copy to every rank.
* Allgather of column blocks -> replicated (column forward, row dX), adjoint: keep own columns,
  which is the row layer's split of a replicated input (row forward), so one identity tests
  both the Allgather and the split.
Whole layers without bias are linear maps too: ``<L x, dy> = <x, L^T dy>`` with ``L^T`` their
backward.
"""
import numpy as np
import pytest

import tpmpi
from tpmpi.core.comm import allgather_blocks, allreduce, iallgather_blocks, iallreduce
from tpmpi.core.partition import block_partition

M, K = 5, 7


def dist_dot(comm, a, b) -> float:
    """Inner product of two distributed arrays (one block per rank)."""
    return comm.allreduce(float(np.vdot(a, b)))


def close(a, b) -> bool:
    return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


@pytest.mark.mpi
@pytest.mark.parametrize("blocking", [True, False])
def test_allreduce_is_adjoint_of_copy(world, blocking):
    comm = world.comm
    x = np.random.default_rng(10 + comm.Get_rank()).standard_normal((M, K))  # partial sums
    y = np.random.default_rng(99).standard_normal((M, K))  # replicated
    fx = x.copy()
    if blocking:
        allreduce(fx, comm)
    else:
        iallreduce(fx, comm).Wait()
    lhs = float(np.vdot(fx, y))  # replicated: counted once
    rhs = dist_dot(comm, x, y)  # copy of y to every rank
    assert close(lhs, rhs), (lhs, rhs)


@pytest.mark.mpi
@pytest.mark.parametrize("k", [K, 2, 0])
@pytest.mark.parametrize("blocking", [True, False])
def test_allgather_is_adjoint_of_split(world, k, blocking):
    """Allgather ``G`` of column blocks and the row layer's split ``S`` (own columns) satisfy
    ``<G x, y> = <x, S y>``; ``k < P`` gives empty blocks."""
    comm, rank = world.comm, world.comm.Get_rank()
    parts = block_partition(k, comm.Get_size())
    blocks = [((0, a), (M, b - a)) for a, b in parts]
    own = slice(*parts[rank])
    x = np.random.default_rng(20 + rank).standard_normal((M, own.stop - own.start))
    y = np.random.default_rng(7).standard_normal((M, k))  # replicated
    gx = np.empty((M, k))
    if blocking:
        allgather_blocks(x, gx, blocks, comm)
    else:
        iallgather_blocks(x, gx, blocks, comm).Wait()
    assert len({a.tobytes() for a in comm.allgather(gx)}) == 1  # result is replicated
    lhs = float(np.vdot(gx, y))
    rhs = dist_dot(comm, x, y[:, own])
    assert close(lhs, rhs), (lhs, rhs)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["row", "row_parallel_input", "column", "column_no_gather"])
@pytest.mark.parametrize("k,n", [(7, 5), (2, 3), (3, 2)])
def test_layers_backward_is_adjoint_of_forward(world, grid, kind, k, n):
    comm = world.comm
    options = {"row": dict(input_is_parallel=False), "row_parallel_input":
               dict(input_is_parallel=True), "column": dict(gather_output=True),
               "column_no_gather": dict(gather_output=False)}[kind]
    cls = tpmpi.RowParallelLinear if kind.startswith("row") else tpmpi.ColumnParallelLinear
    layer = cls(k, n, grid=grid, bias=False, dtype="float64", seed=3, **options)
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((M, k)), rng.standard_normal((M, n))  # replicated
    x_dist = kind == "row_parallel_input"
    y_dist = kind == "column_no_gather"
    if x_dist:
        x = np.ascontiguousarray(x[:, layer.shard[0]])
    if y_dist:
        dy = np.ascontiguousarray(dy[:, layer.shard[1]])
    y = layer(x)
    dx = layer.backward(dy)
    lhs = dist_dot(comm, y, dy) if y_dist else float(np.vdot(y, dy))
    rhs = dist_dot(comm, x, dx) if x_dist else float(np.vdot(x, dx))
    assert close(lhs, rhs), (lhs, rhs)
