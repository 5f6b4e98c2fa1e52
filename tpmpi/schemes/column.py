"""Scheme "column": ColumnParallelLinear with its output gathered (the book's scheme)."""
from __future__ import annotations

import numpy as np

from ..backend import Backend
from ..comm import allreduce
from ..grid import ProcessGrid
from ..init import init_weight
from ..layers import ColumnParallelLinear
from . import Case, Problem, collective_rel_err, register

X_SEED, DY_SEED = 1001, 1002


class ColumnCase(Case):
    """X (m, k) and dY (m, n) replicated, from the layout-invariant initialiser."""

    def __init__(self, problem: Problem, grid: ProcessGrid, backend: Backend):
        p = self.problem = problem
        self.comm = grid.comm
        self.layer = ColumnParallelLinear(p.k, p.n, grid=grid, dtype=p.dtype, backend=backend,
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
        """Each rank checks the columns it owns; dX's reference partial sums are reduced in
        float64."""
        layer, host = self.layer, self.layer.backend.to_host
        layer.zero_grad()
        self.forward()
        self.backward()
        cols = layer.shard[1]
        x, w, dy = (host(a).astype(np.float64) for a in (self.x, layer.weight, self.dy))
        dy_p = dy[:, cols]
        y_ref = x @ w + (host(layer.bias).astype(np.float64) if layer.bias is not None else 0)
        dx_ref = allreduce(dy_p @ w.T, self.comm)
        pairs = [(host(self.y)[:, cols], y_ref), (self.dx, dx_ref),
                 (layer.grad_weight, x.T @ dy_p)]
        if layer.bias is not None:
            pairs.append((layer.grad_bias, dy_p.sum(axis=0)))
        return collective_rel_err(self.comm, pairs)


@register("column")
def build_column(problem: Problem, grid: ProcessGrid, backend: Backend) -> ColumnCase:
    return ColumnCase(problem, grid, backend)
