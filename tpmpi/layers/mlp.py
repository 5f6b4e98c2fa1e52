"""The tensor-parallel FFN sub-layer ``Y = act(X W1 + b1) W2 + b2``.

``X`` (M, d_model) replicated -> ``Y`` (M, d_model) replicated; ``W1`` (d_model, d_hidden),
``W2`` (d_hidden, d_model).

mode "megatron": ``fc1`` column-parallel without gather -> ``act`` on the local (M, h_p) block
    -> ``fc2`` row-parallel with ``input_is_parallel``: one Allreduce forward (in fc2), one
    backward (dX of fc1, overlapped with fc1's dW GEMM).
mode "book": the textbook's literal scheme, both layers column-parallel with the output
    all-gathered (Alltoallw) after each GEMM; ``act`` runs on the replicated (M, d_hidden)
    hidden activation; backward needs an Allreduce of dH (fc2) and of dX (fc1).
"""
from __future__ import annotations

from typing import Any, Optional

from ..activations import get_activation
from ..comm import CALL_ORDER, Same, Text, check
from ..dtypes import dtype_name
from ..grid import ProcessGrid, default_grid
from .base import check_dense
from .column import ColumnParallelLinear
from .row import RowParallelLinear

MODES = ("megatron", "book")


class ParallelMLP:
    """Two parallel linear layers around an element-wise activation (see the module docstring).

    ``fc1`` / ``fc2`` are the sub-layers (``fc2`` is a RowParallelLinear in mode "megatron", a
    ColumnParallelLinear in mode "book"). Built from ``seed``, ``fc1`` uses ``seed`` and ``fc2``
    ``seed + 1``. Construction is collective; ``overlap``, ``check_finite`` and
    ``check_replicated`` are passed to both layers (the replicated inputs checked are x and dy).
    """

    def __init__(self, d_model: int, d_hidden: int, *, grid: Optional[ProcessGrid] = None,
                 activation: str = "gelu", mode: str = "megatron", bias: bool = True,
                 dtype="float32", seed: int = 0, backend="auto", overlap: bool = True,
                 check_finite: bool = False, check_replicated: bool = False, _dense=None):
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

        check(grid.comm, local_checks, call=Same(Text("construction of a ParallelMLP"),
                                                  CALL_ORDER), activation=activation, mode=mode)
        self.grid, self.mode, self.activation = grid, mode, activation
        self._act, self._act_grad = get_activation(activation)
        common = dict(grid=grid, bias=bias, dtype=dtype, backend=backend, overlap=overlap,
                      check_finite=check_finite, check_replicated=check_replicated)
        dense1, dense2 = _dense if _dense is not None else (None, None)
        self.fc1 = ColumnParallelLinear(d_model, d_hidden, gather_output=mode == "book",
                                        seed=seed, _dense=dense1, **common)
        if mode == "megatron":
            self.fc2 = RowParallelLinear(d_hidden, d_model, input_is_parallel=True,
                                         seed=seed + 1, _dense=dense2, **common)
        else:
            self.fc2 = ColumnParallelLinear(d_hidden, d_model, gather_output=True,
                                            seed=seed + 1, _dense=dense2, **common)
        self.d_model, self.d_hidden = self.fc1.in_features, self.fc1.out_features
        self.seed, self.overlap = seed, bool(overlap)
        self._pre = None

    def config(self) -> dict[str, Any]:
        """Constructor keywords that rebuild this MLP (less ``grid`` and ``backend``), as saved
        in checkpoints."""
        return dict(d_model=self.d_model, d_hidden=self.d_hidden, activation=self.activation,
                    mode=self.mode, bias=self.fc1.bias is not None, dtype=self.fc1.dtype.name,
                    seed=self.seed, overlap=self.overlap, check_finite=self.fc1.check_finite,
                    check_replicated=self.fc1.check_replicated)

    @classmethod
    def load_checkpoint(cls, path: str, grid: Optional[ProcessGrid] = None, **options: Any):
        """An MLP from the checkpoint directory ``path`` re-sharded onto ``grid`` (any size);
        ``options`` override saved ones. Collective (:func:`tpmpi.checkpoint.load_checkpoint`)."""
        from ..checkpoint import load_checkpoint

        return load_checkpoint(path, grid=grid, cls=cls, **options)

    @classmethod
    def from_dense(cls, W1, b1, W2, b2, grid: Optional[ProcessGrid] = None, **options: Any):
        """An MLP holding this rank's slices of the global ``W1`` (d_model, d_hidden), ``b1``
        (d_hidden,), ``W2`` (d_hidden, d_model), ``b2`` (d_model,), passed whole on every rank
        (biases both or neither None). ``dtype`` defaults to ``W1``'s. Collective."""
        shape = getattr(W1, "shape", None)  # a bad W1 is reported collectively by fc1
        d_model, d_hidden = shape if shape is not None and len(shape) == 2 else (0, 0)
        options.setdefault("dtype", dtype_name(getattr(W1, "dtype", "float32")))
        return cls(d_model, d_hidden, grid=grid, bias=b1 is not None,
                   _dense=((W1, b1), (W2, b2)), **options)

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """``x`` (M, d_model) replicated -> ``y`` (M, d_model) replicated."""
        pre = self.fc1.forward(x)
        y = self.fc2.forward(self._act(pre) if self._computes() else pre)
        self._pre = pre
        return y

    def backward(self, dy):
        """``dy`` (M, d_model) replicated -> ``dx`` (M, d_model) replicated; accumulates the
        gradients of all four parameters."""
        dh = self.fc2.backward(dy)
        return self.fc1.backward(dh * self._act_grad(self._pre) if self._computes() else dh)

    def _computes(self) -> bool:
        """False while an overlap measurement runs the collectives alone (then the activation
        is skipped like the GEMMs; see :func:`tpmpi.overlap.measure_overlap`)."""
        return self.fc1.profiler.runs("gemm")

    def zero_grad(self) -> None:
        """Reset accumulated gradients of both layers."""
        self.fc1.zero_grad()
        self.fc2.zero_grad()

    def parameters(self) -> list[tuple[str, Any, Any]]:
        """``(name, local parameter, local gradient)``: ``fc1.weight``, ``fc1.bias``, ..."""
        return [(f"{name}.{p}", value, grad) for name, layer in (("fc1", self.fc1),
                                                                 ("fc2", self.fc2))
                for p, value, grad in layer.parameters()]
