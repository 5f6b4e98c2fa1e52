"""A stand-in ``cupy`` module made of NumPy, so the real :class:`tpmpi.core.backend.CupyBackend` and
the CuPy branch of :func:`tpmpi.core.backend.get_backend` (GPU binding, GPU-aware decision) run on a
CPU.

``install(monkeypatch, devices=1)`` puts it in ``sys.modules`` (``import cupy`` returns it),
empties tpmpi's backend cache so the next CuPy request creates the backend afresh, and makes
the host-staging methods that need real device arrays (``get``/``set``, pinned memory) use the
host implementations. Its arrays are NumPy arrays: MPI, staging and every layer run unchanged.
"""
from __future__ import annotations

import collections
import types

import numpy as np

from tpmpi.core import backend as backend_mod


class FakeCupy(types.ModuleType):
    """``cupy`` with NumPy's array functions, a ``cuda`` namespace and event counters."""

    def __init__(self, devices: int = 1) -> None:
        super().__init__("cupy")
        self.__version__ = "0.0-fake"
        self.counts: collections.Counter = collections.Counter()
        self.current = None  # the device made current by Device(i).use()
        counts, module = self.counts, self

        class Device:
            def __init__(self, index=None) -> None:
                self.id = module.current if index is None else index

            def use(self) -> None:
                counts["use"] += 1
                module.current = self.id

        class Stream:
            def synchronize(self) -> None:
                counts["sync"] += 1

        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: devices,
            deviceGetPCIBusId=lambda i: f"0000:{i + 1:02x}:00.0",
            getDeviceProperties=lambda i: {"name": b"Fake GPU"},
            memGetInfo=lambda: (64 << 30, 80 << 30))
        class MemoryHook:  # cupy.cuda.memory_hook.MemoryHook: never called here
            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                pass

        self.cuda = types.SimpleNamespace(
            runtime=runtime, Device=Device, get_current_stream=Stream,
            memory_hook=types.SimpleNamespace(MemoryHook=MemoryHook))

    def __getattr__(self, name: str):
        return getattr(np, name)

    @staticmethod
    def asnumpy(a):
        return np.asarray(a)

    @staticmethod
    def matmul(a, b, out=None):
        """Products of 2-byte floats keep their dtype, as cuBLAS's do (NumPy's bfloat16
        matmul returns float32)."""
        from tpmpi.core.gemm import matmul

        return matmul(np, a, b, out=out)


HOST_STAGING = ("pinned_empty", "copy_to_host", "copy_from_host", "copy_to_host_async",
                "copy_from_host_async", "wait_copy")
"""The CupyBackend methods that need real device arrays (``get``/``set`` on streams, pinned
memory): :func:`install` gives them the host implementations."""


def modules(fake: FakeCupy) -> dict:
    """The ``sys.modules`` entries that make ``import cupy`` and ``from cupy.cuda import
    memory_hook`` find ``fake``."""
    return {"cupy": fake, "cupy.cuda": fake.cuda, "cupy.cuda.memory_hook": fake.cuda.memory_hook}


def install(monkeypatch, devices: int = 1) -> FakeCupy:
    """Make ``import cupy`` return a fresh :class:`FakeCupy` for the rest of the test."""
    import sys

    fake = FakeCupy(devices)
    for name, module in modules(fake).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend_mod, "_CACHE", {})
    for method in HOST_STAGING:
        monkeypatch.setattr(backend_mod.CupyBackend, method, getattr(backend_mod.Backend, method))
    return fake
