"""ParallelMLP (modes megatron and book) against the serial float64 reference at world sizes
1-4 (the activations alone: test_activations.py; mode sequence: test_sequence.py)."""
import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, assert_input_errors, counting, profiled_calls, rel_err
from problems import MLP_TOL, mlp_problem, mlp_reference
from tpmpi.layers.activations import ACTIVATIONS

# (M, d_model, d_hidden): even, uneven, d_hidden < P (empty fc1 shards), d_model < P, M = 0
SHAPES = [(6, 4, 8), (5, 3, 7), (3, 4, 2), (4, 2, 5), (0, 3, 4)]


@pytest.mark.mpi
@pytest.mark.parametrize("m,d,h", SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["megatron", "book"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_backward_match_serial(grid, m, d, h, dtype, mode, activation):
    X, W1, b1, W2, b2, dY = mlp_problem(m, d, h, dtype)
    tol = MLP_TOL[dtype]
    mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode=mode,
                                       activation=activation)
    Y, dX, dW1, db1, dW2, db2 = mlp_reference(X, W1, b1, W2, b2, dY, activation)
    y = mlp(X)
    assert y.dtype == np.dtype(dtype) and y.shape == (m, d)
    assert rel_err(y, Y) <= tol
    for _ in range(2):  # gradients accumulate
        dx = mlp.backward(dY)
        assert dx.shape == (m, d) and rel_err(dx, dX) <= tol
    r1, c1 = mlp.fc1.shard
    r2, c2 = mlp.fc2.shard
    assert rel_err(mlp.fc1.grad_weight, 2 * dW1[r1, c1]) <= tol
    assert rel_err(mlp.fc1.grad_bias, 2 * db1[mlp.fc1.bias_slice]) <= tol
    assert rel_err(mlp.fc2.grad_weight, 2 * dW2[r2, c2]) <= tol
    assert rel_err(mlp.fc2.grad_bias, 2 * db2[mlp.fc2.bias_slice]) <= tol
    names = [name for name, _, _ in mlp.parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert np.array_equal(mlp.fc1.gather_weight(), W1)
    assert np.array_equal(mlp.fc2.gather_weight(), W2)
    mlp.zero_grad()
    assert not any(g.any() for _, _, g in mlp.parameters())


@pytest.mark.mpi
@pytest.mark.parametrize("mode,forward,backward", [
    ("megatron", {"allreduce": 1}, {"allreduce": 1}),
    ("book", {"allgather": 2}, {"allreduce": 2}),
])
def test_collectives_per_pass(grid, mode, forward, backward):
    """Megatron: exactly one Allreduce forward and one backward."""
    X, W1, b1, W2, b2, dY = mlp_problem(4, 3, 8, "float64")
    mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode=mode)
    count = counting(mlp)

    def calls():
        return profiled_calls(count)

    one = grid.size == 1
    mlp(X)
    assert calls() == ({} if one else forward)
    mlp.backward(dY)
    assert calls() == ({} if one else backward)


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["megatron", "book"])
def test_seeded_init_is_layout_invariant(grid, mode):
    mlp = tpmpi.ParallelMLP(5, 9, grid=grid, seed=11, dtype="float64", mode=mode)
    assert np.array_equal(mlp.fc1.gather_weight(), tpmpi.init_weight((5, 9), 11, "float64"))
    assert np.array_equal(mlp.fc2.gather_weight(), tpmpi.init_weight((9, 5), 12, "float64"))
    assert np.array_equal(mlp.fc2.gather_bias(), tpmpi.init_weight(
        (5,), 12, "float64", stream=1, bound=1 / 3))


@pytest.mark.mpi
def test_errors_are_raised_on_every_rank(world, grid):
    comm, rank = world.comm, world.comm.Get_rank()
    X, W1, b1, W2, b2, dY = mlp_problem(4, 3, 6, "float32")
    all_ranks_raise(comm, lambda: tpmpi.ParallelMLP(3, 6, grid=grid, mode="2d"),
                    "mode='2d': expected one of megatron, book")
    all_ranks_raise(comm, lambda: tpmpi.ParallelMLP(3, 6, grid=grid, activation="tanh"),
                    "activation='tanh'")
    all_ranks_raise(comm, lambda: tpmpi.ParallelMLP.from_dense(W1, b1, W2, None, grid=grid),
                    "b1 and b2: pass both or neither")
    all_ranks_raise(comm, lambda: tpmpi.ParallelMLP.from_dense(W1, b1, W2[:5], b2, grid=grid),
                    r"W2.shape=\(5, 3\): expected \(6, 3\)")
    mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid)
    assert_input_errors(comm, mlp, X, dY)
    if comm.Get_size() > 1:
        all_ranks_raise(comm, lambda: tpmpi.ParallelMLP(
            3, 6, grid=grid, mode="book" if rank else "megatron"), "mode differs across ranks")
