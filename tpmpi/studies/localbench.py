"""Micro-benchmarks of local work: the curves of a calibration's ``local`` field
(:class:`tpmpi.studies.localcurves.LocalCurves`), measured by ``calibrate``
(:func:`tpmpi.studies.collbench.calibrate`) on the ranks that have a core (or a device) of
their own, all at once, so that they share the memory system as a run's ranks do:

* ``overhead_s``: one tiny product (8 x 8) through :class:`tpmpi.core.gemm.LocalWork`, the
  layers' entry to local work -- the Python and dispatch time of one local step;
* the product grid: every ``(m, k, n)`` of :data:`GRID_DIMS` cubed, each timed in one batched
  ``xp.matmul`` of enough products to do :data:`BATCH_FLOPS` (at most :data:`MAX_BATCH`), the
  way the attention core runs its per-head products; the time per product;
* the element-wise curve: at activations of :data:`POINTWISE_SIZES` bytes (rows of
  :data:`WIDTH` features) one of each element-wise kernel a transformer layer runs
  (:data:`KERNELS`: the layers' own LayerNorm and its backward, GELU and its gradient, a
  residual add into a new array, a bias add and a bias gradient, a row softmax), each counted
  at the bytes of its inputs and outputs; seconds per byte of the whole set, less one
  ``overhead_s`` per kernel.

Every value is the best of :data:`REPS` rounds (each the slowest measuring rank's), timed on a
CPU by the CPU time the rank spent (``time.process_time``): what the work takes with a core to
itself, which is the wall-clock time on a node of its own and stays so on a machine that other
jobs share (their load would otherwise end up in the rates; a GPU is timed by the wall clock).

NumPy's 2-byte floats multiply as float32 BLAS (:mod:`tpmpi.core.gemm`): calibrate measures no
NumPy half-precision curves, and the model takes the float32 ones.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from ..core.arrays import Array, DTypeLike
from ..core.backend import Backend, backend_of
from ..core.comm import first_ranks, polite_barrier
from ..core.gemm import LocalWork
from ..core.topology import device_leaders, node_comm
from ..layers.activations import get_activation
from ..layers.functional import layer_norm, layer_norm_backward
from .localcurves import LocalCurves
from .timing import time_calls

GRID_DIMS = {"cpu": (16, 32, 64, 128, 256, 512, 1024), "gpu": (16, 64, 256, 1024, 4096, 8192)}
"""Sizes of the product grid per kind of device: a CPU core's rate settles by 1024, a GPU's
only on products of thousands."""
POINTWISE_SIZES = tuple(2**12 * 4**i for i in range(7))
"""Bytes of one activation of the element-wise benchmark: 4 KiB (in L1) .. 16 MiB (memory)."""
WIDTH = 256
REPS = 5
BATCH_FLOPS = 1e8
MAX_BATCH = 1024


def uniform(xp: Any, shape: tuple, dtype: DTypeLike) -> Array:
    """uniform(-1, 1) values of ``dtype`` made on the backend (a GPU's clocks, hence its GEMM
    rate, depend on the data: constant operands would flatter it)."""
    return (xp.random.random(shape) * 2 - 1).astype(dtype)


def node_facts(comm: MPI.Comm) -> dict:
    """``{"cores_per_node": ..., "ranks_per_node": ...}``: the fewest CPUs the ranks of a node
    may run on (the union of their affinity masks) and the most ranks on a node. Collective."""
    with node_comm(comm) as local:
        masks = local.allgather(sorted(os.sched_getaffinity(0)))
        cpus, ranks = len(set().union(*masks)), local.Get_size()
    return {"cores_per_node": int(comm.allreduce(cpus, op=MPI.MIN)),
            "ranks_per_node": int(comm.allreduce(ranks, op=MPI.MAX))}


@contextlib.contextmanager
def measuring_ranks(comm: MPI.Comm, backend: Backend, cores: int) -> Iterator[MPI.Comm]:
    """The ranks that measure local work (COMM_NULL on the others): on a GPU the first rank of
    each device, all devices together; on a CPU the first ``cores`` ranks of each node (a rank
    per core), each node on its own (nodes share no cores). The others wait without polling
    until all are done (:func:`~tpmpi.core.comm.polite_barrier`). Collective."""
    if backend.is_gpu:
        with device_leaders(comm, backend.device_key()) as leaders:
            yield leaders
    else:
        with node_comm(comm) as local, first_ranks(local, cores) as sub:
            yield sub
    polite_barrier(comm)


def _best(call: Callable[[], Any], comm: MPI.Comm, backend: Backend, reps: int,
          repeat: int = 1, warmup: int = 1) -> float:
    """The best of ``reps`` rounds, each the slowest rank's, in CPU time on a CPU (see the
    module docstring), wall-clock time on a GPU."""
    clock = time.perf_counter if backend.is_gpu else time.process_time
    return float(np.min(time_calls([call], comm, sync=backend.synchronize, warmup=warmup,
                                   iters=reps, repeat=repeat, clock=clock)))


def overhead_seconds(backend: Backend, dtype: str, comm: MPI.Comm, reps: int = REPS) -> float:
    """Seconds of one tiny (8 x 8) product through :class:`~tpmpi.core.gemm.LocalWork`.
    Collective over ``comm``."""
    xp, work = backend.xp, LocalWork(backend.xp)
    a, b = uniform(xp, (8, 8), dtype), uniform(xp, (8, 8), dtype)
    return _best(lambda: work.product(a, b), comm, backend, reps, repeat=200, warmup=20)


def product_seconds(backend: Backend, dtype: str, comm: MPI.Comm, m: int, k: int, n: int,
                    reps: int = REPS) -> float:
    """Seconds of one ``(m, k) @ (k, n)`` product, timed in a batched product (see the module
    docstring). Collective over ``comm``."""
    xp = backend.xp
    batch = int(min(MAX_BATCH, max(1, BATCH_FLOPS // (2 * m * k * n))))
    a, b = uniform(xp, (batch, m, k), dtype), uniform(xp, (batch, k, n), dtype)
    c = xp.empty((batch, m, n), dtype=dtype)
    return _best(lambda: xp.matmul(a, b, out=c), comm, backend, reps) / batch


def product_grid(backend: Backend, dtype: str, comm: MPI.Comm, dims: tuple[int, ...],
                 reps: int = REPS) -> list:
    """:func:`product_seconds` for every ``m, k, n`` of ``dims`` (``[i][j][l]``). Collective
    over ``comm``."""
    return [[[product_seconds(backend, dtype, comm, m, k, n, reps) for n in dims]
             for k in dims] for m in dims]


def _softmax_rows(x: Any) -> Any:
    """The attention core's softmax pass over rows: max, subtract, exp, sum, scale."""
    xp = backend_of(x).xp
    e = xp.subtract(x, x.max(axis=-1, keepdims=True))
    xp.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


