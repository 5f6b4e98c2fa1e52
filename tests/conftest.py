"""Test harness for serial and MPI runs.

* ``python -m pytest``: serial tests run, tests marked ``mpi`` skip ("need --with-mpi").
* ``mpiexec -n 4 python -m mpi4py -m pytest --with-mpi``: every test runs on all 4 ranks;
  the ``world`` fixture splits COMM_WORLD so that one run covers world sizes 1, 2, 3 and 4.
* A failure on any rank aborts the whole MPI job at once (no rank is left in a collective);
  pytest-timeout's thread method (setup.cfg) ends real deadlocks inside blocking MPI calls.
* Only rank 0 prints pytest's report.
* Fixtures: ``world`` (a sub-communicator of P = 1-4 ranks; the test runs on its members only,
  ``@pytest.mark.world_sizes(...)`` restricts P), ``grid`` (1 x P over it), ``grids`` (every
  grid shape of P, one at a time), ``shared_tmp`` (one directory for all its ranks), ``xb``.
  Shared inputs and references: ``problems.py``; stand-in devices: ``fake_device.py`` (a GPU
  backend without GPU-aware MPI) and ``fake_cupy.py`` (a NumPy-made CuPy).
* Backends: the ``xb`` fixture runs a test once per backend ("numpy"; "cupy", marked ``gpu``,
  skipped when CuPy or a device is missing); ``TPMPI_TEST_BACKEND=cupy`` restricts it to that
  backend and fails instead of skipping. Layers built with ``backend="auto"`` stay on NumPy
  (``TPMPI_BACKEND=numpy``) so that tests passing NumPy arrays also pass on a GPU machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest

_CONFIG: list = []
WORLD_SIZES = (1, 2, 3, 4)
ROOT = pathlib.Path(__file__).resolve().parents[1]
"""The repository."""


def _comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _with_mpi(config) -> bool:
    return bool(config.getoption("--with-mpi", default=False))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Ranks > 0 stay quiet; every rank uses 1 BLAS thread unless told otherwise (set once,
    explicitly: grids and layers leave BLAS alone)."""
    os.environ.setdefault("TPMPI_THREADS", "1")
    os.environ.setdefault("TPMPI_BACKEND", "numpy")
    _CONFIG.append(config)
    from tpmpi.core.threads import configure_blas_threads

    configure_blas_threads(_comm())  # collective: every rank configures pytest together
    config.addinivalue_line("markers", "world_sizes(*sizes): run the world fixture's test at "
                            "these world sizes only (the others are skipped on every rank)")
    if _with_mpi(config):
        comm = _comm()
        if comm.Get_size() > 1 and comm.Get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the whole session)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """A failure on any rank aborts the whole MPI job (no hang in the next collective)."""
    if report.failed and _CONFIG and _with_mpi(_CONFIG[0]):
        comm = _comm()
        if comm.Get_size() > 1:
            sys.__stderr__.write(f"\n[rank {comm.Get_rank()}] FAILED {report.nodeid} "
                                 f"({report.when})\n{report.longreprtext}\n")
            sys.__stderr__.flush()
            comm.Abort(1)


