"""Array namespace (NumPy or CuPy), rank->GPU binding, stream sync, memory peaks,
GPU-aware-MPI probe and BLAS threads per rank.

Everything else in tpmpi takes a :class:`Backend` and calls ``backend.xp`` for array
operations, so one code path serves NumPy and CuPy.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import tracemalloc
import warnings
from typing import Any, Iterator, Optional

import numpy as np
from mpi4py import MPI

BACKENDS = ("auto", "numpy", "cupy")


class Backend:
    """One array library plus the facts MPI needs about its buffers.

    ``gpu_aware`` is True only when device buffers may be handed to MPI directly (the probe
    in :func:`probe_gpu_aware` passed); otherwise device buffers are staged through host memory.
    """

    def __init__(self, name: str, xp: Any, device: Optional[int] = None):
        self.name = name
        self.xp = xp
        self.is_gpu = name == "cupy"
        self.device = device
        self.gpu_aware = False

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device}, gpu_aware={self.gpu_aware})"

    def asarray(self, a, dtype=None):
        """``a`` as this backend's array (copies host<->device when needed)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a) -> np.ndarray:
        """A NumPy view/copy of ``a``."""
        if self.is_gpu and not isinstance(a, np.ndarray):
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def owns(self, a) -> bool:
        """True when ``a`` is an array of this backend."""
        return isinstance(a, self.xp.ndarray)

    def synchronize(self) -> None:
        """Wait for the current stream, so that MPI sees finished device buffers."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def device_name(self) -> str:
        """GPU model name, or 'cpu'."""
        if not self.is_gpu:
            return "cpu"
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    @contextlib.contextmanager
    def memory_peak(self) -> Iterator[dict]:
        """Measure the peak bytes allocated by this backend inside the block.

        NumPy: tracemalloc (NumPy reports its data buffers to it); CuPy: a memory-pool hook.
        Yields a dict whose ``"peak"`` entry is filled in on exit.
        """
        out = {"peak": 0}
        if self.is_gpu:
            from cupy.cuda import memory_hook

            class _Peak(memory_hook.MemoryHook):
                name = "tpmpi_peak"

                def __init__(self):
                    self.current = self.peak = 0

                def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                    self.current += mem_size
                    self.peak = max(self.peak, self.current)

                def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
                    self.current -= mem_size

            hook = _Peak()
            with hook:
                yield out
            out["peak"] = hook.peak
            return
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            yield out
        finally:
            out["peak"] = max(0, tracemalloc.get_traced_memory()[1] - base)
            if not was_tracing:
                tracemalloc.stop()


_CACHE: dict[str, Backend] = {}


def _cupy_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError without a driver, ...
        return False


def node_comm(comm: MPI.Comm) -> MPI.Comm:
    """Ranks of ``comm`` on this node (shared-memory split), ordered by rank. Collective."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def get_backend(name: "str | Backend" = "auto", comm: Optional[MPI.Comm] = None) -> Backend:
    """The backend called ``name`` (``auto``: CuPy when a GPU is usable, else NumPy).

    The first CuPy request binds this rank to a GPU (see :func:`bind_gpu`), using ``comm``
    (default COMM_WORLD) for the node-local rank. Not collective except on first CuPy use.
    """
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "cupy" if _cupy_usable() else "numpy"
    if name in _CACHE:
        return _CACHE[name]
    if name == "numpy":
        backend = Backend("numpy", np)
    else:
        if not _cupy_usable():
            raise ValueError("backend='cupy': CuPy is not installed or no CUDA device is visible")
        import cupy

        device = bind_gpu(comm if comm is not None else MPI.COMM_WORLD)
        backend = Backend("cupy", cupy, device)
        backend.gpu_aware = probe_gpu_aware(comm if comm is not None else MPI.COMM_WORLD, backend)
    _CACHE[name] = backend
    return backend


def backend_of(a) -> Backend:
    """The backend whose arrays ``a`` is (NumPy for anything that is not a CuPy array)."""
    if type(a).__module__.split(".")[0] == "cupy":
        return get_backend("cupy")
    return get_backend("numpy")