KERNELS = {"residual add": 3, "bias add": 2, "bias gradient": 1, "layer_norm": 2,
           "layer_norm backward": 3, "gelu": 2, "gelu gradient": 3, "softmax": 2}
"""The element-wise kernels of the curve, one of each kind a transformer layer runs, and the
activations each reads and writes (what it is counted at)."""


def kernel_seconds(backend: Backend, dtype: str, comm: MPI.Comm, size: int,
                   reps: int = REPS) -> tuple[float, int]:
    """``(seconds, bytes)`` of one run of each of :data:`KERNELS` on activations of ``size``
    bytes (rows of :data:`WIDTH`), and the bytes they read and write. Collective over
    ``comm``."""
    xp = backend.xp
    gelu, gelu_grad = get_activation("gelu_erf")  # the GPT's (nanoGPT's exact GELU)
    item = np.dtype(dtype).itemsize
    rows = max(1, size // (WIDTH * item))
    x, y, z = (uniform(xp, (rows, WIDTH), dtype) for _ in range(3))
    w, bias = uniform(xp, (WIDTH,), dtype), uniform(xp, (WIDTH,), dtype)
    _, saved = layer_norm(x, w, bias)

    def kernels() -> None:
        xp.add(x, y)
        xp.add(z, bias, out=z)
        y.sum(axis=0)
        layer_norm(x, w, bias)
        layer_norm_backward(y, saved)
        gelu(x)
        xp.multiply(gelu_grad(x), y)
        _softmax_rows(x)

    return _best(kernels, comm, backend, reps), sum(KERNELS.values()) * rows * WIDTH * item


def pointwise_curve(backend: Backend, dtype: str, comm: MPI.Comm, overhead: float,
                    sizes: tuple[int, ...] = POINTWISE_SIZES, reps: int = REPS
                    ) -> tuple[list[float], list[float]]:
    """``(bytes, seconds per byte)``: for each activation size of ``sizes``, the mean bytes of
    one of :data:`KERNELS` and the seconds per byte of all of them, less ``overhead`` per
    kernel (:func:`kernel_seconds`). Collective over ``comm``."""
    points, spb = [], []
    for size in sizes:
        took, moved = kernel_seconds(backend, dtype, comm, size, reps)
        points.append(moved / len(KERNELS))
        spb.append(max(took - len(KERNELS) * overhead, 1e-3 * took) / moved)
    return points, spb


def local_curves(backend: Backend, dtype: str, comm: MPI.Comm, reps: int = REPS
                 ) -> LocalCurves:
    """The :class:`~tpmpi.studies.localcurves.LocalCurves` of ``backend:dtype`` measured on the
    ranks of ``comm`` at once (each value the slowest rank's). Collective over ``comm``."""
    overhead = overhead_seconds(backend, dtype, comm)
    dims = GRID_DIMS["gpu" if backend.is_gpu else "cpu"]
    grid = product_grid(backend, dtype, comm, dims, reps)
    sizes, spb = pointwise_curve(backend, dtype, comm, overhead, POINTWISE_SIZES, reps)
    return LocalCurves(overhead, dims, tuple(grid), tuple(sizes), tuple(spb))
