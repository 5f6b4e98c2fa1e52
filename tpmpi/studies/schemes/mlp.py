"""Scheme "mlp": the FFN sub-layer ParallelMLP (options ``mode``, ``activation``), d_model =
``k`` (``n`` must equal ``k``), d_hidden = ``hidden`` (default 4k). X and dY are in the mode's
layout (replicated; rows for "sequence"; tiles for "tile2d")."""
from __future__ import annotations

from typing import Callable, Optional

from ...core.backend import Backend
from ...core.grid import ProcessGrid
from ...core.init import init_weight
from ...core.layout import scatter
from ...layers import ParallelMLP
from ...layers.activations import get_activation
from ..problem import Problem
from .base import LayerCase, bias64, collective_rel_err, host64, inputs, shard_pairs


class MLPCase(LayerCase):
    """X and dY (m, d_model) in the mode's layout; ``verify`` runs the serial float64 FFN on
    the global inputs and gathered weights and compares this rank's blocks of the output and
    dX and its shards of the four parameter gradients."""

    def __init__(self, problem: Problem, grid: ProcessGrid, backend: Backend):
        p = self.problem = problem
        if p.n != p.k:
            raise ValueError(f"n={p.n}: scheme 'mlp' maps d_model={p.k} to itself; pass "
                             f"--n {p.k} (or leave --n and --k equal)")
        self.mlp = ParallelMLP(p.k, p.d_hidden, grid=grid, dtype=p.dtype, backend=backend,
                               **p.opts)
        super().__init__(p, grid, backend, self.mlp, n_out=p.k,
                         flops=4.0 * p.m * p.k * p.d_hidden)

    def serial(self, backend: Backend) -> Callable[..., None]:
        """Serial FFN forward (+ backward with ``step(backward)``, None: the problem's) on one
        process with the global weights and biases (the bare products of the layer)."""
        p, xp = self.problem, backend.xp
        h = p.d_hidden
        act, act_grad = get_activation(self.mlp.activation)
        x, dy = inputs(p, p.k, backend)
        w1, w2 = (init_weight(s, seed, p.dtype, backend=backend)
                  for s, seed in (((p.k, h), 0), ((h, p.k), 1)))
        b1, b2 = (init_weight((n,), seed, p.dtype, backend=backend, stream=1)
                  for n, seed in ((h, 0), (p.k, 1)))

        def step(backward: Optional[bool] = None) -> None:
            pre = xp.matmul(x, w1) + b1
            a = act(pre)
            xp.matmul(a, w2) + b2
            if p.backward if backward is None else backward:
                dpre = xp.matmul(dy, w2.T) * act_grad(pre)
                xp.matmul(a.T, dy), xp.matmul(dpre, w1.T), xp.matmul(x.T, dpre)
                dy.sum(0), dpre.sum(0)
            backend.synchronize()
        return step

    def verify(self) -> float:
        mlp, be = self.mlp, self.backend
        self.fresh_step()
        act, act_grad = get_activation(mlp.activation)
        w1, w2 = host64(be, mlp.fc1.gather_weight()), host64(be, mlp.fc2.gather_weight())
        b1, b2 = bias64(be, mlp.fc1.gather_bias()), bias64(be, mlp.fc2.gather_bias())
        x, dy = (a.astype("float64") for a in inputs(self.problem, self.problem.k))
        pre = x @ w1 + b1
        a = act(pre)
        y_ref = a @ w2 + b2
        dpre = (dy @ w2.T) * act_grad(pre)
        pairs = [(self.y, scatter(y_ref, self.grid, mlp.layouts.y)),
                 (self.dx, scatter(dpre @ w1.T, self.grid, mlp.layouts.x))]
        pairs += shard_pairs(mlp.fc1, {"weight": x.T @ dpre, "bias": dpre.sum(axis=0)})
        pairs += shard_pairs(mlp.fc2, {"weight": a.T @ dy, "bias": dy.sum(axis=0)})
        return collective_rel_err(self.comm, pairs)
