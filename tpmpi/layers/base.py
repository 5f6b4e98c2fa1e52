"""What every parallel linear layer shares: argument agreement, parameter placement from the
layout-invariant initialiser or from dense matrices, gradients, gather_weight, its operators
(held by name, built from the declared layouts) and its schedule."""
from __future__ import annotations

import math
import weakref
import zlib
from typing import Any, Callable, ClassVar, Optional, TypeVar, Union

import numpy as np

from ..core.agreement import CALL_ORDER, Counted, Same, Settle, Text, agree_checks, start_checks
from ..core.args import check_int, check_plain_array, dtype_label
from ..core.arrays import Array, DTypeLike
from ..core.backend import Backend, get_backend
from ..core.comm import Staging
from ..core.dtypes import HALF, dtype_name, resolve_dtype
from ..core.gemm import LocalWork
from ..core.grid import ProcessGrid, default_grid
from ..core.init import init_weight
from ..core.layout import LinearLayouts, agreed_gather, local_shape, local_slices
from ..core.mappings import Operator, between
from ..core.partition import block_sizes
from ..core.schedule import Schedule
from .linear_schedule import grid_shape, linear_schedule
from .module import Checkpointable, LeafModule


def check_dense(W: Any, b: Any, k: int, n: int, names: tuple[str, str] = ("W", "b")) -> None:
    """ValueError unless ``W`` is a (k, n) array and ``b`` None or an (n,) array (plain
    arrays, not subclasses); ``names`` are the arguments' names in the message."""
    for name, a, want in ((names[0], W, (k, n)), (names[1], b, (n,))):
        if a is None and name == names[1]:
            continue
        shape = getattr(a, "shape", None)
        if shape is None:
            raise ValueError(f"{name} is a {type(a).__name__}: expected an array")
        check_plain_array(name, a)
        if len(shape) != len(want):
            raise ValueError(f"{name}.shape={tuple(shape)}: expected a {len(want)}D array")
        if tuple(shape) != want:
            raise ValueError(f"{name}.shape={tuple(shape)}: expected {want}")


_Layer = TypeVar("_Layer", bound="ParallelLinear")
REPLICATED = "{name} must be replicated: the same on every rank [check_replicated=True]"
_LAYERS: weakref.WeakKeyDictionary[ProcessGrid, int] = weakref.WeakKeyDictionary()


def _next_layer_id(grid: ProcessGrid) -> int:
    """The number of layers built on ``grid`` before this one: a layer identity that every rank
    computes alike, since construction is collective and agreed."""
    n = _LAYERS.get(grid, 0)
    _LAYERS[grid] = n + 1
    return n


class Checksum(int):
    """crc32 of an array's bytes (C order): bitwise, so a NaN differs from any number and
    from another NaN payload, and -0.0 from 0.0."""

    def __repr__(self) -> str:
        return f"checksum {int(self):08x}"


def array_checksum(backend: Backend, a: Array) -> Checksum:
    """:class:`Checksum` of ``a`` (a device array is copied to the host)."""
    host = np.ascontiguousarray(backend.to_host(a))
    return Checksum(zlib.crc32(host.reshape(-1).view(np.uint8).data))


def enter_array(xp: Any, a: Array, reuse: Optional[Array] = None, *, keep: bool = False
                ) -> Array:
    """How an input array (checked already) enters a layer: C-ordered and contiguous, ``a``
    itself when it is so, else a C-ordered copy (MPI sends an array's bytes: a Fortran-ordered
    block would travel as the wrong values, a strided view fail on its rank alone). With
    ``keep`` (an input that backward reads again) a copy the layer owns, written into ``reuse``
    when that has ``a``'s shape and dtype (the copy the layer made last time): the caller may
    refill its array between forward and backward (a data loader's reused buffer). NumPy and
    CuPy arrays have no version counter to detect that with (PyTorch raises on it), and any
    checksum reads the array as a copy does, so the layer keeps its own. Local (no
    communication); one copy of ``a`` at most."""
    if not keep:
        return a if a.flags.c_contiguous else xp.ascontiguousarray(a)
    if reuse is None or reuse.shape != a.shape or reuse.dtype != a.dtype:
        reuse = xp.empty(a.shape, dtype=a.dtype)
    reuse[...] = a
    return reuse


