"""Schemes "attention", "block" and "gpt": :class:`~tpmpi.ParallelAttention`,
:class:`~tpmpi.layers.block.TransformerBlock` and :class:`tpmpi.models.GPT` on a TP grid or a
dp x tp mesh (sizes: :mod:`tpmpi.studies.transformer`).

Every rank draws the same float64 state dict (torch shapes, a seeded generator) and builds
the layer from it in the problem's dtype. Inputs: the attention and the block take X (N, d)
and dY (N, d) from the layout-invariant initialiser, each rank generating only its rows (its
replica's samples; under sequence parallelism its block of them); the GPT takes token ids and
targets of its replica. One step is a training forward and backward without dropout.

``verify`` runs the bare float64 code of :mod:`tpmpi.studies.baregpt` on the global batch and
compares this rank's rows of the output and dX (the GPT: the loss) and its block of every
parameter gradient (each checkpoint piece's block of the rank, :mod:`tpmpi.checkpoint.params`);
under a mesh the gradients are the replicas' mean, i.e. the global batch's gradient with dY
divided by ``dp`` (the GPT's loss is the mean over the global batch already).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np

from ...checkpoint.params import params_of
from ...core.backend import Backend
from ...core.grid import ProcessGrid
from ...core.mesh import Mesh
from ...core.partition import block_range
from ...layers.attention import ParallelAttention
from ...layers.block import DropoutCall, TransformerBlock
from ...layers.data_parallel import DataParallel
from ...layers.leaf import PartialGrads
from ...layers.module import modules, named_layers
from ...models.config import GPTConfig, state_dict_shapes
from ...models.gpt import GPT
from .. import baregpt
from ..problem import Problem
from ..transformer import batch_of, config_of, model_flops, sequence_parallel
from .base import Case, collective_rel_err, inputs

SD_SEED = 1003  # seed of the study's state dict
_LINEAR = ("c_attn.weight", "c_proj.weight", "c_fc.weight")


def study_state_dict(cfg: GPTConfig, scheme: str) -> dict[str, np.ndarray]:
    """The float64 state dict the scheme's layer is built from (torch shapes): weights
    ``N(0, 0.02)``, LayerNorm weights ``1 + N(0, 0.1)``, biases ``N(0, 0.02)``; for
    "attention" the ``attn.*`` keys of block 0 without the prefix, for "block" block 0's
    keys, for "gpt" every key (``lm_head.weight`` the tied ``transformer.wte.weight``)."""
    rng = np.random.default_rng(SD_SEED)
    sd: dict[str, np.ndarray] = {}
    for key, shape in state_dict_shapes(cfg).items():
        if key == "lm_head.weight":
            continue
        noise = rng.standard_normal(shape)
        sd[key] = 1.0 + 0.1 * noise if "ln" in key and key.endswith("weight") else 0.02 * noise
    if scheme == "gpt":
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
        return sd
    prefix = "transformer.h.0." + ("attn." if scheme == "attention" else "")
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _pieces(grads: dict[str, Any]) -> dict[str, Any]:
    """Torch-shaped gradients keyed as the state dict -> the layers' checkpoint pieces
    (``(in, out)`` linear weights, the fused QKV split into its ``.q``, ``.k``, ``.v``)."""
    out: dict[str, Any] = {}
    for key, g in grads.items():
        if not key.endswith(("c_attn.weight", "c_attn.bias")):
            out[key] = g.T if key.endswith(_LINEAR) else g
    return out


def _qkv_pieces(grads: dict[str, Any], cfg: GPTConfig) -> dict[str, Any]:
    """The ``.q``, ``.k``, ``.v`` pieces of every fused QKV gradient in ``grads``."""
    out: dict[str, Any] = {}
    hd = cfg.head_size
    cuts = (0, cfg.n_head * hd, (cfg.n_head + cfg.n_kv_head) * hd,
            (cfg.n_head + 2 * cfg.n_kv_head) * hd)
    for key, g in grads.items():
        if key.endswith(("c_attn.weight", "c_attn.bias")):
            for part, a, b in zip("qkv", cuts, cuts[1:]):
                out[f"{key}.{part}"] = g[a:b].T if g.ndim == 2 else g[a:b]
    return out


class TransformerCase(Case):
    """The layer of a transformer scheme on a grid or a mesh (see the module docstring);
    ``module`` the layer (the GPT itself for "gpt")."""

    def __init__(self, problem: Problem, where: Union[ProcessGrid, Mesh], backend: Backend
                 ) -> None:
        p = self.problem = problem
        self.mesh = where if isinstance(where, Mesh) else None
        grid = self.mesh.tp if self.mesh is not None else where
        assert isinstance(grid, ProcessGrid)
        self.grid: ProcessGrid = grid
        self.comm = self.mesh.comm if self.mesh is not None else self.grid.comm
        self.cfg, self.batch = config_of(p), batch_of(p)
        dp, replica = (self.mesh.dp, self.mesh.dp_rank) if self.mesh is not None else (1, 0)
        if self.batch % dp:
            raise ValueError(f"--m {p.m}: the batch m / seq = {self.batch} must be a multiple "
                             f"of --dp {dp} (each replica takes whole sequences)")
        self.sp, self.dp = sequence_parallel(p), dp
        self.local_batch = self.batch // dp
        self.sample0 = replica * self.local_batch
        n = self.local_batch * (p.seq or 1)
        self.rows = block_range(n, self.grid.size, self.grid.comm.Get_rank()) if self.sp \
            else (0, n)
        self.sd = study_state_dict(self.cfg, p.scheme)
        self.flops = model_flops(p)
        self.backend = backend
        self.data_parallel: Optional[DataParallel] = None
        self.module: Any = None
        self._build(backend)
        self.layers = [m for m in modules(self.module) if hasattr(m, "staging")]

    def _build(self, backend: Backend) -> None:
        p, cfg, grid = self.problem, self.cfg, self.grid
        if p.scheme == "gpt":
            self.module = GPT.from_state_dict(self.sd, cfg, grid=self.grid, mesh=self.mesh,
                                              sequence_parallel=self.sp, dtype=p.dtype,
                                              backend=backend)
            self.backend = self.module.backend
            rng = np.random.default_rng(X_TOKENS)
            tokens = rng.integers(0, cfg.vocab_size, (2, self.batch, p.seq or 1))
            self.idx_all, self.targets_all = tokens[0], tokens[1]
            mine = slice(self.sample0, self.sample0 + self.local_batch)
            self.idx, self.targets = self.idx_all[mine], self.targets_all[mine]
            return
        common: dict[str, Any] = dict(grid=grid, backend=backend, dtype=p.dtype,
                                      sequence_parallel=self.sp, dense=self.sd)
        self.shares: Optional[PartialGrads] = None
        if p.scheme == "attention":
            self.module = ParallelAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, **common)
            self.backend = self.module.backend
        else:
            block = TransformerBlock(cfg.n_embd, cfg.n_head, cfg.n_kv_head, layer=0, **common)
            self.module, self.backend = block, block.attn.backend
            if self.sp:  # the LayerNorms' gradient shares summed over the group
                self.shares = PartialGrads(block.layer_norms(), grid.comm, None)
        if self.mesh is not None and self.mesh.dp > 1:
            self.data_parallel = DataParallel(self.module, self.mesh)
        first = self.sample0 * (p.seq or 1)
        rows = (slice(first + self.rows[0], first + self.rows[1]), slice(None))
        self.x, self.dy = inputs(p, cfg.n_embd, self.backend, rows, rows)
        self.drop = DropoutCall(0.0, 0, 0, p.seq or 1, self.sample0, self.rows, cfg.n_embd)

    # ---- the timed step
    def forward(self) -> None:
        if self.problem.scheme == "gpt":
            self.loss = self.module(self.idx, self.targets)
        elif self.problem.scheme == "attention":
            self.y = self.module.forward(self.x, self.local_batch, self.problem.seq)
        else:
            self.y = self.module.forward(self.x, self.local_batch, self.drop)

    def backward(self) -> None:
        if self.problem.scheme == "gpt":
            self.module.backward()
            return
        self.dx = self.data_parallel.averaged(self._module_backward) \
            if self.data_parallel is not None else self._module_backward()

    def _module_backward(self) -> Any:
        if self.shares is not None:
            self.shares.start()
        dx = self.module.backward(self.dy)
        if self.shares is not None:
            self.shares.finish()
        return dx

    def serial(self, backend: Backend) -> Callable[..., None]:
        """The bare code of :mod:`tpmpi.studies.baregpt` on one process, the global batch, in
        the problem's dtype (the baseline of speedup)."""
        p = self.problem
        sd = {k: backend.asarray(v, dtype=p.dtype) for k, v in self.sd.items()}
        return _bare_step(p, self.cfg, sd, backend, self._global_data(backend, p.dtype))

    def _global_data(self, backend: Backend, dtype: str) -> tuple[Any, Any]:
        if self.problem.scheme == "gpt":
            return backend.asarray(self.idx_all), backend.asarray(self.targets_all)
        x, dy = inputs(self.problem, self.cfg.n_embd, backend)
        return backend.asarray(x, dtype=dtype), backend.asarray(dy, dtype=dtype)

    # ---- verification
    def verify(self) -> float:
        """Fresh step from zeroed gradients against the float64 bare code (module docstring).
        The same value on every rank; collective."""
        p, cfg, be = self.problem, self.cfg, self.backend
        self.module.zero_grad()
        self.forward()
        self.backward()
        host = be.to_host
        heads = (cfg.n_head, cfg.n_kv_head)
        pairs: list[tuple] = []
        if p.scheme == "gpt":
            loss, grads = baregpt.gpt_loss_and_grads(self.sd, self.idx_all, self.targets_all,
                                                     heads, cfg.n_layer)
            mean = self.loss if self.mesh is None else \
                self.mesh.dp_comm.allreduce(self.loss) / self.dp  # the global batch's
            pairs.append((np.array([mean]), np.array([loss])))
        else:
            x, dy = (host(a).astype(np.float64) for a in inputs(p, cfg.n_embd))
            grads = {}
            if p.scheme == "attention":
                y, c = baregpt.attention(x, self.sd, "", heads, self.batch)
                dx = baregpt.attention_backward(dy / self.dp, self.sd, "", heads, c, grads)
            else:
                y, c = baregpt.block(x, self.sd, "", heads, self.batch)
                dx = baregpt.block_backward(dy / self.dp, self.sd, "", heads, c, grads)
            first = self.sample0 * (p.seq or 1)
            mine = slice(first + self.rows[0], first + self.rows[1])
            pairs += [(self.y, y[mine]), (self.dx, dx[mine] * self.dp)]
        ref = {**_pieces(grads), **_qkv_pieces(grads, cfg)}
        # the Q, K and V pieces of a fused parameter are checked as one (the key bias's
        # gradient is 0 in exact arithmetic: alone, its relative error would be noise)
        rank = self.grid.comm.Get_rank()
        fused: dict[str, tuple[list, list]] = {}
        for piece in params_of(named_layers(self.module), grads=True):
            if piece.name in ref:
                at = tuple(slice(a, b) for a, b in piece.bounds_at(rank))
                held, want = fused.setdefault(
                    piece.name[:-2] if piece.name.endswith((".q", ".k", ".v")) else piece.name,
                    ([], []))
                held.append(host(piece.local).reshape(-1))
                want.append(ref[piece.name][at].reshape(-1))
        pairs += [(np.concatenate(a), np.concatenate(b)) for a, b in fused.values()]
        return collective_rel_err(self.comm, pairs)


X_TOKENS = 1004  # seed of the GPT's token ids and targets


def _bare_step(p: Problem, cfg: GPTConfig, sd: dict[str, Any], backend: Backend,
               data: tuple[Any, Any]) -> Callable[..., None]:
    """``step(backward=None)`` of the bare code (None: the problem's pass)."""
    heads = (cfg.n_head, cfg.n_kv_head)
    batch = batch_of(p)

    def step(backward: Optional[bool] = None) -> None:
        back = p.backward if backward is None else backward
        if p.scheme == "gpt":
            baregpt.gpt_loss_and_grads(sd, data[0], data[1], heads, cfg.n_layer)
        elif p.scheme == "attention":
            _, c = baregpt.attention(data[0], sd, "", heads, batch)
            if back:
                baregpt.attention_backward(data[1], sd, "", heads, c, {})
        else:
            _, c = baregpt.block(data[0], sd, "", heads, batch)
            if back:
                baregpt.block_backward(data[1], sd, "", heads, c, {})
        backend.synchronize()
    return step
