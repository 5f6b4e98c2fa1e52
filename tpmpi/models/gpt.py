"""The GPT of DESIGN's Transformer section under tensor parallelism (and data parallelism on a
:class:`~tpmpi.Mesh`): :class:`GPT`.

Children, named as nanoGPT's state dict: ``transformer.wte``
(:class:`~tpmpi.layers.embedding.VocabParallelEmbedding`, its rows split by vocabulary blocks and
tied to the LM head of :class:`~tpmpi.layers.vocab_loss.VocabParallelLoss`), ``transformer.wpe``
(:class:`~tpmpi.layers.embedding.PositionEmbedding`), ``transformer.h.<i>``
(:class:`~tpmpi.layers.block.TransformerBlock`) and ``transformer.ln_f``. Between them the
``(B T, d)`` activations are replicated over the TP group, or split by token rows with
``sequence_parallel``. One step: the embedding's reduction, per block 2 + 2 reductions (or
gathers and reduce-scatters), the loss's two small Allreduces and the reduction of the head's
dx; under sequence parallelism one Allreduce of the LayerNorm and position-embedding gradient
shares after backward; under a mesh the DP average of every gradient
(:class:`~tpmpi.DataParallel`: without sequence parallelism each bucket's Iallreduce starts as
soon as its blocks' backward is done, during the earlier blocks' backward).

Dropout (``cfg.dropout``) uses the forward-call counter :attr:`GPT.calls` (advanced by every
``model(idx, targets)``, not by :meth:`GPT.logits`) and the model's ``seed``: the masks of the
serial run on the global batch, at any TP size, sequence split or mesh.

Checkpoints (:func:`tpmpi.save_checkpoint` / ``GPT.load_checkpoint``) store the leaves' blocks
(linear weights ``(in, out)``, the fused QKV weight in its Q, K and V pieces) and the model's
config, and load at any TP size, mesh and ``sequence_parallel`` setting (an option of the load).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import numpy as np
from mpi4py import MPI

from ..checkpoint.params import params_of
from ..core.agreement import CALL_ORDER, Same, Text, agree, agree_checks
from ..core.args import check_int
from ..core.arrays import Array, DTypeLike
from ..core.backend import Backend, backend_of, get_backend
from ..core.dropout import Site
from ..core.dtypes import dtype_name, resolve_dtype
from ..core.grid import ProcessGrid, default_grid
from ..core.mappings import Operator
from ..core.mesh import Mesh, mesh_of
from ..core.partition import block_range
from ..core.schedule import Collective, GradsReady, Pointwise, Schedule, Step, chain
from ..layers.block import DropoutCall, LayerNorm, TransformerBlock
from ..layers.cross_entropy import IGNORE_INDEX
from ..layers.data_parallel import DataParallel
from ..layers.embedding import PositionEmbedding, VocabParallelEmbedding
from ..layers.functional import dropout
from ..layers.leaf import PartialGrads
from ..layers.linear_schedule import nbytes
from ..layers.module import Composite, modules, named_layers
from ..layers.vocab_loss import VocabParallelLoss
from .config import GPTConfig, state_dict_shapes

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_SAVED = ("_x", "_rows", "_pre", "_saved", "_keep", "_p", "_ids", "_kept")  # what a forward keeps
# (``_kept``: a layer's own copy of its input, which the next forward would overwrite in place)


def _config(cfg: Any) -> GPTConfig:
    if isinstance(cfg, GPTConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return GPTConfig(**cfg)
    raise ValueError(f"cfg is a {type(cfg).__name__}: expected a tpmpi.models.GPTConfig")


def _checksum(a: Any) -> int:
    """crc32 of an array's bytes (a device array copied to the host)."""
    host = np.ascontiguousarray(backend_of(a).to_host(a))
    return zlib.crc32(host.reshape(-1).view(np.uint8).data)


