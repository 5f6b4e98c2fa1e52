"""Every backend through the same correctness test, and tpmpi.core.backend's decisions.

* ``xb`` (conftest): column layer forward/backward against a float64 reference on each backend
  ("numpy" always, "cupy" where CuPy and a device exist), world sizes 1-4.
* the GPU-aware probe's decisions (tests/fake_device.py's FakeDevice: a GPU backend without
  GPU-aware MPI), the device-sharing warning, CuPy's memory-peak hook, the BLAS-thread checks.
  (Host staging: test_staging.py; GPU binding and per-communicator decisions: test_subcomm.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

import tpmpi
from conftest import all_ranks_raise, rel_err
from fake_device import FakeDevice
from problems import HALFS, linear_problem
from tpmpi.core import backend as backend_mod
from tpmpi.core.dtypes import tolerance


# --------------------------------------------------------------------------- every backend


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32", *HALFS])
@pytest.mark.parametrize("m,k,n", [(6, 5, 7), (3, 0, 4), (4, 2, 1)])
def test_column_matches_reference_on_backend(grid, xb, dtype, m, k, n):
    X, W, b, dY = linear_problem(m, k, n, dtype)
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
    monkeypatch.setenv("TPMPI_GPU_AWARE", "")
    rank = world.comm.Get_rank()
    monkeypatch.setattr(backend_mod, "_library_cuda_support", lambda: rank != 1)
    assert backend_mod.probe_gpu_aware(world.comm, FakeDevice()) is (world.size == 1)


def test_sharing_warning_compares_physical_devices():
    assert backend_mod.sharing_message(["0000:3b:00.0", "0000:5e:00.0"]) is None
    msg = backend_mod.sharing_message(["0000:3b:00.0"] * 4)
    assert msg.startswith("4 ranks share 1 GPU(s) on this node")


@pytest.mark.mpi
def test_bad_thread_count_raises_on_every_rank(world, monkeypatch):
    comm = world.comm
    all_ranks_raise(comm, lambda: tpmpi.configure_blas_threads(comm, 0),
                    r"^threads=0: expected None or a positive integer$")
    if comm.Get_rank() == 0:
        monkeypatch.setenv("TPMPI_THREADS", "two")
    else:
        monkeypatch.delenv("TPMPI_THREADS", raising=False)
    all_ranks_raise(comm, lambda: tpmpi.configure_blas_threads(comm),
                    r"TPMPI_THREADS='two': expected a positive integer \(digits 0-9\)" +
                    (r" \(rank 0\)" if world.size > 1 else "$"))


# --------------------------------------------------------------------------- memory peak


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
