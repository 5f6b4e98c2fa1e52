"""Array namespace (NumPy or CuPy), rank->GPU binding, stream sync, memory peaks,
GPU-aware-MPI probe and BLAS threads per rank.

Everything else in tpmpi takes a :class:`Backend` and calls ``backend.xp`` for array
operations, so one code path serves NumPy and CuPy; what differs between host and device
(stream sync, host copies, pinned buffers, memory accounting, dtype support) is a method of
:class:`Backend` (host) overridden by :class:`CupyBackend` (device).

One backend object exists per process and array library (:func:`process_backend`): creating
the CuPy one binds the process to a GPU with no MPI call (:func:`bind_gpu`), so layers may be
built on any sub-communicators, in any order. What depends on the communicator (whether MPI may
read device buffers directly, how many of its ranks share a GPU) is decided collectively, once
per communicator, and cached on it as an MPI attribute (:func:`device_facts`); the backend a
layer holds is the process backend seen through its communicator's decision
(:meth:`Backend.with_gpu_aware`).

Environment: ``TPMPI_BACKEND`` (what ``"auto"`` means; ranks must agree), ``TPMPI_GPU_AWARE=0/1``
(override the GPU-aware-MPI probe), ``TPMPI_THREADS`` (BLAS threads per rank),
``CUDA_VISIBLE_DEVICES`` and the launchers' node-local rank variables (:data:`LOCAL_RANK_VARIABLES`,
read by :func:`bind_gpu`).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import ctypes
import dataclasses
import os
import tracemalloc
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

from .agreement import CALL_ORDER, Same, Text, agree
from .args import check_int, parse_int
from .arrays import Array, DTypeLike

BACKENDS = ("auto", "numpy", "cupy")


class Backend:
    """One array library plus the facts MPI needs about its buffers; this base class is the
    host (NumPy) implementation, :class:`CupyBackend` the device one.

    ``gpu_aware`` is True only when device buffers may be handed to MPI directly (the probe
    in :func:`probe_gpu_aware` passed); otherwise device buffers are staged through host memory
    with :meth:`pinned_empty`, :meth:`copy_to_host` and :meth:`copy_from_host`.
    """

    is_gpu = False

    def __init__(self, name: str, xp: Any, device: Optional[int] = None) -> None:
        self.name = name
        self.xp = xp
        self.device = device
        self.gpu_aware = False
        self._views: dict[bool, Backend] = {}

    def with_gpu_aware(self, gpu_aware: bool) -> Backend:
        """This backend (same arrays, device and caches) with ``gpu_aware`` set: itself when it
        already has that value, else one shallow copy kept for reuse."""
        if self.gpu_aware == gpu_aware:
            return self
        view = self._views.get(gpu_aware)
        if view is None:
            view = self._views[gpu_aware] = copy.copy(self)
            view.gpu_aware, view._views = gpu_aware, {not gpu_aware: self}
        return view

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device}, gpu_aware={self.gpu_aware})"

    def asarray(self, a: Any, dtype: Optional[DTypeLike] = None) -> Array:
        """``a`` as this backend's array (copies host<->device when needed)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a: Array) -> np.ndarray:
        """A NumPy view/copy of ``a``."""
        return np.asarray(a)

    def owns(self, a: object) -> bool:
        """True when ``a`` is an array of this backend."""
        return isinstance(a, self.xp.ndarray)

    def check_dtype(self, dtype: DTypeLike) -> None:
        """Raise ValueError when this backend cannot hold and multiply ``dtype``."""

    def operand(self, a: Array) -> Array:
        """``a`` ready to be a GEMM operand in several products: itself here (the BLAS reads
        strided rows, e.g. a column block ``x[:, j0:j1]``, in place)."""
        return a

    def synchronize(self) -> None:
        """Wait for the current stream, so that MPI sees finished device buffers."""

    def device_name(self) -> str:
        """GPU model name, or 'cpu'."""
        return "cpu"

    def device_key(self) -> Optional[str]:
        """An id of the physical device this process uses, the same in every process that
        uses it (PCI bus id), or None for host memory."""
        return None

    # ---- host staging of device buffers (used by tpmpi.core.comm.Staging)
    def pinned_empty(self, shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
        """An uninitialised host array that device copies can use at full speed (page-locked)."""
        return np.empty(shape, dtype=dtype)

    def copy_to_host(self, a: Array, out: np.ndarray) -> None:
        """Copy this backend's array ``a`` into the host array ``out`` (same shape); returns
        when the copy is complete."""
        np.copyto(out, a)

    def copy_from_host(self, host: np.ndarray, a: Array) -> None:
        """Copy the host array ``host`` into this backend's array ``a`` (same shape)."""
        np.copyto(a, host)

    def copy_to_host_async(self, a: Array, out: np.ndarray) -> Any:
        """Start copying the contiguous ``a`` into the pinned host array ``out``, after the work
        already queued on the current stream; returns a fence for :meth:`wait_copy`. Here (host
        memory) the copy is done on return and the fence is None."""
        self.copy_to_host(a, out)
        return None

    def copy_from_host_async(self, host: np.ndarray, a: Array) -> Any:
        """Start copying the pinned ``host`` into the contiguous ``a``; work queued later on the
        current stream sees the data. Returns a fence: ``host`` may be reused after
        :meth:`wait_copy`. Here the copy is done on return."""
        self.copy_from_host(host, a)
        return None

    def wait_copy(self, fence: Any) -> None:
        """Block until the asynchronous copy behind ``fence`` has completed."""

    @contextlib.contextmanager
    def memory_peak(self) -> Iterator[dict]:
        """Measure the peak bytes allocated by this backend inside the block, above what was
        allocated when it started. Yields a dict whose ``"peak"`` entry is filled in on exit.

        NumPy: tracemalloc (NumPy reports its data buffers to it); CuPy: a memory-pool hook.
        """
        out = {"peak": 0}
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


class CupyBackend(Backend):
    """CuPy arrays on the GPU this rank is bound to (see :func:`bind_gpu`)."""

    is_gpu = True

    def __init__(self, xp: Any, device: int) -> None:
        super().__init__("cupy", xp, device)
        self._dtypes: dict[str, Optional[str]] = {}
        self._side: Any = None  # the staging copies' cupy.cuda.Stream (see _copy_stream)

    def to_host(self, a: Array) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else self.xp.asnumpy(a)

    def check_dtype(self, dtype: DTypeLike) -> None:
        """bfloat16 needs a CuPy that supports it (CuPy >= 14 with ml_dtypes); probed once by a
        tiny matmul, so the error names the cause instead of failing deep inside a kernel."""
        name = np.dtype(dtype).name
        if name not in self._dtypes:
            try:
                a = self.xp.ones((2, 2), dtype=dtype)
                self.xp.matmul(a, a)
                self._dtypes[name] = None
            except Exception as exc:  # noqa: BLE001 - Type/Value/NotImplementedError, compile errors
                self._dtypes[name] = (f"dtype={name!r} is not supported by CuPy "
                                      f"{self.xp.__version__} on this device ({exc}); bfloat16 "
                                      "needs CuPy >= 14 with ml_dtypes installed")
        if self._dtypes[name]:
            raise ValueError(self._dtypes[name])

    def operand(self, a: Array) -> Array:
        """A C-contiguous copy of a strided ``a`` (CuPy hands cuBLAS only C- or F-contiguous
        operands and would copy ``a`` again for each product; transposes of contiguous
        arrays are F-contiguous and pass as they are)."""
        if a.flags.c_contiguous or a.flags.f_contiguous:
            return a
        return self.xp.ascontiguousarray(a)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def device_name(self) -> str:
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def device_key(self) -> Optional[str]:
        return str(self.xp.cuda.runtime.deviceGetPCIBusId(self.device))

    def pinned_empty(self, shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)

    def copy_to_host(self, a: Array, out: np.ndarray) -> None:
        a.get(out=out)  # blocking=True (default): done on return

    def copy_from_host(self, host: np.ndarray, a: Array) -> None:
        # Stream-ordered; the next stream sync (every Staging call starts with one) completes
        # it before ``host`` is reused.
        a.set(host)

    def _copy_stream(self) -> Any:
        """The side stream of the asynchronous staging copies (created at first use)."""
        if self._side is None:
            self._side = self.xp.cuda.Stream(non_blocking=True)
        return self._side

    def copy_to_host_async(self, a: Array, out: np.ndarray) -> Any:
        side = self._copy_stream()
        side.wait_event(self.xp.cuda.get_current_stream().record())
        a.get(stream=side, out=out, blocking=False)
        return side.record()

    def copy_from_host_async(self, host: np.ndarray, a: Array) -> Any:
        side = self._copy_stream()
        side.wait_event(self.xp.cuda.get_current_stream().record())  # earlier readers of a
        a.set(host, stream=side)
        done = side.record()
        self.xp.cuda.get_current_stream().wait_event(done)  # later kernels see the data
        return done

    def wait_copy(self, fence: Any) -> None:
        if fence is not None:
            fence.synchronize()

    @contextlib.contextmanager
    def memory_peak(self) -> Iterator[dict]:
        """Peak device bytes taken from CuPy's memory pool inside the block (a ``MemoryHook``:
        ``malloc_postprocess`` / ``free_postprocess``, called with keyword arguments), above the
        bytes in use when it started; pinned host buffers are not counted."""
        from cupy.cuda import memory_hook

        class _Peak(memory_hook.MemoryHook):
            name = "tpmpi_peak"

            def __init__(self) -> None:
                self.current = self.peak = 0

            def malloc_postprocess(self, **kwargs: Any) -> None:
                if kwargs.get("mem_ptr"):  # 0 when the allocation failed
                    self.current += kwargs["mem_size"]
                    self.peak = max(self.peak, self.current)

            def free_postprocess(self, **kwargs: Any) -> None:
                self.current -= kwargs["mem_size"]

        out = {"peak": 0}
        hook = _Peak()
        try:
            with hook:
                yield out
        finally:
            out["peak"] = hook.peak


_CACHE: dict[str, Backend] = {}

LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                        "MV2_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID", "SLURM_LOCALID")
"""Variables in which launchers give a process its rank among the processes of its node, in
the order :func:`bind_gpu` reads them: Open MPI's mpirun/prterun, MPICH's Hydra and Intel MPI
(``MPI_LOCALRANKID``; ``PMI_LOCAL_RANK``), MVAPICH2, HPE Cray PALS, Slurm's srun. Slurm's
comes last: an mpirun inside an ``sbatch`` script inherits the batch step's ``SLURM_LOCALID=0``."""


