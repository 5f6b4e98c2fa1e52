"""Which array backend a process and a communicator use (the backends themselves:
:mod:`tpmpi.core.arraylib`).

One backend object exists per process and array library (:func:`process_backend`): creating
the CuPy one binds the process to a GPU with no MPI call (:func:`tpmpi.core.gpubind.bind_gpu`),
so layers may be built on any sub-communicators, in any order. What depends on the communicator
(whether MPI may read device buffers directly, how many of its ranks share a GPU) is decided
collectively, once per communicator, and kept on it (:func:`tpmpi.core.devices.device_facts`);
the backend a layer holds is the process backend seen through its communicator's decision
(:meth:`Backend.with_gpu_aware`, :func:`get_backend` with ``comm``).

Environment: ``TPMPI_BACKEND`` (what ``"auto"`` means; ranks must agree); the GPU binding's and
the probe's variables are documented in :mod:`tpmpi.core.gpubind` and :mod:`tpmpi.core.devices`.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from mpi4py import MPI

from .agreement import agree
from .arraylib import Backend, CupyBackend
from .devices import device_facts
from .gpubind import bind_gpu, cupy_usable

__all__ = ["BACKENDS", "Backend", "CupyBackend", "backend_of", "get_backend", "process_backend",
           "resolve_backend"]

BACKENDS = ("auto", "numpy", "cupy")


_CACHE: dict[str, Backend] = {}

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
    if type(a) is np.ndarray:  # the hot path: no name resolution
        return process_backend("numpy")
    if type(a).__module__.split(".")[0] == "cupy":
        return get_backend("cupy")
    return get_backend("numpy")