class GPT(Composite):
    """``GPT(cfg, *, grid=None, mesh=None, sequence_parallel=False, dtype="float32", seed=0,
    backend="auto")`` (see the module docstring and DESIGN's contract). ``grid``: the TP group
    (default all ranks); ``mesh``: dp x tp (the model on ``mesh.tp``, gradients averaged over
    ``mesh.dp``); a grid that is a mesh's ``tp`` means that mesh. Construction is collective;
    bad or differing arguments raise the same ValueError on every rank."""

    def __init__(self, cfg: Union[GPTConfig, Mapping[str, Any]], *,
                 grid: Optional[ProcessGrid] = None, mesh: Optional[Mesh] = None,
                 sequence_parallel: bool = False, dtype: DTypeLike = "float32", seed: int = 0,
                 backend: Union[str, Backend] = "auto",
                 _dense: Optional[Mapping[str, Any]] = None) -> None:
        if mesh is None and grid is not None:
            mesh = mesh_of(grid)
        scope = mesh.comm if isinstance(mesh, Mesh) else (
            grid.comm if isinstance(grid, ProcessGrid) else default_grid().comm)
        found: list[GPTConfig] = []

        def local_checks() -> None:
            if grid is not None and not isinstance(grid, ProcessGrid):
                raise ValueError(f"grid is a {type(grid).__name__}: expected a tpmpi.ProcessGrid")
            if mesh is not None and not isinstance(mesh, Mesh):
                raise ValueError(f"mesh is a {type(mesh).__name__}: expected a tpmpi.Mesh")
            if mesh is not None and grid is not None and grid is not mesh.tp:
                raise ValueError("grid and mesh name different TP groups: pass one of them")
            if not isinstance(sequence_parallel, bool):
                raise ValueError(f"sequence_parallel={sequence_parallel!r}: expected True or "
                                 "False")
            resolve_dtype(dtype)
            if check_int("seed", seed, 0) >= 2**62:
                raise ValueError(f"seed={seed!r}: expected an integer in [0, 2**62)")
            found.append(_config(cfg))
            if _dense is not None:
                check_state_dict(_dense, found[0])

        agree_checks(scope, local_checks, call=Same(Text("construction of a GPT"), CALL_ORDER),
                     cfg=dataclasses.asdict(found[0]) if found else None,
                     sequence_parallel=sequence_parallel, dtype=dtype_name(dtype), seed=seed,
                     backend=str(backend))
        self.cfg = found[0]
        self.mesh = mesh
        self.grid = mesh.tp if mesh is not None else (grid if grid is not None
                                                      else default_grid())
        self.comm = self.grid.comm
        self.sequence_parallel, self.seed = sequence_parallel, int(seed)
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(backend, self.comm)
        self.backend.check_dtype(self.dtype)
        self.calls = 0
        # callbacks run with leaves whose gradients are final during backward (DataParallel
        # starts averaging their buckets there); not under sequence parallelism, where the
        # LayerNorm shares are summed at the very end
        self.grad_ready: list[Callable[..., None]] = []
        self._build(_dense)
        self.data_parallel = DataParallel(self, mesh) if mesh is not None and mesh.dp > 1 \
            else None
        self._forward: Optional[tuple[Any, ...]] = None

    def _build(self, sd: Optional[Mapping[str, Any]]) -> None:
        cfg = self.cfg
        common: dict[str, Any] = dict(grid=self.grid, backend=self.backend, dtype=self.dtype)
        sp = self.sequence_parallel
        self.wte = VocabParallelEmbedding(
            cfg.vocab_size, cfg.n_embd, sequence_parallel=sp, seed=self.seed, stream=0,
            dense=sd["transformer.wte.weight"] if sd else None, **common)
        self.wpe = PositionEmbedding(cfg.block_size, cfg.n_embd, seed=self.seed, stream=1,
                                     dense=sd["transformer.wpe.weight"] if sd else None,
                                     **common)
        self.h: list[TransformerBlock] = []
        for i in range(cfg.n_layer):
            prefix = f"transformer.h.{i}."
            dense = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} \
                if sd else None
            self.h.append(TransformerBlock(
                cfg.n_embd, cfg.n_head, cfg.n_kv_head, layer=i, sequence_parallel=sp,
                bias=cfg.bias, seed=self.seed, stream=2 + 8 * i, dense=dense, **common))
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias, dense=(
            sd["transformer.ln_f.weight"], sd.get("transformer.ln_f.bias")) if sd else None,
            **common)
        self.lm_head = VocabParallelLoss(self.wte, sequence_parallel=sp)
        shares = [self.wpe, self.ln_f] + [ln for b in self.h for ln in b.layer_norms()]
        self.partial_grads = PartialGrads(shares, self.comm, self.wte.staging) if sp else None

    # ---- module protocol
    def children(self) -> list[tuple[str, Any]]:
        """The state dict's modules in forward order: ``transformer.wte``, ``transformer.wpe``,
        ``transformer.h.<i>``, ``transformer.ln_f`` (the LM head is ``wte``, tied)."""
        return ([("transformer.wte", self.wte), ("transformer.wpe", self.wpe)]
                + [(f"transformer.h.{i}", b) for i, b in enumerate(self.h)]
                + [("transformer.ln_f", self.ln_f)])

    def operators(self) -> dict[str, Operator]:
        """Every communication operator: the children's, the loss's (``lm_head.*``), the sum of
        the SP gradient shares and the DP average."""
        ops = super().operators()
        ops.update({f"lm_head.{k}": op for k, op in self.lm_head.operators().items()})
        if self.partial_grads is not None:
            ops["partial_grads.sum_shares"] = self.partial_grads.sum_shares
        if self.data_parallel is not None:
            ops["data_parallel.allreduce_grads"] = self.data_parallel.allreduce_grads
        return ops

    def config(self) -> dict[str, Any]:
        """Constructor keywords that rebuild this model (less grid, mesh and backend), as saved
        in checkpoints."""
        return dict(cfg=dataclasses.asdict(self.cfg), sequence_parallel=self.sequence_parallel,
                    dtype=self.dtype.name, seed=self.seed)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any], cfg: GPTConfig, *,
                        grid: Optional[ProcessGrid] = None, mesh: Optional[Mesh] = None,
                        sequence_parallel: bool = False, dtype: DTypeLike = "float32",
                        seed: int = 0, backend: Union[str, Backend] = "auto") -> GPT:
        """A model holding this rank's blocks of the full arrays ``sd`` (every key of
        :func:`~tpmpi.models.state_dict_shapes`, torch shapes, passed on every rank).
        Collective; a missing or mis-shaped key is named in the error on every rank."""
        return cls(cfg, grid=grid, mesh=mesh, sequence_parallel=sequence_parallel, dtype=dtype,
                   seed=seed, backend=backend, _dense=sd)

    # ---- passes
    def _scope(self) -> MPI.Comm:
        return self.mesh.comm if self.mesh is not None else self.comm

    def _agree_batch(self, what: str, idx: Any, targets: Any) -> tuple[int, int]:
        """Agree over the mesh (or TP group) that ``idx`` (and ``targets``) are valid and the
        same on every rank of the TP group: the same ValueError everywhere otherwise. An
        allgather of two checksums over the TP group, then one agreement."""
        cfg, xp = self.cfg, self.backend.xp
        error: Optional[str] = None
        sums = (0, 0)
        try:
            check_tokens("idx", idx, cfg.vocab_size, cfg.block_size, xp)
            if targets is not None:
                check_tokens("targets", targets, cfg.vocab_size, cfg.block_size, xp,
                             like=idx.shape, ignore=IGNORE_INDEX)
            sums = (_checksum(idx), _checksum(targets) if targets is not None else 0)
        except ValueError as exc:
            error = str(exc)
        every = self.comm.allgather(sums if error is None else None)
        if error is None and any(s is not None and s != sums for s in every):
            name = "idx" if any(s is not None and s[0] != sums[0] for s in every) else "targets"
            error = (f"{name} differs across the ranks of the TP group: expected the same "
                     "token ids on every rank of it (replicated)")
        agree(self._scope(), error, call=Same(Text(f"GPT.{what}()"), CALL_ORDER))
        return int(idx.shape[0]), int(idx.shape[1])

    def _run(self, idx: Array, drop: DropoutCall) -> tuple[Array, Optional[Array]]:
        """The model up to ln_f: ``(rows held, d)``, and the embedding's dropout mask."""
        batch, seq = idx.shape
        x = self.wte.forward(self.backend.asarray(idx).reshape(-1))
        x = self.wpe.forward(x, seq, drop.rows[0])
        keep = drop.hidden(Site.EMBEDDING, 0, self.backend)
        x = dropout(x, keep, drop.p)
        for block in self.h:
            x = block.forward(x, batch, drop)
        return self.ln_f.forward(x), keep

    def _drop(self, batch: int, seq: int, p: float) -> DropoutCall:
        n = batch * seq
        rows = block_range(n, self.comm.Get_size(), self.comm.Get_rank()) \
            if self.sequence_parallel else (0, n)
        sample0 = self.mesh.dp_rank * batch if self.mesh is not None else 0
        return DropoutCall(p, self.seed, self.calls, seq, sample0, rows, self.cfg.n_embd)

    def __call__(self, idx: Any, targets: Any) -> float:
        return self.forward(idx, targets)

    def forward(self, idx: Any, targets: Any) -> float:
        """``idx``, ``targets``: integer ``(B, T)``, ``T <= block_size``, replicated over the TP
        group (under a mesh: this replica's batch) -> the mean cross-entropy over the targets
        other than -100 (a float, the same on every rank of the TP group). Training mode:
        dropout with ``cfg.dropout``; advances :attr:`calls`. Collective."""
        batch, seq = self._agree_batch("forward", idx, targets)
        drop = self._drop(batch, seq, self.cfg.dropout)
        self.calls += 1
        xf, keep = self._run(idx, drop)
        loss = self.lm_head.forward(xf, self.backend.asarray(targets).reshape(-1))
        self._forward = (drop.p, keep)
        return loss

    def backward(self) -> None:
        """Gradients of the last forward's loss, accumulated; under a mesh then averaged over
        the DP replicas. Collective."""
        agree(self._scope(), None if self._forward is not None else
              "backward() called before forward(): no loss to differentiate",
              call=Same(Text("GPT.backward()"), CALL_ORDER))
        if self.data_parallel is not None:
            self.data_parallel.averaged(self._backward)
        else:
            self._backward()

    def _backward(self) -> None:
        assert self._forward is not None
        p, keep = self._forward
        if self.partial_grads is not None:
            self.partial_grads.start()
        dx = self.ln_f.backward(self.lm_head.backward())
        self._ready(self.ln_f)
        for block in reversed(self.h):
            dx = block.backward(dx)
            self._ready(*(leaf for _, leaf in named_layers(block)))
        dx = dropout(dx, keep, p)
        self.wpe.backward(dx)
        self.wte.backward(dx)
        if self.partial_grads is not None:
            self.partial_grads.finish()

    def _ready(self, *leaves: Any) -> None:
        """Report ``leaves``' gradients final (:attr:`grad_ready`), unless sequence parallelism
        still has to sum shares of them."""
        if not self.sequence_parallel:
            for ready in self.grad_ready:
                ready(*leaves)

    def logits(self, idx: Any) -> Array:
        """``(B, T, vocab_size)`` logits of ``idx`` on every rank of the TP group, without
        dropout; the last forward's saved state, the gradients and :attr:`calls` are left as
        they were. Collective."""
        batch, seq = self._agree_batch("logits", idx, None)
        kept = [(m, {k: v for k, v in vars(m).items() if k in _SAVED}) for m in modules(self)]
        kept.append((self.lm_head, dict(vars(self.lm_head))))
        for m, _ in kept:
            if "_kept" in vars(m):
                m._kept = None  # this forward copies its inputs into new arrays
        try:
            xf, _ = self._run(idx, self._drop(batch, seq, 0.0))
            out = self.lm_head.logits(xf, batch * seq)
        finally:
            for m, saved in kept:
                vars(m).update(saved)
        return out.reshape(batch, seq, -1)

    # ---- whole arrays
    def _gathered(self, grads: bool) -> dict[str, np.ndarray]:
        """Every checkpoint piece as a full host array (each rank's block placed; an allgather
        of the blocks over the TP group per piece)."""
        out = {}
        for p in params_of(named_layers(self), grads=grads):
            host = np.ascontiguousarray(self.backend.to_host(p.local))
            full = np.empty(p.shape, dtype=host.dtype)
            for q, block in enumerate(self.comm.allgather(host)):
                full[tuple(slice(a, b) for a, b in p.bounds_at(q))] = block
            out[p.name] = full
        return out

    def _state(self, grads: bool) -> dict[str, np.ndarray]:
        pieces = self._gathered(grads)
        out: dict[str, np.ndarray] = {}
        for key in state_dict_shapes(self.cfg):
            if key == "lm_head.weight":
                out[key] = out["transformer.wte.weight"]
            elif key in pieces:
                linear = any(f".{n}.weight" in key for n in _LINEARS)
                out[key] = np.ascontiguousarray(pieces[key].T) if linear else pieces[key]
            else:  # the fused QKV weight and bias, saved as Q, K and V pieces
                parts = [pieces[f"{key}.{x}"] for x in "qkv"]
                out[key] = np.ascontiguousarray(np.concatenate(parts, axis=-1).T
                                                if key.endswith("weight")
                                                else np.concatenate(parts))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{name: full host array}`` of every state-dict key (torch shapes; ``lm_head.weight``
        the same array as ``transformer.wte.weight``), on every rank. Collective over the TP
        group."""
        return self._state(False)

    def grad_state_dict(self) -> dict[str, np.ndarray]:
        """The gradients as :meth:`state_dict` (both tied keys hold the one total gradient).
        Collective over the TP group."""
        return self._state(True)

    def grad_norm(self) -> float:
        """The 2-norm of the whole model's gradient: every element of every parameter counted
        once (a block held by several ranks, e.g. a replicated LayerNorm or a shared kv head,
        by its lowest holder), after the DP average under a mesh; the same on every rank.
        Collective (one Allreduce of a float64 over the TP group)."""
        total = 0.0
        for p in params_of(named_layers(self), grads=True):
            if p.is_writer() and p.local.size:
                g = p.local.astype(np.float64) if isinstance(p.local, np.ndarray) \
                    else self.backend.to_host(p.local).astype(np.float64)
                total += float(np.vdot(g, g))
        return math.sqrt(self.comm.allreduce(total, op=MPI.SUM))

    # ---- schedule
    @classmethod
    def schedule_for(cls, cfg: GPTConfig, *, batch: int, seq: int, tp: int,
                     sequence_parallel: bool = False, dtype: str = "float32",
                     backward: bool = True) -> Schedule:
        """The ordered steps of one training step of the whole model on the rank with the
        largest shards of a ``tp``-rank group: the embedding's lookup and reduction, the
        position add and dropout, every block (:meth:`TransformerBlock.schedule_for`, prefixed
        ``transformer.h.<i>``), ln_f, the head and loss
        (:meth:`VocabParallelLoss.schedule_for`, prefixed ``lm_head``), and under sequence
        parallelism the Allreduce of the gradient shares. Gradients are ready (``GradsReady``,
        where data parallelism may start on them) after each layer's backward (the model
        reports a block's together as the block's backward ends), the tied ``wte`` and
        ``wpe`` last; under sequence parallelism every one after the shares' Allreduce.
        ValueError naming a bad argument. No MPI, nothing built."""
        for name, value in (("batch", batch), ("seq", seq), ("tp", tp)):
            check_int(name, value, 1)
        if seq > cfg.block_size:
            raise ValueError(f"seq={seq}: expected at most block_size={cfg.block_size}")
        m, d = batch * seq, cfg.n_embd
        rows = -(-m // tp) if sequence_parallel else m
        act = nbytes((rows, d), dtype)
        drop = cfg.dropout > 0
        emb = VocabParallelEmbedding.schedule_for(m, cfg.vocab_size, d, tp,
                                                  sequence_parallel=sequence_parallel,
                                                  dtype=dtype, backward=backward)
        pos_steps: tuple[Step, ...] = (Pointwise("wpe", 3 * act, dtype),) + (
            (Pointwise("dropout", 3 * act, dtype),) if drop else ())
        pos = Schedule(pos_steps, pos_steps if backward else (),
                       nbytes((cfg.block_size, d), dtype), 0)
        blocks = [TransformerBlock.schedule_for(
            batch, seq, d, cfg.n_head, tp, n_kv_head=cfg.n_kv_head,
            sequence_parallel=sequence_parallel, bias=cfg.bias, dropout=drop, dtype=dtype,
            backward=backward).prefixed(f"transformer.h.{i}") for i in range(cfg.n_layer)]
        ln = nbytes((d * (1 + int(cfg.bias)),), dtype)
        ln_f = Schedule((Pointwise("transformer.ln_f", 2 * act, dtype),),
                        (Pointwise("transformer.ln_f.backward", 6 * act, dtype),
                         GradsReady(("transformer.ln_f.weight", "transformer.ln_f.bias"), ln,
                                    dtype)) if backward else (), ln, act)
        head = VocabParallelLoss.schedule_for(m, cfg.vocab_size, d, tp,
                                              sequence_parallel=sequence_parallel, dtype=dtype,
                                              backward=backward).prefixed("lm_head")
        whole = chain([emb.prefixed("transformer.wte"), pos.prefixed("transformer.wpe"),
                       *blocks, ln_f, head])
        if not backward:
            return whole
        # the tied wte (the head's dW and the lookup's scatter-add) and wpe are final last
        tables = (GradsReady(("transformer.wpe.weight",), pos.param_bytes, dtype),
                  GradsReady(("transformer.wte.weight",), emb.param_bytes, dtype))
        if not (sequence_parallel and tp > 1):
            return dataclasses.replace(whole, backward=whole.backward + tables)
        # under sequence parallelism no gradient is final before the shares are summed
        shares = (2 * cfg.n_layer + 1) * ln + nbytes((cfg.block_size, d), dtype)
        tail = Collective("partial_grads.sum_shares", "allreduce", "tp", tp, shares, dtype)
        ready = tuple(s for s in whole.backward if isinstance(s, GradsReady)) + tables
        rest = tuple(s for s in whole.backward if not isinstance(s, GradsReady))
        return dataclasses.replace(whole, backward=rest + (tail,) + ready)


def check_tokens(name: str, a: Any, vocab_size: int, block_size: int, xp: Any, *,
                 like: Optional[tuple[int, ...]] = None, ignore: Optional[int] = None) -> None:
    """ValueError naming ``name`` unless ``a`` is a 2D integer array ``(B, T)`` with ``B >= 1``,
    ``1 <= T <= block_size`` (of shape ``like`` when given) and entries in ``[0, vocab_size)``
    (or ``ignore``). Local."""
    shape = getattr(a, "shape", None)
    dt = getattr(a, "dtype", None)
    if shape is None or dt is None or not hasattr(a, "ndim"):
        raise ValueError(f"{name} is a {type(a).__name__}: expected an integer array (B, T)")
    if a.ndim != 2:
        raise ValueError(f"{name}.shape={tuple(shape)}: expected a 2D array (B, T)")
    if like is not None and tuple(shape) != tuple(like):
        raise ValueError(f"{name}.shape={tuple(shape)}: expected {tuple(like)} (idx's shape)")
    if dt.kind not in "iu":
        raise ValueError(f"{name}.dtype={dt}: expected an integer dtype")
    if shape[0] < 1 or not 1 <= shape[1] <= block_size:
        raise ValueError(f"{name}.shape={tuple(shape)}: expected B >= 1 and 1 <= T <= "
                         f"block_size={block_size}")
    bad = (a < 0) | (a >= vocab_size)
    if ignore is not None:
        bad &= a != ignore
    if bool(bad.any()):
        first = int(a[bad].reshape(-1)[0])
        allowed = f" or {ignore}" if ignore is not None else ""
        raise ValueError(f"{name} contains {first}: expected token ids in [0, {vocab_size})"
                         f"{allowed}")


def check_state_dict(sd: Any, cfg: GPTConfig) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped key of ``sd`` (a mapping of
    full arrays, every key of :func:`~tpmpi.models.state_dict_shapes`). Local."""
    if not isinstance(sd, Mapping):
        raise ValueError(f"sd is a {type(sd).__name__}: expected a dict {{name: array}}")
    want = state_dict_shapes(cfg)
    for key, shape in want.items():
        if key not in sd:
            raise ValueError(f"sd is missing {key!r} (expected shape {shape})")
        got = tuple(getattr(sd[key], "shape", ()))
        if got != shape:
            raise ValueError(f"sd[{key!r}].shape={got}: expected {shape}")
        if getattr(getattr(sd[key], "dtype", None), "kind", "") not in "fc" or \
                not isinstance(sd[key], np.ndarray):
            raise ValueError(f"sd[{key!r}] is a {type(sd[key]).__name__}: expected a NumPy "
                             "float array")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ValueError(f"sd has unexpected key {extra[0]!r} (not in the config's state dict)")
