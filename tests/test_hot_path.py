"""What a layer call costs beyond its products.

* On one rank every layer is its local products: no MPI call, no stream sync, no host copy or
  pinned buffer (counted on a device backend without GPU-aware MPI, where a needless
  collective would stage through the host), and no allocation beyond its results.
* Without an attached profiler a layer reads no clock and synchronises the stream only where
  MPI needs finished device buffers; the benchmark's profiler adds its own syncs and timings.
"""
from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
from mpi4py import MPI

import tpmpi
from conftest import record_mpi_calls, rel_err
from fake_device import FakeDevice
from problems import mlp_reference
from tpmpi.core.backend import get_backend
from tpmpi.core.profiler import Profiler
from tpmpi.core.tap import NULL_TAP
from tpmpi.layers.module import attach_tap

NOT_COLLECTIVE = ("Get_", "Is_", "Free", "py2f")


LAYERS = {  # kind -> (constructor from (W, b, W2, b2, grid, backend), reference of y and dx)
    "column": lambda d, g, be: tpmpi.ColumnParallelLinear.from_dense(d[0], d[1], grid=g,
                                                                     backend=be),
    "column-cols": lambda d, g, be: tpmpi.ColumnParallelLinear.from_dense(
        d[0], d[1], grid=g, backend=be, gather_output=False),
    "column-chunks": lambda d, g, be: tpmpi.ColumnParallelLinear.from_dense(
        d[0], d[1], grid=g, backend=be, chunks=3),
    "row": lambda d, g, be: tpmpi.RowParallelLinear.from_dense(d[0], d[1], grid=g, backend=be),
    "row-parallel-input": lambda d, g, be: tpmpi.RowParallelLinear.from_dense(
        d[0], d[1], grid=g, backend=be, input_is_parallel=True),
    "tile2d": lambda d, g, be: tpmpi.TileParallelLinear.from_dense(d[0], d[1], grid=g,
                                                                   backend=be),
    "tile2d-panel": lambda d, g, be: tpmpi.TileParallelLinear.from_dense(d[0], d[1], grid=g,
                                                                         backend=be, panel=5),
    "mlp": lambda d, g, be: tpmpi.ParallelMLP.from_dense(*d, grid=g, backend=be),
    "mlp-book": lambda d, g, be: tpmpi.ParallelMLP.from_dense(*d, grid=g, backend=be,
                                                              mode="book"),
}


