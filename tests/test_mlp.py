"""ParallelMLP (modes megatron and book) and the activations against float64 references."""
import math

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, assert_input_errors, profiled_calls, rel_err
from tpmpi.layers.activations import ACTIVATIONS, erf, get_activation

# (M, d_model, d_hidden): even, uneven, d_hidden < P (empty fc1 shards), d_model < P, M = 0
SHAPES = [(6, 4, 8), (5, 3, 7), (3, 4, 2), (4, 2, 5), (0, 3, 4)]


def reference(X, W1, b1, W2, b2, dY, activation):
    """Serial float64 forward and backward: Y, dX, dW1, db1, dW2, db2."""
    f, df = get_activation(activation)
    X, W1, b1, W2, b2, dY = (a.astype(np.float64) for a in (X, W1, b1, W2, b2, dY))
    pre = X @ W1 + b1
    h = f(pre)
    Y = h @ W2 + b2
    dpre = (dY @ W2.T) * df(pre)
    return Y, dpre @ W1.T, X.T @ dpre, dpre.sum(0), h.T @ dY, dY.sum(0)


def problem(m, d, h, dtype, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in [(m, d), (d, h), (h,), (h, d), (d,), (m, d)]]
    return [a.astype(dtype) for a in arrays]


def tol(dtype):
    return 1e-12 if dtype == "float64" else 5e-5


# ---------------------------------------------------------------- activations (serial)


def test_erf_is_exact():
    x = np.linspace(-6, 6, 1001)
    assert np.array_equal(erf(x), np.array([math.erf(v) for v in x]))
    assert erf(x.astype(np.float32)).dtype == np.float32
    assert erf(np.empty((0, 3))).shape == (0, 3)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives(name):
    f, df = get_activation(name)
    x = np.linspace(-4, 4, 801) + 1e-3  # avoid relu's kink at 0
    eps = 1e-6
    numeric = (f(x + eps) - f(x - eps)) / (2 * eps)
    assert np.abs(df(x) - numeric).max() < 1e-7
    x32 = x.astype(np.float32)
    assert f(x32).dtype == np.float32 and df(x32).dtype == np.float32


def test_gelu_values():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    exact = x * 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    assert np.allclose(get_activation("gelu_erf")[0](x), exact, rtol=0, atol=1e-15)
    assert np.abs(get_activation("gelu")[0](x) - exact).max() < 1e-3  # tanh approximation
    assert np.array_equal(get_activation("relu")[0](x), np.maximum(x, 0))
    with pytest.raises(ValueError, match="activation='swish': expected one of gelu"):
        get_activation("swish")


# ---------------------------------------------------------------- the MLP (MPI)


@pytest.mark.mpi
@pytest.mark.parametrize("m,d,h", SHAPES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mode", ["megatron", "book"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_backward_match_serial(world, m, d, h, dtype, mode, activation):
    if not world.member:
        return
    X, W1, b1, W2, b2, dY = problem(m, d, h, dtype)
    grid = tpmpi.ProcessGrid(world.comm)
    mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode=mode,
                                       activation=activation)
    Y, dX, dW1, db1, dW2, db2 = reference(X, W1, b1, W2, b2, dY, activation)
    y = mlp(X)
    assert y.dtype == np.dtype(dtype) and y.shape == (m, d)
    assert rel_err(y, Y) <= tol(dtype)
    for _ in range(2):  # gradients accumulate
        dx = mlp.backward(dY)
        assert dx.shape == (m, d) and rel_err(dx, dX) <= tol(dtype)
    r1, c1 = mlp.fc1.shard
    r2, c2 = mlp.fc2.shard
    assert rel_err(mlp.fc1.grad_weight, 2 * dW1[r1, c1]) <= tol(dtype)
    assert rel_err(mlp.fc1.grad_bias, 2 * db1[mlp.fc1.bias_slice]) <= tol(dtype)
    assert rel_err(mlp.fc2.grad_weight, 2 * dW2[r2, c2]) <= tol(dtype)
    assert rel_err(mlp.fc2.grad_bias, 2 * db2[mlp.fc2.bias_slice]) <= tol(dtype)
    names = [name for name, _, _ in mlp.parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert np.array_equal(mlp.fc1.gather_weight(), W1)
    assert np.array_equal(mlp.fc2.gather_weight(), W2)
    mlp.zero_grad()
    assert not any(g.any() for _, _, g in mlp.parameters())
    grid.free()


@pytest.mark.mpi
@pytest.mark.parametrize("mode,forward,backward", [
    ("megatron", {"allreduce": 1}, {"allreduce": 1}),
    ("book", {"allgather": 2}, {"allreduce": 2}),
])
def test_collectives_per_pass(world, mode, forward, backward):
    """Megatron: exactly one Allreduce forward and one backward."""
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    X, W1, b1, W2, b2, dY = problem(4, 3, 8, "float64")
    mlp = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, mode=mode)
    def calls():
        return profiled_calls((mlp.fc1, mlp.fc2))

    one = grid.size == 1
    mlp(X)
    assert calls() == ({} if one else forward)
    mlp.backward(dY)
    assert calls() == ({} if one else backward)
    grid.free()


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["megatron", "book"])
def test_seeded_init_is_layout_invariant(world, mode):
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    mlp = tpmpi.ParallelMLP(5, 9, grid=grid, seed=11, dtype="float64", mode=mode)
    assert np.array_equal(mlp.fc1.gather_weight(), tpmpi.init_weight((5, 9), 11, "float64"))
    assert np.array_equal(mlp.fc2.gather_weight(), tpmpi.init_weight((9, 5), 12, "float64"))
    assert np.array_equal(mlp.fc2.gather_bias(), tpmpi.init_weight(
        (5,), 12, "float64", stream=1, bound=1 / 3))
    grid.free()


@pytest.mark.mpi
def test_errors_are_raised_on_every_rank(world):
    if not world.member:
        return
    comm, rank = world.comm, world.comm.Get_rank()
    grid = tpmpi.ProcessGrid(comm)
    X, W1, b1, W2, b2, dY = problem(4, 3, 6, "float32")
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
    grid.free()