def cupy_usable() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - ImportError, CUDARuntimeError without a driver, ...
        return False


def node_comm(comm: MPI.Comm) -> MPI.Comm:
    """Ranks of ``comm`` on this node (shared-memory split), ordered by rank. Collective."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def resolve_backend(name: str = "auto") -> str:
    """``"numpy"`` or ``"cupy"`` for the request ``name`` (``auto``: env ``TPMPI_BACKEND`` when
    set, else CuPy when a GPU is usable, else NumPy). ValueError for an unknown name or
    ``TPMPI_BACKEND`` value, and for CuPy without a usable GPU. No MPI call."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = os.environ.get("TPMPI_BACKEND") or ("cupy" if cupy_usable() else "numpy")
        if name not in BACKENDS[1:]:
            raise ValueError(f"TPMPI_BACKEND={name!r}: expected numpy or cupy")
    if name == "cupy" and not cupy_usable():
        raise ValueError("backend='cupy': CuPy is not installed or no CUDA device is visible")
    return name


def process_backend(name: str) -> Backend:
    """This process's backend ``name`` (``"numpy"`` or ``"cupy"``), created at its first request;
    the CuPy one binds the process to its GPU then (:func:`bind_gpu`, no MPI call). Its
    ``gpu_aware`` is False: layers see it through their communicator's decision
    (:func:`get_backend` with ``comm``)."""
    if name not in _CACHE:
        if name == "numpy":
            _CACHE[name] = Backend("numpy", np)
        else:
            import cupy

            _CACHE[name] = CupyBackend(cupy, bind_gpu())
    return _CACHE[name]