def dense(m: int = 200, k: int = 48, n: int = 40, seed: int = 0):
    """X (m, k), dY (m, n or k for the MLP), W (k, n), b (n,) and the MLP's W1, b1, W2, b2."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((m, k))
    W, b = rng.standard_normal((k, n)), rng.standard_normal(n)
    W1, b1, W2, b2 = (rng.standard_normal(s) for s in [(k, n), (n,), (n, k), (k,)])
    return X, W, b, (W1, b1, W2, b2)


def reference(kind: str, X, W, b, mlp, dY):
    """Y and dX of the layer ``kind`` (the MLP's activation: gelu)."""
    if kind.startswith("mlp"):
        return mlp_reference(X, *mlp, dY)[:2]
    return X @ W + b, dY @ W.T


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_one_rank_exchanges_nothing(kind):
    """P=1 on a device backend that would stage every collective through the host: zero MPI
    calls, zero stream syncs, zero host copies and pinned buffers, right results."""
    X, W, b, mlp = dense()
    dev = FakeDevice()
    grid = tpmpi.ProcessGrid(MPI.COMM_SELF)
    layer = LAYERS[kind]((W, b) if not kind.startswith("mlp") else mlp, grid, dev)
    assert (layer.fc1 if kind.startswith("mlp") else layer).staging.staged
    dY = np.random.default_rng(1).standard_normal((X.shape[0], X.shape[1] if
                                                   kind.startswith("mlp") else W.shape[1]))
    log: list = []
    record_mpi_calls(layer, log)
    dev.counts.clear()
    for _ in range(2):
        y = layer(X)
        dx = layer.backward(dY)
    assert [name for name, *_ in log if not name.startswith(NOT_COLLECTIVE)] == []
    assert dict(dev.counts) == {}
    y_ref, dx_ref = reference(kind, X, W, b, mlp, dY)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(dx, dx_ref) <= 1e-12
    grid.free()


@pytest.mark.parametrize("kind", ["column", "row", "tile2d"])
def test_one_rank_allocates_only_its_results(kind):
    """NumPy at P=1: forward allocates y alone; backward dX plus one dW-sized temporary (the
    product added into the accumulated gradient) and the db row: no staging buffer, gathered
    copy or packed workspace."""
    X, W, b, _ = dense(400, 96, 160)
    backend = get_backend("numpy")
    grid = tpmpi.ProcessGrid(MPI.COMM_SELF)
    layer = LAYERS[kind]((W, b), grid, backend)
    dY = np.random.default_rng(1).standard_normal((X.shape[0], W.shape[1]))
    layer(X), layer.backward(dY)  # first calls may cache buffers
    # NumPy's ufunc buffer (the bias add broadcasts) and Python objects; every array above is
    # larger than this
    slack = np.getbufsize() * X.itemsize + 4096
    assert slack < min(X.nbytes, dY.nbytes, layer.grad_weight.nbytes)
    with backend.memory_peak() as fwd:
        y = layer(X)
    with backend.memory_peak() as bwd:
        dx = layer.backward(dY)
    assert fwd["peak"] <= y.nbytes + slack, fwd
    assert bwd["peak"] <= dx.nbytes + layer.grad_weight.nbytes + layer.grad_bias.nbytes + slack
    grid.free()


def _sync_sites(dev: FakeDevice) -> collections.Counter:
    """Replace ``dev.synchronize`` by one that counts its callers' ``file:function``."""
    sites: collections.Counter = collections.Counter()
    plain = dev.synchronize

    def synchronize() -> None:
        caller = sys._getframe(1)
        sites[f"{caller.f_code.co_filename.rsplit('/', 1)[-1]}:{caller.f_code.co_name}"] += 1
        plain()
    dev.synchronize = synchronize
    return sites


# Where a layer may synchronise the stream: the collectives and host-staging modules (before
# MPI reads or writes a buffer) and the operators' non-blocking collectives (right before one
# is posted).
MPI_MODULES = ("comm.py:", "staging.py:")
MPI_SITES = {"mappings.py:_start"}


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["column", "row", "tile2d", "mlp", "column-chunks"])
@pytest.mark.parametrize("gpu_aware", [False, True], ids=["staged", "direct"])
def test_syncs_only_where_mpi_needs_them(world, kind, gpu_aware):
    """No profiler: every stream sync comes from handing buffers to MPI, none from timing, none
    at all without a collective; the attached profiler adds its own."""
    X, W, b, mlp = dense(seed=world.size)
    dev = FakeDevice()
    grid = tpmpi.ProcessGrid(world.comm, shape=(2, world.size // 2)
                             if kind == "tile2d" and world.size % 2 == 0 else None)
    layer = LAYERS[kind]((W, b) if kind != "mlp" else mlp, grid, dev)
    subs = [layer.fc1, layer.fc2] if kind == "mlp" else [layer]
    for sub in subs:
        sub.staging.staged = not gpu_aware  # the decision a GPU-aware library would give
    x = tpmpi.scatter(X, grid, "tiles" if kind == "tile2d" else "replicated")
    dY = np.ones((x.shape[0], x.shape[1] if kind == "mlp" else
                  tpmpi.core.layout.local_shape((X.shape[0], W.shape[1]), grid,
                                           "tiles" if kind == "tile2d" else "replicated")[1]))
    sites = _sync_sites(subs[0].backend)  # the layers' view of dev

    def step() -> int:
        sites.clear()
        layer(x), layer.backward(dY)
        return sum(sites.values())

    prof = attach_tap(layer, Profiler.for_backend(subs[0].backend))
    with_profiler = step()
    collectives = sum(prof.calls.values())
    assert sites["profiler.py:_now"] > 0 and prof.gemm_s > 0
    attach_tap(layer, NULL_TAP)
    without = step()
    assert {site for site in sites if not site.startswith(MPI_MODULES)} <= MPI_SITES, sites
    assert without < with_profiler and (without > 0) == (collectives > 0)
    if world.size == 1:
        assert without == 0
    grid.free()


class CublasLikeXp:
    """NumPy, except that ``matmul`` records operands cuBLAS (through CuPy) could not take
    without a copy: neither C- nor F-contiguous."""

    def __init__(self) -> None:
        self.strided: list = []

    def __getattr__(self, name: str):
        return getattr(np, name)

    def matmul(self, a, b, out=None):
        self.strided += [x.shape for x in (a, b)
                         if not (x.flags.c_contiguous or x.flags.f_contiguous)]
        return np.matmul(a, b, out=out)


@pytest.mark.mpi
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gemm_operands_are_contiguous_on_a_gpu(world, kind):
    """On a CuPy-like backend every GEMM operand is C- or F-contiguous (CuPy would copy a
    strided one for each product): column blocks of x and dY are made contiguous once."""
    from tpmpi.core.backend import CupyBackend

    class CupyLike(FakeDevice):
        operand = CupyBackend.operand

    X, W, b, mlp = dense(40, 12, 10, seed=world.size)
    dev = CupyLike()
    dev.xp = CublasLikeXp()
    tiles = kind.startswith("tile2d")
    grid = tpmpi.ProcessGrid(world.comm, shape=(2, world.size // 2)
                             if tiles and world.size % 2 == 0 else None)
    layer = LAYERS[kind]((W, b) if not kind.startswith("mlp") else mlp, grid, dev)
    x = tpmpi.scatter(X, grid, "tiles" if tiles else "replicated")
    if kind == "row-parallel-input":
        x = np.ascontiguousarray(X[:, layer.shard[0]])
    y = layer(x)
    layer.backward(np.ones_like(y))
    assert dev.xp.strided == []
    grid.free()