class ParallelLinear(LeafModule, Checkpointable):
    """``Y = X @ W + b`` with ``W`` (in_features, out_features) distributed over ``grid``.

    Subclasses declare their layouts in ``layouts_for(**options)`` (a
    :class:`~tpmpi.core.layout.LinearLayouts` from their flags: ``self.layouts``), build their
    communication operators from them once (:meth:`_operator`: ``x -> x_local`` and ``y_local
    -> y`` and the adjoints, held under names that say what they do and listed by
    :meth:`operators`), and implement ``forward`` / ``backward`` as GEMM, named operator,
    GEMM, with the local work of ``self.local`` (:class:`~tpmpi.core.gemm.LocalWork`).
    ``STEP_NAMES`` names the four operators (x, y, dy, dx) in the schedule that
    :meth:`schedule_for` lists without building the layer. Construction is collective: every
    rank must pass the same arguments (checked; a difference raises the same ValueError
    everywhere).
    ``ParallelLinear.load_checkpoint(path, grid)`` (:class:`~tpmpi.layers.module.Checkpointable`)
    loads a saved layer of any subclass; a subclass loads its own kind.

    ``overlap`` (default True): backward runs its dX collective non-blocking while the dW GEMM
    computes (Megatron's trick); False runs it blocking after the GEMM, so a benchmark can
    time both. Fixed at construction (ranks must agree: blocking and non-blocking
    collectives do not match each other).
    With ``check_finite=True``, forward/backward also agree that their input is finite and
    raise naming the argument, the count of NaN/Inf values and the ranks holding them. With
    ``check_replicated=True`` they also agree on a checksum (:class:`Checksum`, one pass over
    the array) of each input that must be replicated (the column layer's x, the row layer's
    dy, ...), raising naming the argument and the ranks that differ.

    Call order: every collective operation (forward, backward, gather_weight) agrees, in the
    same Allreduce as its arguments, on *which* layer (``layer_id``: the number of layers built
    on the grid before it) and *which* operation (kind and this layer's operation counter)
    every rank is in, so swapped layers or forward on one rank and backward on another raise
    the same error everywhere. If a rank fails between a backward's collectives (it still
    completes them), the layer remembers it and its next operation raises on every rank.
    The agreement is started before an operation's first local product and completed right
    after it, or before the operation's first collective when that comes first
    (:class:`~tpmpi.core.agreement.Settle`): the ranks wait for each other once per
    operation, not twice, and a bad argument on any rank still raises the same ValueError on
    every rank before any data collective.

    Inputs enter through :meth:`_enter` (:func:`enter_array`): C-ordered, and the input that
    backward reads again copied into an array the layer owns unless ``copy_input`` is False --
    which a module sets on a sub-layer whose input it made itself and never changes (fc2 of
    :class:`~tpmpi.ParallelMLP`).
    """

    STEP_NAMES: ClassVar[tuple[str, str, str, str]] = ("x", "y", "dy", "dx")
    copy_input: bool = True

    def __init__(self, in_features: int, out_features: int, *, grid: Optional[ProcessGrid] = None,
                 bias: bool = True, dtype: DTypeLike = "float32", seed: int = 0,
                 backend: str | Backend = "auto", overlap: bool = True,
                 check_finite: bool = False, check_replicated: bool = False,
                 _dense: Optional[tuple[Any, Any]] = None, **options: Any) -> None:
        if grid is not None and not isinstance(grid, ProcessGrid):
            raise ValueError(f"grid is a {type(grid).__module__}.{type(grid).__name__}: expected "
                             "a tpmpi.ProcessGrid")
        self.grid = grid if grid is not None else default_grid()
        self.comm = self.grid.comm
        self.layer_id = _next_layer_id(self.grid)
        self._ops = 0  # operations so far (the call counter agreed with each one)
        self._op_texts: dict[str, Text] = {}
        # the operation's agreement until its first product or collective, and a local
        # failure inside an operation's collectives (shared with the operators)
        self._pending = Settle()

        def local_checks() -> None:
            if _dense is not None:
                check_dense(*_dense, in_features, out_features)
            check_int("in_features", in_features)
            check_int("out_features", out_features)
            resolve_dtype(dtype)
            self._check_options(**options)

        agree_checks(self.comm, local_checks,
                     call=Same(Text(f"construction of layer #{self.layer_id} "
                                    f"({type(self).__name__})"), CALL_ORDER),
                     in_features=in_features, out_features=out_features,
                     bias=bool(bias), dtype=dtype_name(dtype), seed=seed, grid=self.grid.shape,
                     backend=str(backend), overlap=bool(overlap), check_finite=bool(check_finite),
                     check_replicated=bool(check_replicated), **options)
        self.in_features, self.out_features = int(in_features), int(out_features)
        # "layer #i (Class KxN)": the same on every rank for the same layer
        self.identity = (f"layer #{self.layer_id} ({type(self).__name__} "
                         f"{self.in_features}x{self.out_features})")
        self.dtype = resolve_dtype(dtype)
        # partial sums that ranks add up are float32 for 2-byte floats: each rank's partial
        # may exceed float16's range where the sum (the serial product) does not
        self.partial_dtype = resolve_dtype("float32") if self.dtype.name in HALF else self.dtype
        self.seed = seed
        self.check_finite = bool(check_finite)
        self.check_replicated = bool(check_replicated)
        self.options = dict(options)
        self.overlap = bool(overlap)
        self.layouts: LinearLayouts = self.layouts_for(**options)
        self.backend = get_backend(backend, self.comm)
        self.backend.check_dtype(self.dtype)  # same outcome on every rank: args agreed
        self.staging = Staging(self.backend)
        self.local = LocalWork(self.backend.xp, self._pending)
        w_rows, w_cols = local_slices((self.in_features, self.out_features), self.grid,
                                      self.layouts.weight)
        (b_cols,) = local_slices((self.out_features,), self.grid, self.layouts.bias)
        self.shard: tuple[slice, slice] = (w_rows, w_cols)
        self.bias_slice: slice = b_cols
        self.weight, self.bias = self._place_parameters(bool(bias), _dense)
        xp = self.backend.xp
        self.grad_weight = xp.zeros_like(self.weight)
        self.grad_bias = xp.zeros_like(self.bias) if self.bias is not None else None
        self._x: Optional[Array] = None  # the input saved by forward for backward
        self._kept: Optional[Array] = None  # the layer's copy of it, reused by the next forward
        self._rows: Optional[int] = None  # global rows of the last forward input

    def _place_parameters(self, bias: bool, dense: Optional[tuple[Any, Any]]
                          ) -> tuple[Array, Optional[Array]]:
        """This rank's blocks of W (:attr:`shard`) and b (:attr:`bias_slice`, or None): from the
        layout-invariant initialiser (``self.seed``), or sliced from the global ``dense`` pair
        ``(W, b)``. No communication."""
        xp, rows_cols, cols = self.backend.xp, self.shard, self.bias_slice
        if dense is None:
            weight = init_weight((self.in_features, self.out_features), self.seed, self.dtype,
                                 rows=rows_cols[0], cols=rows_cols[1], backend=self.backend)
            b = init_weight((self.out_features,), self.seed, self.dtype, cols=cols,
                            backend=self.backend, stream=1,
                            bound=1.0 / math.sqrt(max(1, self.in_features))) if bias else None
            return weight, b
        w, b = dense
        weight = xp.ascontiguousarray(xp.asarray(w[rows_cols], dtype=self.dtype))
        return weight, (xp.ascontiguousarray(xp.asarray(b[cols], dtype=self.dtype))
                        if b is not None else None)

    def _check_options(self) -> None:
        """Validate the subclass's options (its keywords) locally: ValueError for a bad value,
        TypeError for an unknown option. This base accepts none."""

    @classmethod
    def layouts_for(cls, **options: Any) -> LinearLayouts:  # pragma: no cover - abstract
        """The layouts of x, y, the parameters and the local GEMM's operands for the layer's
        ``options`` (its flags): the one place where the flags become layouts. No
        communication."""
        raise NotImplementedError

    def _operator(self, src: str, dst: str, overlap: Optional[bool] = None) -> Operator:
        """The operator from layout ``src`` to ``dst`` on the layer's communicator, with its
        adjoint (:func:`tpmpi.core.mappings.between`), staging and pending agreement; overlapped
        as ``overlap`` (default the layer's)."""
        return between(src, dst, self.comm, self.staging,
                       overlap=self.overlap if overlap is None else overlap,
                       pending=self._pending)

    def operators(self) -> dict[str, Operator]:
        """The layer's communication operators by attribute name, in the order built."""
        return {name: op for name, op in vars(self).items() if isinstance(op, Operator)}

    @classmethod
    def schedule_for(cls, m: int, k: int, n: int, parts: Union[int, tuple[int, int]], *,
                     dtype: str = "float32", backward: bool = False, bias: bool = True,
                     overlap: bool = True, staged: bool = False, **options: Any) -> Schedule:
        """The steps of one forward (and with ``backward`` one backward) of a (k, n) layer
        with ``options`` on an (m, k) input over ``parts`` ranks (or a ``(pr, pc)`` grid), on
        the rank holding the largest blocks: derived from :meth:`layouts_for` and the operator
        classes (:func:`tpmpi.layers.linear_schedule.linear_schedule`); ``staged``: collectives
        through host staging (nothing overlaps). No layer built, no communication."""
        return linear_schedule(cls.layouts_for(**options), cls.STEP_NAMES, m, k, n,
                               grid_shape(parts), dtype=dtype, backward=backward, bias=bias,
                               overlap=overlap and not staged,
                               chunks=cls.row_chunks(m, grid_shape(parts), staged=staged,
                                                     **options))

    @classmethod
    def row_chunks(cls, m: int, grid: tuple[int, int], *, staged: bool = False,
                   **options: Any) -> list[tuple[int, int]]:
        """Row chunks of the forward's local product, each followed by its own output
        collective: one chunk (a subclass may pipeline)."""
        return [(0, m)]

    @classmethod
    def workspace_elements(cls, m: int, k: int, n: int, grid: tuple[int, int],
                           **options: Any) -> int:
        """Elements a layer with ``options`` holds beyond the arrays its layouts declare, on the
        rank with the largest blocks (see :mod:`tpmpi.studies.footprint`): none here."""
        return 0

    def schedule(self, m: int, *, backward: bool = True) -> Schedule:
        """:meth:`schedule_for` this layer (its sizes, dtype, options, grid and staging) on a
        global input of ``m`` rows."""
        return self.schedule_for(m, self.in_features, self.out_features, self.grid.shape,
                                 dtype=self.dtype.name, backward=backward,
                                 bias=self.bias is not None, overlap=self.overlap,
                                 staged=self.staging.staged, **self.options)

    @classmethod
    def from_dense(cls: type[_Layer], W: Any, b: Any = None, grid: Optional[ProcessGrid] = None,
                   **options: Any) -> _Layer:
        """A layer holding this rank's slices of the global ``W`` (K, N) and ``b`` (N,), which
        every rank passes whole. ``dtype`` defaults to ``W``'s. Collective."""
        shape = getattr(W, "shape", None)  # a bad W is reported collectively by __init__
        k, n = shape if shape is not None and len(shape) == 2 else (0, 0)
        options.setdefault("dtype", dtype_name(getattr(W, "dtype", "float32")))
        return cls(k, n, grid=grid, bias=b is not None, _dense=(W, b), **options)

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def forward(self, x: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def _enter(self, a: Array, *, keep: bool = False) -> Array:
        """:func:`enter_array` of input ``a``; with ``keep`` (backward reads it) into the
        layer's own copy unless :attr:`copy_input` is False. Local."""
        if keep and self.copy_input:
            self._kept = enter_array(self.backend.xp, a, self._kept, keep=True)
            return self._kept
        return enter_array(self.backend.xp, a)

    def _partial(self, shape: tuple[int, ...]) -> Array:
        """A new array for partial sums that the ranks add up: :attr:`partial_dtype` (float32
        for 2-byte floats, else the layer's dtype)."""
        return self.backend.xp.empty(shape, dtype=self.partial_dtype)

    def _rounded(self, a: Array) -> Array:
        """``a`` (reduced partial sums) in the layer's dtype: rounded once (itself when it
        has the dtype already)."""
        return a if a.dtype == self.dtype else a.astype(self.dtype)

    @property
    def _saved_input(self) -> Array:
        """The input that forward saved (backward's agreement has checked that there is one)."""
        assert self._x is not None
        return self._x

    def config(self) -> dict[str, Any]:
        """Constructor keywords that rebuild this layer (less ``grid`` and ``backend``)."""
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None, dtype=self.dtype.name, seed=self.seed,
                    check_finite=self.check_finite, check_replicated=self.check_replicated,
                    **self.options)

    def parameter_layouts(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``name -> (global shape, layout)`` of each parameter of :meth:`parameters`."""
        out: dict[str, tuple[tuple[int, ...], str]] = {
            "weight": ((self.in_features, self.out_features), self.layouts.weight)}
        if self.bias is not None:
            out["bias"] = ((self.out_features,), self.layouts.bias)
        return out

    def gather_weight(self) -> Array:
        """The global W (K, N) on every rank. Collective (tests/debugging only)."""
        return agreed_gather(self.weight, self.grid, self.layouts.weight,
                             (self.in_features, self.out_features), self._call("gather_weight"))

    def gather_bias(self) -> Optional[Array]:
        """The global b (N,) on every rank, or None. Collective (unless there is no bias)."""
        if self.bias is None:
            return None
        return agreed_gather(self.bias, self.grid, self.layouts.bias, (self.out_features,),
                             self._call("gather_bias"))

    # ---- call-order agreement

    def _call(self, op: str) -> Same:
        """The ``call`` value agreed with operation ``op`` (counted on every rank); an agreement
        still held from an earlier operation is completed first."""
        self._pending.settle()
        self._ops += 1
        text = self._op_texts.get(op)
        if text is None:
            text = self._op_texts[op] = Text(f"{self.identity} {op}()")
        return Same(Counted(text, self._ops), CALL_ORDER)

    def _width(self, layout: str, n: int) -> int:
        """Columns this rank holds of an (M, n) array in ``layout``."""
        return local_shape((0, n), self.grid, layout)[1]

    def _replicated(self, name: str) -> bool:
        """True when input ``name`` ("x" or "dy") must be the same on every rank: its declared
        layout (x's, or y's for dy) is replicated."""
        return (self.layouts.x if name == "x" else self.layouts.y) == "replicated"

    # ---- input validation shared by forward/backward of all layers
    def _agree_input(self, name: str, a: Array, want_cols: int, *, backward: bool = False,
                     split_rows: bool = False) -> int:
        """Collectively check that ``a`` is a 2D array of this backend and dtype with
        ``want_cols`` columns and the same number of rows on every rank (for ``backward``,
        the forward input's), or with ``split_rows`` this rank's block of the rows (layout
        "rows", see :meth:`_agree_row_blocks`). Returns the global row count M and, in forward,
        keeps it for backward. One small Iallreduce (:meth:`_agree_call`), completed by the
        operation's first product or collective; with ``split_rows`` completed here, then an
        Allgather of the row counts."""
        shape = getattr(a, "shape", None)
        rows = shape[0] if shape else None

        def local_checks() -> None:
            self._check_array(name, a, backward=backward)
            if a.shape[1] != want_cols:
                raise ValueError(f"{name}.shape={tuple(a.shape)}: expected {want_cols} columns")
            if backward and not split_rows and a.shape[0] != self._rows:
                raise ValueError(f"{name}.shape={tuple(a.shape)}: expected {self._rows} "
                                 "rows (the forward input's)")

        self._agree_call(local_checks, name, a, backward,
                         **({} if split_rows else {f"{name}.shape[0]": rows}))
        assert rows is not None  # else local_checks raised on this rank and the agreement
        if split_rows:
            self._pending.settle()
            rows = self._agree_row_blocks(name, rows, backward)
        if not backward:
            self._rows = rows
        return rows

    def _agree_row_blocks(self, name: str, rows: int, backward: bool) -> int:
        """The global row count of an input in layout "rows" whose ranks hold ``rows`` rows
        each: an Allgather of the counts, after the agreement (so all ranks are in the same
        operation), then the same ValueError on every rank unless they are the block partition
        of their sum (and, for ``backward``, that sum is the forward input's)."""
        size = self.comm.Get_size()
        every = np.empty(size, dtype=np.int64)
        self.comm.Allgather(np.array([rows], dtype=np.int64), every)
        counts, total = tuple(int(c) for c in every), int(every.sum())
        want = tuple(block_sizes(total, size))
        if counts != want:
            raise ValueError(f"{name} rows per rank {counts}: expected {want}, the block "
                             f"partition of the {total} rows in layout 'rows' over {size} ranks")
        if backward and total != self._rows:
            raise ValueError(f"{name}: {total} rows in all (rows per rank {counts}): expected "
                             f"{self._rows} rows in all (the forward input's)")
        return total

    def _agree_call(self, local_checks: Callable[[], None], name: str, a: Array, backward: bool,
                    **values: Any) -> None:
        """Start the agreement of one forward/backward (held in ``self._pending`` until the
        operation's first product or collective): ``local_checks`` and ``values`` (see
        :func:`tpmpi.core.agreement.start_checks`) plus the call (layer and operation), an
        earlier local failure and, with ``check_replicated``, the checksum of a replicated
        input. One Iallreduce; a rank whose checks failed raises here, after it."""
        failed, self._pending.failed = self._pending.failed, None

        def checks() -> None:
            if failed:
                raise ValueError(f"an earlier operation of {self.identity} failed on this rank "
                                 f"after its collectives had started ({failed}), so its results "
                                 "differ across ranks: rebuild or reload the layer")
            local_checks()

        call = self._call("backward" if backward else "forward")
        if self.check_replicated and self._replicated(name) and self.backend.owns(a):
            values[name] = Same(array_checksum(self.backend, a), REPLICATED.format(name=name))
        self._pending.hold(start_checks(self.comm, checks, call=call, **values))

    def _check_array(self, name: str, a: Any, *, backward: bool = False) -> None:
        """Local part of the input checks: forward() ran (for ``backward``), ``a`` is a 2D array
        of this layer's backend and dtype (and finite, with ``check_finite``). Raises
        ValueError."""
        if backward and self._x is None:
            raise ValueError("backward() called before forward(): no saved input")
        if not self.backend.owns(a):
            raise ValueError(f"{name} is a {type(a).__module__}.{type(a).__name__}: expected "
                             f"a {self.backend.name} array (the layer's backend)")
        check_plain_array(name, a)
        if a.ndim != 2:
            raise ValueError(f"{name}.shape={tuple(a.shape)}: expected a 2D array")
        if a.dtype != self.dtype:
            order = " in this machine's byte order" if a.dtype.name == self.dtype.name else ""
            raise ValueError(f"{name}.dtype={dtype_label(a.dtype)}: expected "
                             f"{self.dtype.name}{order} (the layer's dtype)")
        if self.check_finite:
            bad = int(a.size - int(self.backend.xp.isfinite(a).sum()))
            if bad:
                raise ValueError(f"{name} has {bad} non-finite value(s) (NaN/Inf) "
                                 "[check_finite=True]")