def get_backend(name: str | Backend = "auto", comm: Optional[MPI.Comm] = None) -> Backend:
    """The backend for ``name`` (``"auto"``, ``"numpy"``, ``"cupy"`` or a :class:`Backend`).

    Without ``comm``: this process's backend (:func:`resolve_backend`, :func:`process_backend`);
    no MPI call. With ``comm``: collective over ``comm`` and nothing else, so layers may be built
    on any communicators in any order. The ranks agree on the backend (one rank's error, e.g.
    ``TPMPI_BACKEND=foo`` or ``cupy`` without a GPU, or a different choice, raises the same
    ValueError on every rank), and the backend returned carries ``comm``'s GPU-aware decision
    (:func:`device_facts`: made once per communicator and cached on it).
    """
    error, backend = None, None
    try:
        backend = name if isinstance(name, Backend) else process_backend(resolve_backend(name))
    except ValueError as exc:
        if comm is None:
            raise
        error = str(exc)
    if comm is None:
        assert backend is not None  # else resolve_backend raised
        return backend
    agree(comm, error, backend=None if backend is None else backend.name)
    assert backend is not None  # else agree raised on every rank
    return backend.with_gpu_aware(device_facts(comm, backend).gpu_aware)


def backend_of(a: object) -> Backend:
    """The backend whose arrays ``a`` is (NumPy for anything that is not a CuPy array)."""
    if type(a).__module__.split(".")[0] == "cupy":
        return get_backend("cupy")
    return get_backend("numpy")


