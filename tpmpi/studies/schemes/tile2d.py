"""Scheme "tile2d": TileParallelLinear (SUMMA) on the ``--grid RxC`` grid, option ``panel``;
X, dY and Y in layout "tiles". The requested panel width is rounded to the device's tile
multiple (:func:`tpmpi.core.tiling.round_size`: 128 on a GPU, 64 on a CPU) so that no panel GEMM
pays for a partial tile; the layer API itself takes any width."""
from __future__ import annotations

import dataclasses

from ...core.backend import Backend
from ...core.grid import ProcessGrid
from ...core.layout import gather, local_slices
from ...core.tiling import multiple_for, round_size
from ...layers import TileParallelLinear
from ..problem import Problem
from .base import LayerCase, bias64, collective_rel_err, host64, inputs, shard_pairs


class TileCase(LayerCase):
    """Each rank generates only its X and dY tiles; ``verify`` gathers Y and the global W and
    compares with the serial float64 product."""

    def __init__(self, problem: Problem, grid: ProcessGrid, backend: Backend):
        p, opts = problem, dict(problem.opts)
        if opts.get("panel"):
            opts["panel"] = round_size(opts["panel"], max(p.k, 1), multiple_for(backend.is_gpu))
        layer = TileParallelLinear(p.k, p.n, grid=grid, dtype=p.dtype, backend=backend, **opts)
        p = dataclasses.replace(p, options=tuple(sorted(opts.items())))  # the panel in effect
        super().__init__(p, grid, backend, layer, n_out=p.n, flops=2.0 * p.m * p.k * p.n)

    def verify(self) -> float:
        p, layer, be = self.problem, self.layer, self.backend
        self.fresh_step()
        w, b = host64(be, layer.gather_weight()), bias64(be, layer.gather_bias())
        x, dy = (host64(be, a) for a in inputs(p, p.n))
        y = gather(self.y, self.grid, "tiles", (p.m, p.n))
        y_ref = x @ w + b
        dx_ref = (dy @ w.T)[local_slices((p.m, p.k), self.grid, "tiles")]
        pairs = [(y, y_ref), (self.dx, dx_ref)]
        pairs += shard_pairs(layer, {"weight": x.T @ dy, "bias": dy.sum(axis=0)})
        return collective_rel_err(self.comm, pairs)
