"""What every runnable scheme shares: the :class:`Case` protocol, :class:`LayerCase` (a case
around one layer object), the deterministic inputs, the serial bare products and the
verification helpers."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np
from mpi4py import MPI

from ...core.arrays import Array
from ...core.backend import Backend
from ...core.grid import ProcessGrid
from ...core.init import init_weight
from ...core.layout import local_slices
from ...core.profiler import Profiler
from ...layers.base import ParallelLinear
from ...layers.module import attach_tap, named_layers
from ..problem import Problem


X_SEED, DY_SEED = 1001, 1002  # seeds of the deterministic X and dY

Block = tuple[slice, ...]  # (rows slice, cols slice)
WHOLE: Block = (slice(None), slice(None))


def inputs(p: Problem, n_out: int, backend: Optional[Backend] = None, x_block: Block = WHOLE,
           dy_block: Block = WHOLE) -> tuple[Array, Array]:
    """Blocks of the problem's deterministic X (m, k) and dY (m, n_out), uniform(-1, 1) from the
    layout-invariant initialiser (any rank can generate any block alone); every data-parallel
    replica has its own."""
    shift = 2 * p.replica
    (xr, xc), (dyr, dyc) = x_block, dy_block
    return (init_weight((p.m, p.k), X_SEED + shift, p.dtype, xr, xc, backend=backend,
                        bound=1.0),
            init_weight((p.m, n_out), DY_SEED + shift, p.dtype, dyr, dyc, backend=backend,
                        bound=1.0))


def bare_products(matmul: Callable[[Any, Any], Any], x: Any, w: Any, b: Any, dy: Any,
                  sync: Callable[[], None]) -> Callable[[bool], None]:
    """``step(backward)``: ``x @ w + b`` and, with ``backward``, ``dy @ w.T``, ``x.T @ dy`` and
    ``dy.sum(0)``, then ``sync()``; for any array library with this syntax (NumPy, CuPy,
    torch) and its ``matmul``."""
    def step(backward: bool) -> None:
        matmul(x, w) + b
        if backward:
            matmul(dy, w.T), matmul(x.T, dy), dy.sum(0)
        sync()
    return step


class Case:
    """A built problem. Subclasses set ``problem``, ``flops`` (one forward), ``module`` (the
    layer or composite the case runs), ``comm``, ``backend`` (the layers') and ``layers`` (the
    ParallelLinear objects, for staging counters), and implement the methods below;
    ``profiler`` is the tap the benchmark attached (:meth:`attach_profiler`), None before."""

    problem: Problem
    flops: float = 0.0
    module: Any
    profiler: Optional[Profiler] = None
    comm: MPI.Comm
    backend: Backend
    layers: list[ParallelLinear]

    def attach_profiler(self) -> Profiler:
        """Time the local products and the communication of the case's module from now on
        (the benchmark's split of compute and communication: a timed
        :class:`~tpmpi.core.profiler.Profiler` attached to its operators and local work,
        :func:`tpmpi.layers.module.attach_tap`). Returns it."""
        profiler = self.profiler = attach_tap(self.module, Profiler.for_backend(self.backend))
        return profiler

    def forward(self) -> None:
        """One forward pass on the case's input."""
        raise NotImplementedError

    def backward(self) -> None:
        """One backward pass on the case's output gradient (after :meth:`forward`)."""
        raise NotImplementedError

    def serial(self, backend: Backend) -> Callable[..., None]:
        """The same product on ONE process (the serial baseline, the bare products), as
        ``step(backward=None)``: by default :func:`bare_products` of the full matrices
        (:meth:`full_arrays`), with backward when ``backward`` (None: the problem's). Schemes
        with more than one GEMM override this."""
        step = bare_products(backend.xp.matmul, *self.full_arrays(backend), backend.synchronize)
        return lambda backward=None: step(self.problem.backward if backward is None
                                          else backward)

    def full_arrays(self, backend: Backend) -> tuple[Array, Array, Array, Array]:
        """The global X (m, k), W (k, n), b (n,) and dY (m, n) of a one-layer problem."""
        p = self.problem
        x, dy = inputs(p, p.n, backend)
        return (x, init_weight((p.k, p.n), 0, p.dtype, backend=backend),
                init_weight((p.n,), 0, p.dtype, backend=backend, stream=1), dy)

    def verify(self) -> float:
        """Fresh forward+backward, max relative error of every output and gradient against a
        float64 reference; the same value on every rank. Collective."""
        raise NotImplementedError


class LayerCase(Case):
    """A case around one layer object: X (m, k) and dY (m, n_out) from the layout-invariant
    initialiser, each rank generating only its block of the layer's declared layouts of x and
    y (``layer.layouts``)."""

    def __init__(self, problem: Problem, grid: ProcessGrid, backend: Backend, layer: Any,
                 *, n_out: int, flops: float) -> None:
        p = self.problem = problem
        self.comm, self.grid, self.backend, self.layer = grid.comm, grid, backend, layer
        self.module = layer
        self.x, self.dy = inputs(p, n_out, backend,
                                 local_slices((p.m, p.k), grid, layer.layouts.x),
                                 local_slices((p.m, n_out), grid, layer.layouts.y))
        self.flops = flops
        # the ParallelLinear objects (for their staging counters)
        self.layers = [leaf for _, leaf in named_layers(layer)]
        self.backend = self.layers[0].backend  # with the grid's GPU-aware decision

    def forward(self) -> None:
        self.y = self.layer(self.x)

    def backward(self) -> None:
        self.dx = self.layer.backward(self.dy)

    def fresh_step(self) -> None:
        """Forward and backward from zeroed gradients: the outputs and gradients that
        :meth:`verify` checks."""
        self.layer.zero_grad()
        self.forward()
        self.backward()


def collective_rel_err(comm: MPI.Comm, pairs: Sequence[tuple]) -> float:
    """max over pairs of ``max|a - ref| / max|ref|``, each max taken over all ranks' parts
    (``a`` and ``ref`` are this rank's parts, any backend; ref in float64). One Allreduce."""
    stats = np.zeros(2 * len(pairs))
    for i, (a, ref) in enumerate(pairs):
        a = np.asarray(a.get() if hasattr(a, "get") else a, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if ref.size:
            stats[2 * i] = np.abs(a - ref).max()
            stats[2 * i + 1] = np.abs(ref).max()
    comm.Allreduce(MPI.IN_PLACE, stats, op=MPI.MAX)
    errs = [d / r if r > 0 else d for d, r in zip(stats[::2], stats[1::2])]
    return float(max(errs, default=0.0))


def host64(backend: Backend, a: Array) -> np.ndarray:
    """``a`` as a float64 NumPy array."""
    return backend.to_host(a).astype(np.float64)


def bias64(backend: Backend, b: Optional[Array]) -> Union[np.ndarray, float]:
    """A bias as a float64 NumPy array, or 0.0 for none (``x @ w + bias64(...)`` is the
    reference product either way)."""
    return 0.0 if b is None else host64(backend, b)


def shard_pairs(layer: ParallelLinear, grads: dict) -> list[tuple]:
    """(local gradient, reference) pairs of a layer whose global reference gradients are
    ``grads["weight"]`` (K, N) and ``grads["bias"]`` (N,): each sliced to the rank's shard."""
    pairs = [(layer.grad_weight, grads["weight"][layer.shard])]
    if layer.bias is not None:
        pairs.append((layer.grad_bias, grads["bias"][layer.bias_slice]))
    return pairs
