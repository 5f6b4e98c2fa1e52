"""The array libraries: :class:`Backend` (NumPy, host memory) and :class:`CupyBackend` (CuPy, the
GPU this rank is bound to).

Everything else in tpmpi takes a backend and calls ``backend.xp`` for array operations, so one
code path serves NumPy and CuPy; what differs between host and device (stream sync, host copies,
pinned buffers, memory accounting, dtype support) is a method of :class:`Backend` (host)
overridden by :class:`CupyBackend` (device). Which backend a process and a communicator use:
:mod:`tpmpi.core.backend`.
"""
from __future__ import annotations

import contextlib
import copy
import tracemalloc
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from .arrays import Array, DTypeLike


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


