"""What every parallel linear layer shares: argument agreement, parameter placement from the
layout-invariant initialiser or from dense matrices, gradients, gather_weight."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from ..args import check_int
from ..backend import Backend, get_backend
from ..comm import Staging, check, max_message_bytes
from ..dtypes import dtype_name, resolve_dtype
from ..grid import ProcessGrid
from ..init import init_weight
from ..layout import gather, local_slices
from ..mappings import Mapping
from ..partition import block_range
from ..timing import Profiler


def _check_dense(W, b, k: int, n: int) -> None:
    """ValueError unless ``W`` is a (k, n) array and ``b`` None or an (n,) array."""
    for name, a, want in (("W", W, (k, n)), ("b", b, (n,))):
        if a is None and name == "b":
            continue
        shape = getattr(a, "shape", None)
        if shape is None:
            raise ValueError(f"{name} is a {type(a).__name__}: expected an array")
        if len(shape) != len(want):
            raise ValueError(f"{name}.shape={tuple(shape)}: expected a {len(want)}D array")
        if tuple(shape) != want:
            raise ValueError(f"{name}.shape={tuple(shape)}: expected {want}")


class ParallelLinear:
    """``Y = X @ W + b`` with ``W`` (in_features, out_features) distributed over ``grid``.

    Subclasses set ``weight_layout`` / ``bias_layout`` (see :mod:`tpmpi.layout`) and implement
    ``forward`` / ``backward``. Construction is collective: every rank must pass the same
    arguments (checked; a difference raises the same ValueError everywhere).

    ``overlap`` (default True): backward runs its dX collective non-blocking while the dW GEMM
    computes (Megatron's trick); False runs it blocking after the GEMM, so a benchmark can
    time both. Fixed at construction (ranks must agree: blocking and non-blocking
    collectives do not match each other).
    With ``check_finite=True``, forward/backward also agree that their input is finite and
    raise naming the argument, the count of NaN/Inf values and the ranks holding them.
    """

    weight_layout = "replicated"
    bias_layout = "replicated"

    def __init__(self, in_features: int, out_features: int, *, grid: Optional[ProcessGrid] = None,
                 bias: bool = True, dtype="float32", seed: int = 0,
                 backend: "str | Backend" = "auto", overlap: bool = True,
                 check_finite: bool = False, _dense=None, **options: Any):
        if grid is not None and not isinstance(grid, ProcessGrid):
            raise ValueError(f"grid is a {type(grid).__module__}.{type(grid).__name__}: expected "
                             "a tpmpi.ProcessGrid")
        self.grid = grid if grid is not None else ProcessGrid(MPI.COMM_WORLD)
        self.comm = self.grid.comm

        def local_checks() -> None:
            if _dense is not None:
                _check_dense(*_dense, in_features, out_features)
            check_int("in_features", in_features)
            check_int("out_features", out_features)
            resolve_dtype(dtype)
            self._check_options(**options)

        check(self.comm, local_checks, in_features=in_features, out_features=out_features,
              bias=bool(bias), dtype=dtype_name(dtype), seed=seed, grid=self.grid.shape,
              backend=str(backend), overlap=bool(overlap), check_finite=bool(check_finite),
              **options)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.dtype = resolve_dtype(dtype)
        self.seed = seed
        self.check_finite = bool(check_finite)
        self.options = dict(options)
        self.overlap = bool(overlap)
        self.backend = get_backend(backend, self.comm)
        self.backend.check_dtype(self.dtype)  # same outcome on every rank: args agreed
        self.staging = Staging(self.backend)
        self.profiler = Profiler(self.backend.synchronize if self.backend.is_gpu else None)
        xp = self.backend.xp
        w_rows, w_cols = local_slices((self.in_features, self.out_features), self.grid,
                                      self.weight_layout)
        (b_cols,) = local_slices((self.out_features,), self.grid, self.bias_layout)
        self.shard: tuple[slice, slice] = (w_rows, w_cols)
        self.bias_slice: slice = b_cols
        if _dense is None:
            self.weight = init_weight((self.in_features, self.out_features), seed, self.dtype,
                                      rows=w_rows, cols=w_cols, backend=self.backend)
            self.bias = init_weight((self.out_features,), seed, self.dtype, cols=b_cols,
                                    backend=self.backend, stream=1,
                                    bound=1.0 / math.sqrt(max(1, self.in_features))) \
                if bias else None
        else:
            w, b = _dense
            self.weight = xp.ascontiguousarray(xp.asarray(w[w_rows, w_cols], dtype=self.dtype))
            self.bias = xp.ascontiguousarray(xp.asarray(b[b_cols], dtype=self.dtype)) \
                if b is not None else None
        self.grad_weight = xp.zeros_like(self.weight)
        self.grad_bias = xp.zeros_like(self.bias) if self.bias is not None else None
        self._x = None
        self._rows: Optional[int] = None  # global rows of the last forward input

    def _check_options(self, **options: Any) -> None:
        """Validate subclass options locally (raise ValueError); default: none accepted."""
        if options:
            raise ValueError(f"unexpected options {sorted(options)}")

    @classmethod
    def from_dense(cls, W, b=None, grid: Optional[ProcessGrid] = None, **options: Any):
        """A layer holding this rank's slices of the global ``W`` (K, N) and ``b`` (N,), which
        every rank passes whole. ``dtype`` defaults to ``W``'s. Collective."""
        shape = getattr(W, "shape", None)  # a bad W is reported collectively by __init__
        k, n = shape if shape is not None and len(shape) == 2 else (0, 0)
        options.setdefault("dtype", dtype_name(getattr(W, "dtype", "float32")))
        return cls(k, n, grid=grid, bias=b is not None, _dense=(W, b), **options)

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Reset accumulated gradients to zero."""
        self.grad_weight[...] = 0
        if self.grad_bias is not None:
            self.grad_bias[...] = 0

    def parameters(self) -> list[tuple[str, Any, Any]]:
        """``(name, local parameter, local gradient)`` for each parameter."""
        out = [("weight", self.weight, self.grad_weight)]
        if self.bias is not None:
            out.append(("bias", self.bias, self.grad_bias))
        return out

    def config(self) -> dict[str, Any]:
        """Constructor keywords that rebuild this layer (less ``grid`` and ``backend``)."""
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None, dtype=self.dtype.name, seed=self.seed,
                    check_finite=self.check_finite, **self.options)

    def parameter_layouts(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``name -> (global shape, layout)`` of each parameter of :meth:`parameters`."""
        out = {"weight": ((self.in_features, self.out_features), self.weight_layout)}
        if self.bias is not None:
            out["bias"] = ((self.out_features,), self.bias_layout)
        return out

    @classmethod
    def load_checkpoint(cls, path: str, grid: Optional[ProcessGrid] = None, **options: Any):
        """A layer of this class from the checkpoint directory ``path``, re-sharded onto ``grid``
        (any shape and size); ``options`` override saved constructor options. Collective (see
        :func:`tpmpi.checkpoint.load_checkpoint`)."""
        from ..checkpoint import load_checkpoint

        return load_checkpoint(path, grid=grid, cls=cls, **options)

    def gather_weight(self):
        """The global W (K, N) on every rank. Collective (tests/debugging only)."""
        return gather(self.weight, self.grid, self.weight_layout,
                      (self.in_features, self.out_features))

    def gather_bias(self):
        """The global b (N,) on every rank, or None. Collective."""
        if self.bias is None:
            return None
        return gather(self.bias, self.grid, self.bias_layout, (self.out_features,))

    # ---- the backward collective, overlapped with the weight-gradient GEMM
    def _collective_during(self, op: str, nbytes: int, blocking: Callable[[], Any],
                           nonblocking: Callable[[], MPI.Request],
                           work: Callable[[], None]) -> None:
        """Run the local ``work`` (the dW/db GEMMs) and collective ``op`` of ``nbytes`` over
        ``self.comm``. With ``self.overlap`` (and P > 1, no host staging) ``nonblocking()`` is
        started first and waited for after ``work``; otherwise ``blocking()`` runs after it.
        Profiler: ``work`` is gemm time; comm time is the wait (overlapped) or the whole call."""
        nranks, prof = self.comm.Get_size(), self.profiler
        overlap = self.overlap and nranks > 1 and not self.staging.staged
        if overlap:
            self.backend.synchronize()
            request = nonblocking() if prof.runs("comm") else MPI.REQUEST_NULL
            prof.count(op, nbytes, nranks)
        with prof.gemm():
            work()
        if overlap:
            with prof.comm(op, 0, 1):  # time spent waiting, bytes counted above
                request.Wait()
        else:
            with prof.comm(op, nbytes, nranks):
                if prof.runs("comm"):
                    blocking()

    # ---- the layers' communication operators (tpmpi.mappings)
    def _apply(self, mapping: Optional[Mapping], x, size: Optional[int] = None):
        """``mapping`` applied to ``x`` (blocking; ``x`` itself when ``mapping`` is None),
        charged to the profiler; skipped while it runs GEMMs only (the result is then
        allocated but not filled). ``size``: see :meth:`tpmpi.mappings.Mapping.out`."""
        if mapping is None:
            return x
        out = mapping.out(x, size)
        if mapping.op is not None:
            with self.profiler.comm(mapping.op, mapping.nbytes(x, out), self.comm.Get_size()):
                if self.profiler.runs("comm"):
                    mapping.forward(x, out)
        return out

    def _map_during(self, mapping: Mapping, x, out, work: Callable[[], None]) -> None:
        """Run the local ``work`` while ``mapping`` fills ``out`` from ``x`` (see
        :meth:`_collective_during`; only ``work`` when the mapping communicates nothing)."""
        if mapping.op is None:
            with self.profiler.gemm():
                work()
            return
        self._collective_during(mapping.op, mapping.nbytes(x, out),
                                lambda: mapping.forward(x, out), lambda: mapping.start(x, out),
                                work)

    # ---- input validation shared by forward/backward of all layers
    def _agree_input(self, name: str, a, want_cols: int, *, backward: bool = False,
                     split_rows: bool = False) -> int:
        """Collectively check that ``a`` is a 2D array of this backend and dtype with
        ``want_cols`` columns and the same number of rows on every rank, or with
        ``split_rows`` this rank's block of the rows (layout "rows"); for ``backward``, also
        that forward() ran and ``a`` has the forward input's global rows. Returns the global
        row count M and, in forward, keeps it for backward. One small Allreduce (with
        ``split_rows`` also an Allgather of the row counts)."""
        shape = getattr(a, "shape", None)
        rows = None
        if split_rows:
            local = np.array([shape[0] if shape else -1], dtype=np.int64)
            every = np.empty(self.comm.Get_size(), dtype=np.int64)
            self.comm.Allgather(local, every)
            rows = int(every.sum()) if (every >= 0).all() else None
        elif shape:
            rows = shape[0]

        def local_checks() -> None:
            self._check_array(name, a, backward=backward)
            if a.shape[1] != want_cols:
                raise ValueError(f"{name}.shape={tuple(a.shape)}: expected {want_cols} columns")
            if split_rows and rows is not None:
                start, stop = block_range(rows, self.comm.Get_size(), self.comm.Get_rank())
                if a.shape[0] != stop - start:
                    raise ValueError(f"{name}.shape={tuple(a.shape)}: expected {stop - start} "
                                     f"rows, block {self.comm.Get_rank()} of the {rows} rows in "
                                     f"layout 'rows' over {self.comm.Get_size()} ranks")
            if backward and rows != self._rows:
                raise ValueError(f"{name}.shape={tuple(a.shape)}: expected {self._rows} "
                                 + ("rows in all" if split_rows else "rows")
                                 + " (the forward input's)")

        key = f"{name} rows in all" if split_rows else f"{name}.shape[0]"
        check(self.comm, local_checks, TPMPI_MAX_MESSAGE_BYTES=max_message_bytes(),
              **{key: rows})
        if not backward:
            self._rows = rows
        return rows

    def _check_array(self, name: str, a, *, backward: bool = False) -> None:
        """Local part of the input checks: forward() ran (for ``backward``), ``a`` is a 2D array
        of this layer's backend and dtype (and finite, with ``check_finite``). Raises
        ValueError."""
        if backward and self._x is None:
            raise ValueError("backward() called before forward(): no saved input")
        if not self.backend.owns(a):
            raise ValueError(f"{name} is a {type(a).__module__}.{type(a).__name__}: expected "
                             f"a {self.backend.name} array (the layer's backend)")
        if a.ndim != 2:
            raise ValueError(f"{name}.shape={tuple(a.shape)}: expected a 2D array")
        if a.dtype != self.dtype:
            raise ValueError(f"{name}.dtype={dtype_name(a.dtype)}: expected "
                             f"{self.dtype.name} (the layer's dtype)")
        if self.check_finite:
            bad = int(a.size - int(self.backend.xp.isfinite(a).sum()))
            if bad:
                raise ValueError(f"{name} has {bad} non-finite value(s) (NaN/Inf) "
                                 "[check_finite=True]")

    # ---- phase switches for overlap measurements (see Profiler.only)
    def _matmul(self, a, b, out=None):
        """``a @ b`` (into ``out``); skipped while the profiler runs communication only (then
        zeros of the product's shape, in ``out`` when given, are returned)."""
        xp = self.backend.xp
        if self.profiler.runs("gemm"):
            return xp.matmul(a, b, out=out)
        if out is None:
            return xp.zeros((a.shape[0], b.shape[1]), dtype=self.dtype)
        out.fill(0)  # defined values for whatever follows (e.g. an activation)
        return out

    def _collective(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` (a collective); skipped while the profiler runs GEMMs only, returning a
        completed request."""
        return fn(*args) if self.profiler.runs("comm") else MPI.REQUEST_NULL
