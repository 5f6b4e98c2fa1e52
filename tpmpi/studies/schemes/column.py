"""Scheme "column": ColumnParallelLinear with its output gathered (the book's scheme); option
``chunks`` (level-2 pipelining of the gather)."""
from __future__ import annotations

import numpy as np

from ...core.backend import Backend
from ...core.comm import allreduce
from ...core.grid import ProcessGrid
from ...layers import ColumnParallelLinear
from ..problem import Problem
from .base import LayerCase, collective_rel_err


class ColumnCase(LayerCase):
    """X (m, k) and dY (m, n) replicated."""

    def __init__(self, problem: Problem, grid: ProcessGrid, backend: Backend):
        p = problem
        layer = ColumnParallelLinear(p.k, p.n, grid=grid, dtype=p.dtype, backend=backend,
                                     **p.opts)
        super().__init__(p, grid, backend, layer, n_out=p.n, flops=2.0 * p.m * p.k * p.n)

    def verify(self) -> float:
        """Each rank checks the columns it owns (nothing global is materialised); dX's
        reference partial sums are reduced in float64."""
        layer, host = self.layer, self.backend.to_host
        self.fresh_step()
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
