"""The tensor-parallel FFN sub-layer ``Y = act(X W1 + b1) W2 + b2``.

``X`` (M, d_model) -> ``Y`` (M, d_model); ``W1`` (d_model, d_hidden), ``W2`` (d_hidden,
d_model). Every mode holds the same global parameters (the same seeds give the same W1, b1,
W2, b2) and computes the same function; they differ in layouts and communication, which are
compositions of the paired operators of :mod:`tpmpi.core.mappings` (forward shown; backward applies
the adjoints in reverse order):

mode "megatron" (x, y replicated): ``Copy -> fc1 -> act -> fc2 -> AllReduce``. ``fc1``
    column-parallel without gather, ``act`` on the local (M, h_p) block, ``fc2`` row-parallel
    with ``input_is_parallel``: one Allreduce forward, one backward (dX of fc1, overlapped with
    fc1's dW GEMM).
mode "book" (x, y replicated): ``Copy -> fc1 -> GatherCols -> act -> Copy -> fc2 ->
    GatherCols``, the textbook's literal scheme: both layers column-parallel with the output
    all-gathered (Alltoallw) after each GEMM; ``act`` runs on the replicated (M, d_hidden)
    hidden activation; backward needs an Allreduce of dH (fc2) and of dX (fc1).
mode "sequence" (x, y in layout "rows": rank p holds block p of the M rows): ``GatherRows ->
    fc1 -> act -> fc2 -> ReduceScatterRows``, Megatron's sequence parallelism. Forward:
    Allgather of the rows, Reduce_scatter of the output; backward: Allgather of dY, then the
    rows of X gathered again during the dX GEMM and dX reduce-scattered during the dW GEMM.
    The same bytes as "megatron" (a ring Allreduce is a Reduce_scatter + an Allgather) plus the
    re-gather of X, while the block's input and output take 1/P of the memory per rank.
mode "tile2d" (x, y in layout "tiles" of a 2D grid): two :class:`TileParallelLinear` layers
    (SUMMA; fc1's output tiles are fc2's input tiles, ``act`` on the (m_r, h_c) tile). This is
    what a 2D TP grid means for the FFN; the other modes use ``grid.comm`` as one 1D group
    whatever the grid's shape.

``grad_ready`` holds callbacks run with each sub-layer as soon as its gradients are final
during backward (fc2 first): :class:`tpmpi.DataParallel` starts averaging them there, under
fc1's backward GEMMs. :meth:`ParallelMLP.schedule_for` chains fc1's schedule, the activation
and fc2's schedule (backward in reverse): the MLP's prediction needs nothing of its own.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

from ..core.agreement import CALL_ORDER, Same, Text, agree_checks
from ..core.arrays import Array, DTypeLike
from ..core.backend import Backend
from ..core.dtypes import dtype_name, resolve_dtype
from ..core.gemm import LocalWork
from ..core.grid import ProcessGrid, default_grid
from ..core.layout import Layouts
from ..core.schedule import Pointwise, Schedule, chain
from .activations import get_activation
from .base import ParallelLinear, check_dense
from .column import ColumnParallelLinear
from .linear_schedule import block_shape, grid_shape
from .module import Composite
from .row import RowParallelLinear
from .tile2d import TileParallelLinear

MODES = ("megatron", "book", "sequence", "tile2d")

SubLayer = tuple[type[ParallelLinear], dict[str, Any]]  # (class, layout options) of fc1 or fc2


class ParallelMLP(Composite):
    """Two parallel linear layers around an element-wise activation (see the module docstring).

    ``fc1`` / ``fc2`` are the sub-layers (``fc2`` is a RowParallelLinear in modes "megatron"
    and "sequence", a ColumnParallelLinear in mode "book", both are TileParallelLinear in mode
    "tile2d"). Built from ``seed``, ``fc1`` uses ``seed`` and ``fc2`` ``seed + 1``.
    Construction is collective; ``overlap``, ``check_finite`` and ``check_replicated`` are
    passed to both layers (the replicated inputs checked are x and dy, in the modes where they
    are replicated). ``layouts``: the layouts of x and y (:meth:`layouts_for`).
    """

    def __init__(self, d_model: int, d_hidden: int, *, grid: Optional[ProcessGrid] = None,
                 activation: str = "gelu", mode: str = "megatron", bias: bool = True,
                 dtype: DTypeLike = "float32", seed: int = 0, backend: str | Backend = "auto",
                 overlap: bool = True, check_finite: bool = False, check_replicated: bool = False,
                 _dense: Optional[tuple[tuple[Any, Any], tuple[Any, Any]]] = None) -> None:
        grid = grid if grid is not None else default_grid()

        def local_checks() -> None:
            get_activation(activation)
            if mode not in MODES:
                raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
            if _dense is not None:
                (W1, b1), (W2, b2) = _dense
                check_dense(W1, b1, d_model, d_hidden, ("W1", "b1"))
                check_dense(W2, b2, d_hidden, d_model, ("W2", "b2"))
                if (b1 is None) != (b2 is None):
                    raise ValueError("b1 and b2: pass both or neither")

        agree_checks(grid.comm, local_checks,
                     call=Same(Text("construction of a ParallelMLP"), CALL_ORDER),
                     activation=activation, mode=mode)
        self.grid, self.mode, self.activation = grid, mode, activation
        self.layouts = self.layouts_for(mode)
        self._act, act_grad = get_activation(activation)
        self._act_backward: Callable[[Array, Array], Array] = lambda dh, pre: dh * act_grad(pre)
        common: dict[str, Any] = dict(grid=grid, bias=bias, dtype=dtype, backend=backend,
                                      overlap=overlap, check_finite=check_finite,
                                      check_replicated=check_replicated)
        dense1, dense2 = _dense if _dense is not None else (None, None)
        one = dict(seed=seed, _dense=dense1, **common)
        two = dict(seed=seed + 1, _dense=dense2, **common)
        (cls1, opts1), (cls2, opts2) = self.sublayers(mode)
        self.fc1: ParallelLinear = cls1(d_model, d_hidden, **opts1, **one)
        self.fc2: ParallelLinear = cls2(d_hidden, d_model, **opts2, **two)
        self.fc2.copy_input = False  # its input is this module's activation, never refilled
        self.d_model, self.d_hidden = self.fc1.in_features, self.fc1.out_features
        self.seed, self.overlap = seed, bool(overlap)
        self.local = LocalWork(self.fc1.backend.xp)  # the activation and its gradient
        self.grad_ready: list[Callable[[ParallelLinear], None]] = []
        self._pre: Optional[Array] = None  # fc1's output, saved for the activation's gradient

    @staticmethod
    def sublayers(mode: str) -> tuple[SubLayer, SubLayer]:
        """The class and layout options of fc1 and fc2 in ``mode`` (see the module docstring):
        what the MLP builds, and what its layouts and memory footprint follow from."""
        if mode == "tile2d":
            return (TileParallelLinear, {}), (TileParallelLinear, {})
        if mode == "book":
            return ((ColumnParallelLinear, {"gather_output": True}),
                    (ColumnParallelLinear, {"gather_output": True}))
        sp = mode == "sequence"
        return ((ColumnParallelLinear, {"gather_output": False, "sequence_parallel": sp}),
                (RowParallelLinear, {"input_is_parallel": True, "sequence_parallel": sp}))

    @classmethod
    def layouts_for(cls, mode: str = "megatron", **_: Any) -> Layouts:
        """x in fc1's input layout, y in fc2's output layout (replicated; "rows" in mode
        "sequence", "tiles" in mode "tile2d"). No communication."""
        (cls1, opts1), (cls2, opts2) = cls.sublayers(mode)
        return Layouts(x=cls1.layouts_for(**opts1).x, y=cls2.layouts_for(**opts2).y)

    def config(self) -> dict[str, Any]:
        """Constructor keywords that rebuild this MLP (less ``grid`` and ``backend``), as saved
        in checkpoints."""
        return dict(d_model=self.d_model, d_hidden=self.d_hidden, activation=self.activation,
                    mode=self.mode, bias=self.fc1.bias is not None, dtype=self.fc1.dtype.name,
                    seed=self.seed, overlap=self.overlap, check_finite=self.fc1.check_finite,
                    check_replicated=self.fc1.check_replicated)

    @classmethod
    def from_dense(cls, W1: Any, b1: Any, W2: Any, b2: Any, grid: Optional[ProcessGrid] = None,
                   **options: Any) -> ParallelMLP:
        """An MLP holding this rank's slices of the global ``W1`` (d_model, d_hidden), ``b1``
        (d_hidden,), ``W2`` (d_hidden, d_model), ``b2`` (d_model,), passed whole on every rank
        (biases both or neither None). ``dtype`` defaults to ``W1``'s. Collective."""
        shape = getattr(W1, "shape", None)  # a bad W1 is reported collectively by fc1
        d_model, d_hidden = shape if shape is not None and len(shape) == 2 else (0, 0)
        options.setdefault("dtype", dtype_name(getattr(W1, "dtype", "float32")))
        return cls(d_model, d_hidden, grid=grid, bias=b1 is not None,
                   _dense=((W1, b1), (W2, b2)), **options)

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def children(self) -> list[tuple[str, ParallelLinear]]:
        """The sub-layers in forward order: ``[("fc1", fc1), ("fc2", fc2)]``."""
        return [("fc1", self.fc1), ("fc2", self.fc2)]

    def forward(self, x: Array) -> Array:
        """``x`` (M, d_model) -> ``y`` (M, d_model), both in :attr:`layouts` (replicated, the
        rank's rows, or its tile)."""
        pre = self.fc1.forward(x)
        y = self.fc2.forward(self.local.pointwise(self._act, pre))
        self._pre = pre
        return y

    def backward(self, dy: Array) -> Array:
        """``dy`` -> ``dx`` (M, d_model), both in :attr:`layouts`; accumulates the gradients of
        all four parameters, calling the :attr:`grad_ready` callbacks with fc2, then fc1, as
        soon as each one's gradients are final."""
        dh = self.fc2.backward(dy)
        for ready in self.grad_ready:
            ready(self.fc2)
        assert self._pre is not None  # fc2's agreement checked that forward ran
        dx = self.fc1.backward(self.local.pointwise(self._act_backward, dh, self._pre))
        for ready in self.grad_ready:
            ready(self.fc1)
        return dx

    @classmethod
    def schedule_for(cls, m: int, k: int, n: int, parts: Union[int, tuple[int, int]], *,
                     mode: str = "megatron", hidden: Optional[int] = None,
                     dtype: str = "float32", backward: bool = False, bias: bool = True,
                     overlap: bool = True, staged: bool = False, **_: Any) -> Schedule:
        """fc1's schedule (d_model ``k`` -> ``hidden``, default 4k), the activation on fc1's
        output block, fc2's (``hidden`` -> ``n``, which is d_model), forwards in order and
        backwards reversed (:func:`tpmpi.core.schedule.chain`), steps named ``fc1.*``,
        ``act``, ``fc2.*``. No layer built, no communication."""
        h = hidden if hidden is not None else 4 * k
        (cls1, opts1), (cls2, opts2) = cls.sublayers(mode)
        common: dict[str, Any] = dict(dtype=dtype, backward=backward, bias=bias,
                                      overlap=overlap, staged=staged)
        fc1 = cls1.schedule_for(m, k, h, parts, **common, **opts1).prefixed("fc1")
        fc2 = cls2.schedule_for(m, h, n, parts, **common, **opts2).prefixed("fc2")
        pre = math.prod(block_shape((m, h), grid_shape(parts), cls1.layouts_for(**opts1).y)) \
            * resolve_dtype(dtype).itemsize
        act = Schedule((Pointwise("act", 2 * pre, dtype),),
                       (Pointwise("act_grad", 3 * pre, dtype),) if backward else (), 0, pre)
        return chain([fc1, act, fc2])

    def schedule(self, m: int, *, backward: bool = True) -> Schedule:
        """:meth:`schedule_for` this MLP (its sizes, mode, dtype, grid and staging) on a global
        input of ``m`` rows."""
        return self.schedule_for(m, self.d_model, self.d_model, self.grid.shape, mode=self.mode,
                                 hidden=self.d_hidden, dtype=self.fc1.dtype.name,
                                 backward=backward, bias=self.fc1.bias is not None,
                                 overlap=self.overlap, staged=self.fc1.staging.staged)