def local_rank() -> Optional[tuple[str, int]]:
    """``(variable, value)`` of the first of :data:`LOCAL_RANK_VARIABLES` set to an integer, or
    None when no launcher variable gives the node-local rank."""
    for var in LOCAL_RANK_VARIABLES:
        try:
            return var, parse_int(var, os.environ.get(var, ""))
        except ValueError:
            continue  # unset, or not a rank
    return None


def bind_gpu() -> int:
    """Select this process's GPU, make it current and return its index among the visible
    devices. No MPI call: it runs once per process, whichever communicator asks first.

    The index is the node-local rank the launcher gives (:func:`local_rank`) modulo the number
    of devices this process sees. ``CUDA_VISIBLE_DEVICES`` is respected, never overwritten:

    * ``srun --gpus-per-task=1`` (or ``--gpu-bind=single:1``): Slurm shows each task only its
      own device, as device 0, so every rank takes index 0, each on a different GPU;
    * ``srun --gpus-per-node=G`` without binding, ``mpirun``/``mpiexec`` on a workstation with
      G GPUs: every process sees all G devices and node-local rank r takes device r % G;
    * ``CUDA_VISIBLE_DEVICES=0,1`` set by the user: the same modulo over those two.

    Without a launcher variable (an unknown launcher, a plain ``python`` run) the process takes
    device 0, with a RuntimeWarning when it sees more than one: give each rank its device with
    ``CUDA_VISIBLE_DEVICES`` then. More ranks than GPUs is legal (the tests run 4 ranks on one
    GPU); :func:`device_facts` warns when ranks of a communicator share a device. Runs before
    any CuPy allocation of tpmpi and before any NCCL communicator it could create.
    """
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    found = local_rank()
    if found is None and count > 1:
        warnings.warn(f"no launcher variable gives this process's node-local rank (none of "
                      f"{', '.join(LOCAL_RANK_VARIABLES)} is set): using GPU 0 of the {count} "
                      "visible; set CUDA_VISIBLE_DEVICES per rank to spread ranks over the GPUs",
                      RuntimeWarning, stacklevel=2)
    device = found[1] % count if found is not None else 0
    cupy.cuda.Device(device).use()
    return device


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the ranks of one communicator decided together about their devices."""

    gpu_aware: bool        # MPI may read and write the device buffers directly
    ranks_per_device: int  # most ranks of the communicator on one physical device


_KEYVAL: list[int] = []  # the MPI attribute key of the per-communicator cache (created once)
_SHARING_WARNED: list[bool] = []


def _comm_cache(comm: MPI.Comm) -> dict:
    """A dict cached on ``comm`` as an MPI attribute: freed with the communicator, not copied
    to new ones (Split, Create_cart, Sub and Dup start empty). No communication."""
    if not _KEYVAL:
        _KEYVAL.append(MPI.Comm.Create_keyval())
    cache = comm.Get_attr(_KEYVAL[0])
    if not isinstance(cache, dict):  # None: not set on this communicator yet
        cache = {}
        comm.Set_attr(_KEYVAL[0], cache)
    return cache


def device_facts(comm: MPI.Comm, backend: Backend) -> DeviceFacts:
    """``comm``'s :class:`DeviceFacts` for ``backend``.

    Host backends: not GPU-aware, one rank per device, no MPI call. GPU backends: decided
    collectively over ``comm`` the first time (:func:`probe_gpu_aware`, then one allgather of
    the ranks' device ids, warning once per process when ranks share a device), then cached on
    ``comm``; every rank of ``comm`` must ask at the same point, as layer construction does.
    """
    if not backend.is_gpu:
        return DeviceFacts(False, 1)
    cache = _comm_cache(comm)
    if backend.name not in cache:
        aware = probe_gpu_aware(comm, backend)
        cache[backend.name] = DeviceFacts(aware, _ranks_per_device(comm, backend))
    return cache[backend.name]


def _ranks_per_device(comm: MPI.Comm, backend: Backend) -> int:
    """Most ranks of ``comm`` on one physical device (host name + :meth:`Backend.device_key`).
    Collective (one allgather)."""
    keys = comm.allgather((MPI.Get_processor_name(), backend.device_key()))
    host = keys[comm.Get_rank()][0]
    first_on_host = next(r for r, (h, _) in enumerate(keys) if h == host) == comm.Get_rank()
    message = sharing_message([dev for h, dev in keys if h == host and dev is not None])
    if message and first_on_host and not _SHARING_WARNED:
        _SHARING_WARNED.append(True)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    per_device = collections.Counter(key for key in keys if key[1] is not None)
    return max(per_device.values(), default=1)


def sharing_message(buses: Sequence[str]) -> Optional[str]:
    """The warning for the node-local ranks' PCI bus ids ``buses`` when some share a GPU."""
    if len(set(buses)) == len(buses):
        return None
    return (f"{len(buses)} ranks share {len(set(buses))} GPU(s) on this node: correct, but they "
            "share the device's memory and compute (fine for tests, not for measurements)")


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
    """True when MPI may read and write device buffers directly. Collective; uncached (see
    :func:`device_facts`).

    ``TPMPI_GPU_AWARE=1`` claims support without a test, ``=0`` forces host staging (any other
    value: the same ValueError on every rank). Otherwise the library must report CUDA support
    (``MPIX_Query_cuda_support``; Cray MPICH needs ``MPICH_GPU_SUPPORT_ENABLED=1``, MPICH
    ``MPIR_CVAR_ENABLE_GPU=1``, conda-forge Open MPI ``OMPI_MCA_opal_cuda_support=true``) AND a
    small Allreduce on device buffers must return the expected values. The answer is True only
    if every rank claims support; the device test runs (on every rank) when any rank's claim
    comes from its library, and device buffers never reach MPI unless every rank claims it.
    """
    if not backend.is_gpu:
        return False
    forced = os.environ.get("TPMPI_GPU_AWARE", "")
    agree(comm, None if forced in ("", "0", "1") else
          f"TPMPI_GPU_AWARE={forced!r}: expected 0 or 1 (or unset)")
    claim = forced == "1" if forced else bool(_library_cuda_support())
    votes = np.array([int(claim), -int(not forced)], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, votes, op=MPI.MIN)  # [every rank claims, -(any rank tests)]
    if not votes[0]:
        return False
    if not votes[1]:
        return True  # every rank forced it
    return bool(comm.allreduce(int(_device_allreduce_ok(comm, backend)), op=MPI.MIN))


def _device_allreduce_ok(comm: MPI.Comm, backend: Backend) -> bool:
    """One Allreduce on device buffers gives the right sums. Collective."""
    xp = backend.xp
    try:
        send = xp.arange(4, dtype=xp.float64) + comm.Get_rank()
        recv = xp.zeros_like(send)
        backend.synchronize()
        comm.Allreduce(send, recv)
        backend.synchronize()
        size = comm.Get_size()
        return bool(np.array_equal(backend.to_host(recv),
                                   np.arange(4) * size + size * (size - 1) / 2))
    except Exception:  # noqa: BLE001 - any failure means staging
        return False


_THREADS: list[int] = []  # the threads configure_blas_threads last applied


def configure_blas_threads(comm: MPI.Comm, threads: Optional[int] = None) -> int:
    """Set this rank's BLAS/OpenMP threads so that the ranks of a node never oversubscribe.
    Process-wide, hence explicit: the CLI, the benchmarks, the scripts and the tests call it;
    grids, meshes and layers never do.

    ``threads`` (or env ``TPMPI_THREADS``) wins; otherwise the CPUs in this rank's affinity mask
    are divided by the number of ranks on the node whose masks overlap it (a shared-memory
    split), so ``srun --cpus-per-task=c`` gives ``c`` threads and ``mpiexec -n 4`` on 2 cores
    gives 1. Collective over ``comm``. Returns the thread count applied.
    """
    from threadpoolctl import threadpool_limits

    error = None
    try:
        if threads is None and os.environ.get("TPMPI_THREADS"):
            env = os.environ["TPMPI_THREADS"]
            threads = parse_int("TPMPI_THREADS", env, 1)
        threads = check_int("threads", threads, 1, allow_none=True)
    except ValueError as exc:
        error = str(exc)
    agree(comm, error, call=Same(Text("configure_blas_threads()"), CALL_ORDER))
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
    threadpool_limits(limits=threads)
    _THREADS[:] = [threads]
    return threads


def configured_blas_threads() -> Optional[int]:
    """The BLAS threads per rank that :func:`configure_blas_threads` last set in this process
    (what records report as ``threads_per_rank``), or None if it never ran. No MPI call."""
    return _THREADS[0] if _THREADS else None


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
