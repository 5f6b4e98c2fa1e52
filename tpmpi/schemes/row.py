"""Scheme "row": RowParallelLinear, X replicated (input_is_parallel=False), Y replicated."""
from __future__ import annotations


from ..backend import Backend
from ..grid import ProcessGrid
from ..init import init_weight
from ..layers import RowParallelLinear
from . import Case, Problem, collective_rel_err, host64, register, shard_pairs
from .column import DY_SEED, X_SEED


class RowCase(Case):
    """X (m, k) and dY (m, n) replicated; ``verify`` compares with a serial float64 product of
    the gathered global W (verification only materialises it)."""

    def __init__(self, problem: Problem, grid: ProcessGrid, backend: Backend):
        p = self.problem = problem
        self.comm, self.backend = grid.comm, backend
        self.layer = RowParallelLinear(p.k, p.n, grid=grid, dtype=p.dtype, backend=backend,
                                       **p.opts)
        self.x = init_weight((p.m, p.k), X_SEED, p.dtype, backend=backend, bound=1.0)
        self.dy = init_weight((p.m, p.n), DY_SEED, p.dtype, backend=backend, bound=1.0)
        self.flops = 2.0 * p.m * p.k * p.n
        self.profilers = [self.layer.profiler]

    def forward(self) -> None:
        self.y = self.layer(self.x)

    def backward(self) -> None:
        self.dx = self.layer.backward(self.dy)

    def verify(self) -> float:
        layer, be = self.layer, self.backend
        layer.zero_grad()
        self.forward()
        self.backward()
        w, b = host64(be, layer.gather_weight()), host64(be, layer.gather_bias())
        x, dy = host64(be, self.x), host64(be, self.dy)
        y_ref = x @ w + (b if b is not None else 0)
        grads = {"weight": x.T @ dy, "bias": dy.sum(axis=0)}
        pairs = [(self.y, y_ref), (self.dx, dy @ w.T)] + shard_pairs(layer, grads)
        return collective_rel_err(self.comm, pairs)


@register("row")
def build_row(problem: Problem, grid: ProcessGrid, backend: Backend) -> RowCase:
    return RowCase(problem, grid, backend)
