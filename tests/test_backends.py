"""The GPU path without a GPU, and every backend through the same correctness tests.

* ``xb`` (conftest): column layer forward/backward against a float64 reference on each backend
  ("numpy" always, "cupy" where CuPy and a device exist), world sizes 1-4.
* :class:`FakeDevice`: NumPy arrays posing as device arrays of a backend that is not GPU-aware,
  so the host-staging branch of :class:`tpmpi.comm.Staging` runs (and counts its copies and
  pinned allocations) on a CPU.
* float16 collectives (MPI's half type), bfloat16 (summed in float32) where ml_dtypes exists,
  the GPU-aware probe's decisions, tiling and peak helpers.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, strategies as st

import tpmpi
from conftest import rel_err
from tpmpi import backend as backend_mod
from tpmpi.backend import Backend
from tpmpi.comm import Staging, allgather_blocks, allreduce, iallreduce, reduction_dtype
from tpmpi.dtypes import tolerance
from tpmpi.peak import gemm_fraction, gemm_peak
from tpmpi.tiling import panel_workspace_bytes, round_size

try:
    import ml_dtypes  # noqa: F401
    HALFS = ["float16", "bfloat16"]
except ImportError:
    HALFS = ["float16", pytest.param("bfloat16", marks=pytest.mark.skip(
        reason="bfloat16 needs the ml_dtypes package (not installed)"))]


class FakeDevice(Backend):
    """A GPU backend without GPU-aware MPI whose "device" arrays are NumPy arrays. Pinned
    buffers start as NaN (a missed copy shows); every staging operation is counted."""

    is_gpu = True

    def __init__(self) -> None:
        super().__init__("fake-gpu", np)
        self.counts: collections.Counter = collections.Counter()

    def synchronize(self) -> None:
        self.counts["sync"] += 1

    def pinned_empty(self, shape, dtype):
        self.counts["pinned"] += 1
        return np.full(shape, np.nan, dtype=dtype)

    def copy_to_host(self, a, out) -> None:
        self.counts["to_host"] += 1
        super().copy_to_host(a, out)

    def copy_from_host(self, host, a) -> None:
        self.counts["from_host"] += 1
        super().copy_from_host(host, a)


def problem(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(m, k), (k, n), (n,), (m, n)]]


# --------------------------------------------------------------------------- every backend


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32", *HALFS])
@pytest.mark.parametrize("m,k,n", [(6, 5, 7), (3, 0, 4), (4, 2, 1)])
def test_column_matches_reference_on_backend(world, xb, dtype, m, k, n):
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    X, W, b, dY = problem(m, k, n, dtype)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid, backend=xb)
    X64, W64, b64, dY64 = (a.astype(np.float64) for a in (X, W, b, dY))
    cols, tol = layer.shard[1], tolerance(dtype)
    y = layer(xb.asarray(X))
    assert xb.owns(y) and y.dtype == np.dtype(dtype) and y.shape == (m, n)
    assert rel_err(xb.to_host(y), X64 @ W64 + b64) <= tol
    dx = layer.backward(xb.asarray(dY))
    assert rel_err(xb.to_host(dx), dY64 @ W64.T) <= tol
    assert rel_err(xb.to_host(layer.grad_weight), (X64.T @ dY64)[:, cols]) <= tol
    assert rel_err(xb.to_host(layer.grad_bias), dY64.sum(0)[cols]) <= tol
    grid.free()


def test_cupy_backend_request_is_clear_without_a_gpu():
    if backend_mod.cupy_usable():
        pytest.skip("a GPU is present: this checks the error without one")
    with pytest.raises(ValueError, match="CuPy is not installed or no CUDA device"):
        backend_mod.get_backend("cupy")


def test_auto_backend_follows_env(monkeypatch):
    monkeypatch.setenv("TPMPI_BACKEND", "numpy")
    assert backend_mod.get_backend("auto").name == "numpy"
    monkeypatch.setenv("TPMPI_BACKEND", "torch")
    with pytest.raises(ValueError, match="TPMPI_BACKEND='torch'"):
        backend_mod.get_backend("auto")


# --------------------------------------------------------------------------- host staging


def col_blocks(m, n, p):
    return [((0, start), (m, stop - start)) for start, stop in tpmpi.block_partition(n, p)]


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", *HALFS])
def test_allgather_blocks_through_staging_reuses_pinned_buffers(world, dtype):
    if not world.member:
        return
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    dev = FakeDevice()
    staging = Staging(dev)
    assert staging.staged
    full = np.arange(5 * 7, dtype=np.float64).reshape(5, 7).astype(dtype)
    blocks = col_blocks(5, 7, size)
    (_, c0), (_, width) = blocks[rank]
    for call in range(2):
        before = dev.counts.copy()
        out = np.zeros((5, 7), dtype=dtype)
        allgather_blocks(np.ascontiguousarray(full[:, c0:c0 + width]), out, blocks, comm, staging)
        assert np.array_equal(out.astype(np.float64), full.astype(np.float64))
        delta = dev.counts - before
        assert delta["to_host"] == 1 and delta["from_host"] == 1 and delta["sync"] >= 2
        assert delta["pinned"] == (2 if call == 0 else 0)  # send + recv buffers, then reused


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32", *HALFS])
@pytest.mark.parametrize("staged", [True, False], ids=["staged", "direct"])
def test_allreduce_sums_in_place(world, dtype, staged):
    if not world.member:
        return
    comm, rank, size = world.comm, world.comm.Get_rank(), world.size
    dev = FakeDevice()
    staging = Staging(dev) if staged else None
    want = sum(np.arange(6, dtype=np.float64) + r for r in range(size))
    for _ in range(2):
        a = (np.arange(6, dtype=np.float64) + rank).astype(dtype)
        assert allreduce(a, comm, staging) is a
        assert a.dtype == np.dtype(dtype) and np.array_equal(a.astype(np.float64), want)
    if staged and size > 1:
        # float32 sums of a bfloat16 array are staged as float32 buffers: still one each
        assert dev.counts["pinned"] == 1 and dev.counts["to_host"] == 2
    if not staged:
        a = (np.arange(6, dtype=np.float64) + rank).astype(dtype)
        iallreduce(a, comm).Wait()
        assert np.array_equal(a.astype(np.float64), want)


def test_reduction_dtype():
    assert reduction_dtype("float16") == np.float16  # MPICH/Open MPI half extension type
    assert reduction_dtype("float64") == np.float64
    if "bfloat16" in HALFS:
        assert reduction_dtype("bfloat16") == np.float32


@pytest.mark.mpi
@pytest.mark.parametrize("gather_output", [True, False])
def test_column_layer_through_staging(world, gather_output):
    if not world.member:
        return
    grid = tpmpi.ProcessGrid(world.comm)
    dev = FakeDevice()
    X, W, b, dY = problem(6, 5, 7, "float64", seed=4)
    layer = tpmpi.ColumnParallelLinear.from_dense(W, b, grid=grid, backend=dev,
                                                  gather_output=gather_output)
    assert layer.staging.staged
    cols = layer.shard[1]
    dy = dY if gather_output else np.ascontiguousarray(dY[:, cols])
    pinned = []
    for _ in range(2):
        y = layer(X)
        want = X @ W + b
        assert rel_err(y, want if gather_output else want[:, cols]) <= 1e-12
        assert rel_err(layer.backward(dy), dY @ W.T) <= 1e-12
        pinned.append(dev.counts["pinned"])
    assert pinned[0] == pinned[1]  # no new pinned buffer on the second step
    parallel = int(world.size > 1)  # one rank: no gather (the product is the output)
    staged_calls = (int(gather_output) + 1) * parallel  # gather; dX allreduce
    assert pinned[0] == (int(gather_output) * 2 + 1) * parallel
    assert dev.counts["to_host"] == dev.counts["from_host"] == 2 * staged_calls
    assert rel_err(layer.grad_weight, 2 * (X.T @ dY)[:, cols]) <= 1e-12
    grid.free()


# --------------------------------------------------------------------------- GPU-aware probe


@pytest.mark.parametrize("env,library,want", [
    ("0", True, False),    # forced off, whatever the library says
    ("1", False, True),    # forced on, no test
    ("", False, False),    # library without CUDA support -> staging
    ("", None, False),     # library without MPIX_Query_cuda_support -> staging
    ("", True, True),      # library claims support and the device Allreduce checks out
])
def test_probe_gpu_aware_decision(monkeypatch, env, library, want):
    from mpi4py import MPI

    monkeypatch.setenv("TPMPI_GPU_AWARE", env)
    monkeypatch.setattr(backend_mod, "_library_cuda_support", lambda: library)
    assert backend_mod.probe_gpu_aware(MPI.COMM_SELF, FakeDevice()) is want
    assert backend_mod.probe_gpu_aware(MPI.COMM_SELF, backend_mod.get_backend("numpy")) is False


def test_probe_falls_back_when_the_device_allreduce_fails(monkeypatch):
    from mpi4py import MPI

    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    monkeypatch.setattr(backend_mod, "_library_cuda_support", lambda: True)
    monkeypatch.setattr(backend_mod, "_device_allreduce_ok", lambda comm, backend: False)
    assert backend_mod.probe_gpu_aware(MPI.COMM_SELF, FakeDevice()) is False
    monkeypatch.setenv("TPMPI_GPU_AWARE", "yes")
    with pytest.raises(ValueError, match="TPMPI_GPU_AWARE='yes': expected 0 or 1"):
        backend_mod.probe_gpu_aware(MPI.COMM_SELF, FakeDevice())


@pytest.mark.mpi
def test_probe_is_collective(world, monkeypatch):
    if not world.member:
        return
    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    rank = world.comm.Get_rank()
    monkeypatch.setattr(backend_mod, "_library_cuda_support", lambda: rank != 1)
    assert backend_mod.probe_gpu_aware(world.comm, FakeDevice()) is (world.size == 1)


def test_sharing_warning_compares_physical_devices():
    assert backend_mod.sharing_message(["0000:3b:00.0", "0000:5e:00.0"]) is None
    msg = backend_mod.sharing_message(["0000:3b:00.0"] * 4)
    assert msg.startswith("4 ranks share 1 GPU(s) on this node")


# --------------------------------------------------------------------------- tiling, peak


@given(st.integers(1, 5000), st.integers(0, 5000), st.sampled_from([64, 128]))
def test_round_size(requested, total, multiple):
    size = round_size(requested, total, multiple)
    if size == total:  # one panel covers the dimension
        assert requested + multiple // 2 >= total or total <= multiple
    else:
        assert 0 < size < total and size % multiple == 0
        assert abs(size - requested) <= multiple // 2 or size == multiple


def test_round_size_and_workspace():
    assert round_size(1000, 4096) == 1024 and round_size(100, 4096) == 128
    assert round_size(5000, 4096) == 4096 and round_size(64, 50) == 50
    assert panel_workspace_bytes(1024, 2048, 256, 2) == 2 * (1024 + 2048) * 256 * 2
    with pytest.raises(ValueError, match="requested=0"):
        round_size(0, 10)


def test_gemm_peak_and_fraction():
    peak = gemm_peak(backend_mod.get_backend("numpy"), 64, "float32", warmup=1, iters=2)
    assert peak > 0
    rec = {"gflops": 8.0, "time_s": {"median": 0.5}, "ranks": 4, "gemm_s": 0.25}
    # 4 GFLOP in all, 1 GFLOP per rank in 0.25 s of GEMM = 4 GFLOP/s = 40 % of 10 GFLOP/s
    assert gemm_fraction(rec, 10.0) == pytest.approx(0.4)
    assert gemm_fraction({**rec, "gemm_s": 0.0}, 10.0) is None


def test_cupy_memory_peak_hook_takes_cupys_keyword_calls(monkeypatch):
    """CuPy calls ``hook.malloc_postprocess(device_id=, size=, mem_size=, mem_ptr=, pmem_id=)``
    and ``hook.free_postprocess(device_id=, mem_size=, mem_ptr=, pmem_id=)``; replayed here on a
    stand-in ``cupy.cuda.memory_hook`` module."""
    import sys
    import types

    active = []

    class MemoryHook:
        def __enter__(self):
            active.append(self)
            return self

        def __exit__(self, *exc):
            active.remove(self)

    hook_mod = types.ModuleType("cupy.cuda.memory_hook")
    hook_mod.MemoryHook = MemoryHook
    cuda = types.ModuleType("cupy.cuda")
    cuda.memory_hook = hook_mod
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.memory_hook", hook_mod)

    def malloc(size, ptr):
        for h in active:
            h.malloc_postprocess(device_id=0, size=size, mem_size=size, mem_ptr=ptr, pmem_id=ptr)

    def free(size, ptr):
        for h in active:
            h.free_postprocess(device_id=0, mem_size=size, mem_ptr=ptr, pmem_id=ptr)

    with backend_mod.CupyBackend(cupy, 0).memory_peak() as mem:
        free(4096, 1)        # an array from before the block: usage drops below the start
        malloc(1024, 2)
        malloc(2048, 3)      # peak: -4096 + 3072
        free(1024, 2)
        malloc(8192, 4)      # peak: -4096 + 2048 + 8192 = 6144
        malloc(10**9, 0)     # failed allocation (mem_ptr 0): not counted
    assert not active and mem["peak"] == 6144