class World:
    """The first ``size`` ranks of COMM_WORLD as one communicator: ``comm`` on those ranks,
    None on the others (``member``). Collective over COMM_WORLD (a Split)."""

    def __init__(self, size: int):
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        self.size = size
        sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
        self.comm = None if sub == MPI.COMM_NULL else sub

    @property
    def member(self) -> bool:
        return self.comm is not None

    def free(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None


def _world_sizes(request) -> tuple:
    marker = request.node.get_closest_marker("world_sizes")
    return marker.args if marker else WORLD_SIZES


@pytest.fixture(params=WORLD_SIZES, ids=lambda n: f"P{n}")
def world(request):
    """A :class:`World` of P = 1, 2, 3 and 4 ranks (one test per P) in one ``mpiexec -n 4`` run.

    * P above COMM_WORLD's size, or not among a ``@pytest.mark.world_sizes(...)`` marker's
      sizes: the test is skipped on every rank (no MPI call).
    * Otherwise COMM_WORLD is split: the first P ranks (rank 0 always among them, so its report
      counts every run) run the test with ``world.comm``. The other ranks skip it at once and
      wait at a Barrier of COMM_WORLD, which the members reach after the test, having freed
      ``world.comm``. A test body therefore runs on members only and needs no membership check;
      it must not call collectives over COMM_WORLD.
    """
    from mpi4py import MPI

    size = request.param
    if size > MPI.COMM_WORLD.Get_size():
        pytest.skip(f"needs {size} ranks, COMM_WORLD has {MPI.COMM_WORLD.Get_size()}")
    sizes = _world_sizes(request)
    if size not in sizes:
        pytest.skip(f"runs at world sizes {', '.join(map(str, sizes))}")
    w = World(size)
    try:
        if not w.member:
            pytest.skip(f"this rank is outside the world of {size}")
        yield w
    finally:
        w.free()
        MPI.COMM_WORLD.Barrier()


@pytest.fixture
def grid(world):
    """A 1D :class:`tpmpi.ProcessGrid` (1 x P) over ``world.comm``, freed after the test."""
    from tpmpi.core.grid import ProcessGrid

    with ProcessGrid(world.comm) as g:
        yield g


@pytest.fixture
def grids(world):
    """``grids(shapes=None)`` iterates over a :class:`tpmpi.ProcessGrid` over ``world.comm`` for
    each shape (default: every factorisation pr x pc of P, 1xP first), each built when the loop
    reaches it and freed before the next."""
    from tpmpi.core.grid import ProcessGrid, factorisations

    def each(shapes=None):
        for shape in factorisations(world.size) if shapes is None else shapes:
            with ProcessGrid(world.comm, shape=shape) as g:
                yield g
    return each


@pytest.fixture
def shared_tmp(world, tmp_path_factory) -> pathlib.Path:
    """A new directory made by rank 0 of the world, the same path on every rank (collective:
    a bcast over ``world.comm``)."""
    path = tmp_path_factory.mktemp("shared") if world.comm.Get_rank() == 0 else None
    return world.comm.bcast(path)


def _backend_params() -> list:
    forced = os.environ.get("TPMPI_TEST_BACKEND")
    return [pytest.param(name, marks=pytest.mark.gpu) if name == "cupy" else name
            for name in ([forced] if forced else ["numpy", "cupy"])]


@pytest.fixture(scope="session", params=_backend_params())
def xb(request):
    """This process's :class:`tpmpi.Backend` under test, as a first request makes it: no MPI
    call (the GPU binding is per process), so tests may build layers on any sub-communicator
    first; each layer decides GPU-awareness collectively over its own communicator."""
    from tpmpi.core.backend import cupy_usable, get_backend

    if request.param == "cupy" and not cupy_usable():
        if os.environ.get("TPMPI_TEST_BACKEND"):
            pytest.fail("TPMPI_TEST_BACKEND=cupy but CuPy or a CUDA device is missing")
        pytest.skip("CuPy or a CUDA device is missing")
    return get_backend(request.param)


def all_ranks_raise(comm, fn, match: str) -> str:
    """Assert that ``fn()`` raises ValueError matching ``match`` on every rank of ``comm`` with
    the same message; returns the message."""
    with pytest.raises(ValueError, match=match) as info:
        fn()
    msgs = comm.allgather(str(info.value))
    assert len(set(msgs)) == 1, msgs
    return msgs[0]


def assert_input_errors(comm, layer, X, dY) -> None:
    """The input checks every layer (or MLP) shares, each raised on every rank of ``comm``:
    backward before forward, a wrong column count, a wrong dtype, a 1D input, a list."""
    m, k = X.shape
    other = np.dtype(np.float32 if X.dtype == np.float64 else np.float64)
    all_ranks_raise(comm, lambda: layer.backward(dY), r"backward\(\) called before forward")
    all_ranks_raise(comm, lambda: layer(X[:, :k - 1]),
                    rf"x.shape=\({m}, {k - 1}\): expected {k} columns")
    all_ranks_raise(comm, lambda: layer(X.astype(other)),
                    f"x.dtype={other.name}: expected {X.dtype.name}")
    all_ranks_raise(comm, lambda: layer(X[0]), rf"x.shape=\({k},\): expected a 2D array")
    all_ranks_raise(comm, lambda: layer(X.tolist()), "expected a numpy array")


def load_script(name: str):
    """The module of the repository's ``scripts/<name>.py`` (the scripts are no package),
    loaded on first use and registered as ``name``."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def read_records(path) -> list:
    """The JSON objects of a JSON-lines file (blank lines skipped)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def rel_err(a, ref) -> float:
    """max|a - ref| / max|ref| (0 for empty arrays), computed in float64 on the host."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    scale = max(np.abs(ref).max(), 1e-300)
    return float(np.abs(a - ref).max() / scale)


class RecordingComm:
    """A communicator stand-in that appends ``(method, args, kwargs)`` of every call to ``log``
    and wraps the communicators its calls return (e.g. a ``Split``), so that a test sees every
    MPI call a layer makes on it."""

    def __init__(self, comm, log: list):
        self._comm, self._log = comm, log

    def __getattr__(self, name):
        from mpi4py import MPI

        attr = getattr(self._comm, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._log.append((name, args, kwargs))
            out = attr(*args, **kwargs)
            return RecordingComm(out, self._log) if isinstance(out, MPI.Comm) else out
        return call


def record_mpi_calls(layer, log: list) -> None:
    """Route every MPI call of ``layer`` (a layer or an MLP: its sub-layers too), of its
    operators and of its grid's three communicators through :class:`RecordingComm` into
    ``log``. Undo with :func:`stop_recording` before the grid is freed."""
    for sub in [layer, getattr(layer, "fc1", None), getattr(layer, "fc2", None)]:
        if hasattr(sub, "comm"):
            sub.comm = RecordingComm(sub.comm, log)
    for op in layer.operators().values():
        op.comm = RecordingComm(op.comm, log)
    grid = layer.grid
    grid.comm, grid.row_comm, grid.col_comm = (RecordingComm(c, log) for c in
                                               (grid.comm, grid.row_comm, grid.col_comm))


def stop_recording(grid) -> None:
    """Give ``grid`` back the communicators :func:`record_mpi_calls` wrapped."""
    grid.comm, grid.row_comm, grid.col_comm = (c._comm for c in
                                               (grid.comm, grid.row_comm, grid.col_comm))


def message_bytes(name: str, args: tuple, kwargs: dict):
    """``(send, receive)`` bytes of one recorded MPI call (as tpmpi.core.comm passes its buffers):
    count x type size of each buffer argument, summed over peers for the vector forms (the
    send side of an Allgatherv bounded by its largest count), or None for calls that move no
    array data."""
    from mpi4py import MPI

    def nbytes(a):
        return 0 if a is None or a is MPI.IN_PLACE else int(a.nbytes)

    def vector(spec):  # [buf, counts, displs, type or types]
        types = spec[3] if isinstance(spec[3], list) else [spec[3]] * len(spec[1])
        return sum(c * t.Get_size() for c, t in zip(spec[1], types))

    known = ("Alltoallw", "Alltoallv", "Allgatherv", "Gatherv", "Allreduce", "Reduce",
             "Reduce_scatter", "Allgather", "Bcast")
    base = name[1:].capitalize() if name[1:].capitalize() in known else name
    if base in ("Alltoallw", "Alltoallv"):
        return vector(args[0]), vector(args[1])
    if base == "Allgatherv":
        spec = args[1]
        return max(spec[1]) * spec[3].Get_size(), vector(spec)
    if base == "Gatherv":
        if args[0] is MPI.IN_PLACE:
            return 0, vector(args[1])
        return nbytes(args[0][0]), 0
    if base in ("Allreduce", "Reduce", "Reduce_scatter", "Allgather"):
        return nbytes(args[0]), nbytes(args[1] if len(args) > 1 else None)
    if base == "Bcast":
        return nbytes(args[0]), nbytes(args[0])
    return None


def counting(module):
    """An untimed Profiler attached to every operator and local work of ``module`` (a layer,
    a composite or a DataParallel): it counts the collectives from now on."""
    from tpmpi.core.profiler import Profiler
    from tpmpi.layers.module import attach_tap

    return attach_tap(module, Profiler(timed=False))


def profiled_calls(profiler) -> dict:
    """Collectives ``profiler`` (see :func:`counting`) counted since its last reset, by op;
    resets it."""
    calls = dict(profiler.calls)
    profiler.reset()
    return calls
