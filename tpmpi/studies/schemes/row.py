"""Scheme "row": RowParallelLinear, X replicated (input_is_parallel=False), Y replicated."""
from __future__ import annotations

from ...core.backend import Backend
from ...core.grid import ProcessGrid
from ...layers import RowParallelLinear
from ..problem import Problem
from .base import LayerCase, bias64, collective_rel_err, host64, shard_pairs


class RowCase(LayerCase):
    """X (m, k) and dY (m, n) replicated; ``verify`` compares with a serial float64 product of
    the gathered global W (verification only materialises it)."""

    def __init__(self, problem: Problem, grid: ProcessGrid, backend: Backend):
        p = problem
        layer = RowParallelLinear(p.k, p.n, grid=grid, dtype=p.dtype, backend=backend, **p.opts)
        super().__init__(p, grid, backend, layer, n_out=p.n, flops=2.0 * p.m * p.k * p.n)

    def verify(self) -> float:
        layer, be = self.layer, self.backend
        self.fresh_step()
        w, b = host64(be, layer.gather_weight()), bias64(be, layer.gather_bias())
        x, dy = host64(be, self.x), host64(be, self.dy)
        y_ref = x @ w + b
        grads = {"weight": x.T @ dy, "bias": dy.sum(axis=0)}
        pairs = [(self.y, y_ref), (self.dx, dy @ w.T)] + shard_pairs(layer, grads)
        return collective_rel_err(self.comm, pairs)