def bind_gpu(comm: MPI.Comm) -> int:
    """Select this rank's GPU: node-local rank modulo the visible device count.

    Respects CUDA_VISIBLE_DEVICES as set by SLURM (``--gpus-per-task``) or the user: with one
    visible device per task the index is 0. Warns when ranks of a node share a device.
    """
    import cupy

    local = node_comm(comm)
    try:
        ndev = cupy.cuda.runtime.getDeviceCount()
        device = local.Get_rank() % ndev
        sharing = local.Get_size() > ndev
    finally:
        local.Free()
    cupy.cuda.Device(device).use()
    if sharing:
        warnings.warn(f"{local.Get_size()} ranks share {ndev} GPU(s) on this node; fine for tests, "
                      "not for performance", RuntimeWarning, stacklevel=2)
    return device


def _library_cuda_support() -> Optional[bool]:
    """``MPIX_Query_cuda_support()`` of the loaded MPI library, or None if it has none.

    dlsym on mpi4py's extension module searches the libmpi it links (as ``python -m mpi4py
    --mpi-library`` does).
    """
    try:
        fn = getattr(ctypes.CDLL(MPI.__file__), "MPIX_Query_cuda_support", None)
    except OSError:
        return None
    return None if fn is None else bool(fn())


def probe_gpu_aware(comm: MPI.Comm, backend: Backend) -> bool:
    """True when MPI may read and write device buffers directly. Collective.

    Order: ``TPMPI_GPU_AWARE=0/1`` overrides; otherwise the library must report CUDA support
    (``MPIX_Query_cuda_support``) AND a small Allreduce on device buffers must return the
    expected values on every rank. Any failure means host staging.
    """
    if not backend.is_gpu:
        return False
    forced = os.environ.get("TPMPI_GPU_AWARE")
    local_ok = forced != "0" and (forced == "1" or bool(_library_cuda_support()))
    if local_ok and forced != "1":
        xp = backend.xp
        try:
            send = xp.arange(4, dtype=xp.float64) + comm.Get_rank()
            recv = xp.zeros_like(send)
            backend.synchronize()
            comm.Allreduce(send, recv)
            size = comm.Get_size()
            want = np.arange(4) * size + size * (size - 1) / 2
            local_ok = bool(np.array_equal(xp.asnumpy(recv), want))
        except Exception:
            local_ok = False
    return bool(comm.allreduce(int(local_ok), op=MPI.MIN))


def configure_blas_threads(comm: MPI.Comm, threads: Optional[int] = None) -> int:
    """Set this rank's BLAS/OpenMP threads so that the ranks of a node never oversubscribe.

    ``threads`` (or env ``TPMPI_THREADS``) wins; otherwise the CPUs in this rank's affinity mask
    are divided by the number of ranks on the node whose masks overlap it (a shared-memory
    split), so ``srun --cpus-per-task=c`` gives ``c`` threads and ``mpiexec -n 4`` on 2 cores
    gives 1. Collective over ``comm``. Returns the thread count applied.
    """
    from threadpoolctl import threadpool_limits

    if threads is None and os.environ.get("TPMPI_THREADS"):
        threads = int(os.environ["TPMPI_THREADS"])
    local = node_comm(comm)
    try:
        mine = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            frozenset(range(os.cpu_count() or 1))
        masks = local.allgather(mine)
    finally:
        local.Free()
    if threads is None:
        sharing = sum(1 for m in masks if m & mine)
        threads = max(1, len(mine) // max(1, sharing))
    if threads < 1:
        raise ValueError(f"threads={threads}: expected a positive integer")
    threadpool_limits(limits=int(threads))
    return int(threads)


def blas_info(backend: Optional[Backend] = None) -> dict:
    """BLAS library, kernel and threads as threadpoolctl reports them; the device on a GPU."""
    if backend is not None and backend.is_gpu:
        return {"library": "cublas", "device": backend.device_name()}
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return {"library": pool.get("internal_api"), "version": pool.get("version"),
                    "kernel": pool.get("architecture"), "threads": pool.get("num_threads"),
                    "coretype_env": os.environ.get("OPENBLAS_CORETYPE")}
    return {"library": "unknown"}
