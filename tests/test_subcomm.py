"""Layers on any sub-communicators, in any order per rank, never hang.

The backend is created by the first layer each rank builds (never beforehand), on CuPy where a
GPU exists and on a NumPy-made stand-in of CuPy (tests/fake_cupy.py) everywhere, which runs the
real CuPy code path: GPU binding, per-communicator GPU-aware decision, host staging. The orders
differ per rank, so a collective that one rank entered alone (e.g. inside the GPU binding on its
first 2-rank layer) would hang the job (pytest-timeout ends it).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from mpi4py import MPI

import fake_cupy
import tpmpi
from conftest import all_ranks_raise, rel_err
from problems import mlp_reference
from tpmpi.core import backend as backend_mod
from tpmpi.core import devices, gpubind

# Groups of COMM_WORLD ranks in one global order; each rank builds a layer on each group it is
# in, in this order, so the orders differ per rank (rank 0: {0}, {0,1}, all; rank 1: {0,1},
# {1,2,3}, all; rank 2: {1,2,3}, {2,3}, all; rank 3: {3}, {1,2,3}, {2,3}, all) without a
# cycle. Nested: {0} < {0,1} < all, {2,3} < {1,2,3}; overlapping: {0,1} and {1,2,3}.
GROUPS = [((0,), "column"), ((3,), "row"), ((0, 1), "row"), ((1, 2, 3), "mlp"),
          ((2, 3), "tile2d"), ((0, 1, 2, 3), "tile2d")]


def _scenario_backends() -> list:
    params = ["fake-staged", "fake-direct"]
    real = gpubind.cupy_usable()
    return params + [pytest.param("cupy", marks=pytest.mark.gpu) if real else
                     pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skip(
                         reason="CuPy or a CUDA device is missing")])]


def _prepare(kind: str, monkeypatch):
    """Install the backend under test so that nothing of it exists yet; returns the fake CuPy
    (None for the real one)."""
    monkeypatch.setenv("TPMPI_GPU_AWARE", "1" if kind == "fake-direct" else "0")
    if kind == "cupy":
        monkeypatch.setattr(backend_mod, "_CACHE", {})
        return None
    return fake_cupy.install(monkeypatch, devices=2)


def check_layer(kind: str, comm: MPI.Comm, backend: str = "cupy", seed: int = 0) -> None:
    """Build a ``kind`` layer on ``comm`` with ``backend`` and compare forward, dX and every
    gradient with a float64 reference (5 x 7 -> 6; tile2d on a 2 x (P/2) or 1 x 1 grid)."""
    rng = np.random.default_rng(seed)
    m, k, n, h = 5, 7, 6, 9
    X, dY = rng.standard_normal((m, k)), rng.standard_normal((m, n if kind != "mlp" else k))
    W, b = rng.standard_normal((k, n)), rng.standard_normal(n)
    if kind == "mlp":
        W1, b1, W2, b2 = (rng.standard_normal(s) for s in [(k, h), (h,), (h, k), (k,)])
        grid = tpmpi.ProcessGrid(comm)
        layer = tpmpi.ParallelMLP.from_dense(W1, b1, W2, b2, grid=grid, backend=backend,
                                             activation="relu")
        Y, dX, dW1, db1, dW2, db2 = mlp_reference(X, W1, b1, W2, b2, dY, "relu")
        want = {"y": Y, "dx": dX}
        grads = [(layer.fc1, dW1, db1), (layer.fc2, dW2, db2)]
        be = layer.fc1.backend
    else:
        p = comm.Get_size()
        shape = (2, p // 2) if kind == "tile2d" and p % 2 == 0 else (1, p)
        grid = tpmpi.ProcessGrid(comm, shape=shape)
        cls = {"column": tpmpi.ColumnParallelLinear, "row": tpmpi.RowParallelLinear,
               "tile2d": tpmpi.TileParallelLinear}[kind]
        layer = cls.from_dense(W, b, grid=grid, backend=backend)
        want = {"y": X @ W + b, "dx": dY @ W.T}
        grads = [(layer, X.T @ dY, dY.sum(0))]
        be = layer.backend
    layout = "tiles" if kind == "tile2d" else "replicated"
    x = be.asarray(tpmpi.scatter(X, grid, layout))
    y = layer(x)
    dx = layer.backward(be.asarray(tpmpi.scatter(dY, grid, layout)))
    for name, got in (("y", y), ("dx", dx)):
        got = tpmpi.gather(be.to_host(got), grid, layout, want[name].shape)
        assert rel_err(got, want[name]) <= 1e-12, (kind, name)
    for sub, gw, gb in grads:
        assert rel_err(be.to_host(sub.grad_weight), gw[sub.shard]) <= 1e-12, kind
        assert rel_err(be.to_host(sub.grad_bias), gb[sub.bias_slice]) <= 1e-12, kind
    grid.free()


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", _scenario_backends())
def test_layers_on_nested_and_overlapping_subcomms(kind, monkeypatch):
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    fake = _prepare(kind, monkeypatch)
    groups = [(g, layer) for g, layer in GROUPS if max(g) < size]
    comms = [world.Split(0 if rank in g else MPI.UNDEFINED, rank) for g, _ in groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ranks sharing a (fake) GPU
        for (_, layer_kind), comm in zip(groups, comms):
            if comm != MPI.COMM_NULL:
                check_layer(layer_kind, comm)
                comm.Free()
    if fake is not None:  # bound once per process, to the node-local rank's device
        local = gpubind.local_rank()
        assert fake.counts["use"] == 1
        assert fake.current == (local[1] % 2 if local else 0)
    world.Barrier()


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_gpu_aware_decided_and_cached_per_communicator(monkeypatch):
    """{0, 1} decides GPU-aware, {1, 2} (rank 2's library lacks support) staging: rank 1
    holds both; a second layer on a communicator reuses its decision; a new one decides."""
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size < 3:
        pytest.skip("needs 3 ranks")
    fake_cupy.install(monkeypatch)
    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    monkeypatch.setattr(devices, "_library_cuda_support", lambda: rank != 2)
    monkeypatch.setattr(devices, "_device_allreduce_ok", lambda comm, be: True)
    probes = []
    real_probe = devices.probe_gpu_aware
    monkeypatch.setattr(devices, "probe_gpu_aware",
                        lambda comm, be: probes.append(comm.Get_size()) or real_probe(comm, be))
    a = world.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    b = world.Split(0 if rank in (1, 2) else MPI.UNDEFINED, rank)
    layers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, comm in (("a", a), ("b", b)):
            if comm != MPI.COMM_NULL:
                grid = tpmpi.ProcessGrid(comm)
                layers[name] = [tpmpi.ColumnParallelLinear(4, 4, grid=grid, backend="cupy")
                                for _ in range(2)]
                x = layers[name][0].backend.asarray(np.ones((3, 4), dtype=np.float32))
                for layer in layers[name]:
                    assert layer(x).shape == (3, 4)
    want = {"a": True, "b": False}
    for name, pair in layers.items():
        assert [lay.backend.gpu_aware for lay in pair] == [want[name]] * 2
        assert [lay.staging.staged for lay in pair] == [not want[name]] * 2
    # one decision per communicator (the grid's Cartesian communicator), not per layer
    assert probes == [2] * len(layers)
    if rank == 1:
        assert layers["a"][0].backend.xp is layers["b"][0].backend.xp
    for comm in (a, b):
        if comm != MPI.COMM_NULL:
            comm.Free()
    world.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("env,match", [
    ("foo", "TPMPI_BACKEND='foo': expected numpy or cupy"),
    ("cupy", "backend='cupy': CuPy is not installed or no CUDA device is visible"),
])
def test_backend_env_differing_on_one_rank_raises_everywhere(world, grid, monkeypatch, env, match):
    if env == "cupy" and gpubind.cupy_usable():
        pytest.skip("a GPU is present: TPMPI_BACKEND=cupy is valid here")
    comm = world.comm
    if comm.Get_rank() == comm.Get_size() - 1:
        monkeypatch.setenv("TPMPI_BACKEND", env)
    msg = all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(4, 4, grid=grid), match)
    assert msg.endswith(f"(rank {comm.Get_size() - 1})") or comm.Get_size() == 1


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_backend_choices_differing_raise_everywhere(world, grid, monkeypatch):
    """One rank resolves "auto" to CuPy (a fake GPU there), the others to NumPy."""
    comm = world.comm
    if comm.Get_rank() == 0:
        fake_cupy.install(monkeypatch)
        monkeypatch.setenv("TPMPI_BACKEND", "cupy")
    all_ranks_raise(comm, lambda: tpmpi.RowParallelLinear(4, 4, grid=grid),
                    "backend differs across ranks: 'cupy' on rank 0 and 'numpy' on ranks? 1")


@pytest.mark.mpi
def test_bad_gpu_aware_env_on_one_rank_raises_everywhere(world, grid, monkeypatch):
    comm = world.comm
    fake_cupy.install(monkeypatch)
    if comm.Get_rank() == 0:
        monkeypatch.setenv("TPMPI_GPU_AWARE", "yes")
    all_ranks_raise(comm, lambda: tpmpi.ColumnParallelLinear(4, 4, grid=grid, backend="cupy"),
                    "TPMPI_GPU_AWARE='yes': expected 0 or 1")


def test_cupy_backend_is_created_once_per_process_without_mpi(monkeypatch):
    fake = fake_cupy.install(monkeypatch)
    first = backend_mod.get_backend("cupy")
    assert backend_mod.get_backend("cupy") is first and fake.counts["use"] == 1
    assert first.gpu_aware is False and first.device_key() == "0000:01:00.0"
    view = first.with_gpu_aware(True)
    assert view.gpu_aware and view.xp is first.xp and first.with_gpu_aware(True) is view
    assert view.with_gpu_aware(False) is first


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_ranks_sharing_a_device_are_counted_and_warned_once(world, grid, monkeypatch):
    fake_cupy.install(monkeypatch, devices=1)
    monkeypatch.setattr(devices, "_SHARING_WARNED", [])
    comm = world.comm
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = [tpmpi.ColumnParallelLinear(4, 4, grid=grid, backend="cupy") for _ in range(2)]
        other = comm.Dup()  # a new communicator decides afresh, but warns no more
        facts = devices.device_facts(other, layers[0].backend)
    shared = [w for w in caught if "share 1 GPU(s)" in str(w.message)]
    assert len(shared) == (1 if comm.Get_rank() == 0 else 0)
    assert facts.ranks_per_device == world.size
    assert devices.device_facts(grid.comm, layers[0].backend).ranks_per_device == world.size
    other.Free()
