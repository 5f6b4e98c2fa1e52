"""Train a character-level GPT on real text at any dp x tp, next to a serial float64 reference.

Run: ``mpiexec -n P python scripts/train_gpt.py [--dp D] [--tp T] [--sequence-parallel]
[--dropout p] [--dtype float32|float64|...] [--steps N] [--seed S] [--json FILE] [--save DIR]
[--resume DIR] [--check]`` (see ``--help``). The text is the standard library's
``pydoc_data.topics`` (Python's own help topics, about 465k characters: no download); its
characters are the vocabulary, its first 90 % trains and the rest validates.

The P ranks form a :class:`tpmpi.Mesh` of D data-parallel replicas of a T-rank TP group
(:class:`tpmpi.models.GPT` on it). Every step draws one global batch of ``--batch`` windows of
``--block-size + 1`` characters from a generator seeded by ``(seed, step)``: replica r takes its
rows ``r*B .. (r+1)*B - 1`` (``B = batch / D``), so every layout trains on the same data step by
step, and dropout's masks (layout-invariant in tpmpi) are those of the serial run too.

Optimizer: AdamW (decoupled weight decay, betas 0.9/0.95) as nanoGPT configures it: decay on the
matmul weights and the token embedding (tied to the LM head), none on biases, LayerNorm
parameters and the position table. Gradients are clipped to ``--grad-clip`` by the 2-norm of the
whole model's gradient (:meth:`GPT.grad_norm`, over the shards). Learning rate: linear warmup
then a cosine decay to ``lr / 10`` at ``--decay-steps``.

Every ``--log-every`` steps rank 0 prints the training loss (mean over the global batch, before
that step's update), tokens/s and the model-FLOP utilisation (6 N + 12 L T d FLOPs per token,
Narayanan et al. 2021, against the GEMM rate of this machine measured at start on every rank at
once); every ``--eval-every`` steps and at the end the validation loss over fixed batches, with
the unigram entropy of the text for scale. At the end a sample of text is drawn from the
gathered logits with a generator seeded by ``--seed`` (the same text at every layout).

``--check``: rank 0 also trains the same GPT on one rank in float64 on the global batch with
the same optimizer (rank 0 only: the other ranks need nothing from it, and on a laptop with
fewer cores than ranks a copy per rank would multiply its cost), and prints both curves with the
worst relative difference; exit 1 beyond the tolerance (1e-4 in float64; in lower precision
training amplifies rounding step by step: 1e-2 in float32, 5e-2 in half precision).

Checkpoints: ``--save DIR`` writes the model, AdamW's moments (sharded like the parameters),
the step, the dropout counter and the flags the run depends on; ``--resume DIR`` continues at
any dp x tp (or SP) for ``--steps`` more steps. The data position and every generator are
functions of ``(seed, step)``, so the resumed run draws exactly the batches and masks the
uninterrupted run would have. ``main(argv, comm)`` is importable (tests call it on
sub-communicators) and returns the curves and the sample.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from mpi4py import MPI

import tpmpi
from tpmpi.checkpoint.load import resume_training
from tpmpi.checkpoint.params import state_by_piece
from tpmpi.core import launch
from tpmpi.core.agreement import agree_checks
from tpmpi.core.args import int_flag
from tpmpi.core.dtypes import SUPPORTED
from tpmpi.core.launch import Parser, parse_args, usage
from tpmpi.layers.module import named_layers
from tpmpi.models import GPT, GPTConfig
from tpmpi.studies.record import mpi_library, write_record

EPILOG = """\
examples (4 ranks):
  mpiexec -n 4 python scripts/train_gpt.py                      # tp 4, 1-2 minutes
  mpiexec -n 4 python scripts/train_gpt.py --dp 2 --tp 2 --dropout 0.1 --dtype float64 \\
      --steps 20 --check                                        # agrees with serial float64
  mpiexec -n 4 python scripts/train_gpt.py --tp 4 --sequence-parallel --json gpt.jsonl
  python -m tpmpi report gpt.jsonl --plot figs                  # figs/loss.png
checkpoint and resume at another layout:
  mpiexec -n 4 python scripts/train_gpt.py --dp 2 --tp 2 --steps 100 --decay-steps 200 \\
      --save ckpt
  mpiexec -n 4 python scripts/train_gpt.py --dp 4 --tp 1 --steps 100 --resume ckpt
"""

CHECK_TOL = {"float64": 1e-4, "float32": 1e-2}
"""Worst relative difference of ``--check``'s curves (half precision: 5e-2)."""

RESUMED = ("seed", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "batch", "lr",
           "warmup", "weight_decay", "grad_clip", "dropout")
"""Flags a resumed run must share with the run that saved (data, model, optimizer)."""

SPLIT = 0.9  # the share of the text that trains


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (errors raise :class:`tpmpi.core.launch.UsageError`)."""
    p = Parser(prog="train_gpt.py", description=__doc__.split("\n\n")[0], epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int_flag(1), default=1, help="data-parallel replicas D (1)")
    p.add_argument("--tp", type=int_flag(1), default=None, help="TP group size T (P / D)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="activations outside the TP GEMMs split by token rows")
    p.add_argument("--n-layer", type=int_flag(1), default=2, help="blocks (2)")
    p.add_argument("--n-head", type=int_flag(1), default=4, help="attention heads (4)")
    p.add_argument("--n-kv-head", type=int_flag(1), default=None,
                   help="key/value heads (default n-head)")
    p.add_argument("--n-embd", type=int_flag(1), default=64, help="model width d (64)")
    p.add_argument("--block-size", type=int_flag(1), default=64, help="context T (64)")
    p.add_argument("--batch", type=int_flag(1), default=32,
                   help="global batch in sequences, a multiple of --dp (32)")
    p.add_argument("--steps", type=int_flag(1), default=1000, help="optimizer steps (1000)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    p.add_argument("--warmup", type=int_flag(0), default=20, help="warmup steps (20)")
    p.add_argument("--decay-steps", type=int_flag(1), default=None,
                   help="step where the cosine reaches lr/10 (default: the last step; a resumed "
                        "run keeps the saved value)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the whole gradient's 2-norm to this (0: off) (1.0)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability (0)")
    p.add_argument("--dtype", choices=SUPPORTED, default="float32")
    p.add_argument("--backend", choices=["auto", "numpy", "cupy"], default="auto")
    p.add_argument("--seed", type=int_flag(0), default=0)
    p.add_argument("--log-every", type=int_flag(1), default=20, help="print interval (20)")
    p.add_argument("--eval-every", type=int_flag(1), default=100,
                   help="validation interval (100; also at the end)")
    p.add_argument("--eval-batches", type=int_flag(1), default=4,
                   help="global batches of the validation loss (4)")
    p.add_argument("--sample-chars", type=int_flag(0), default=240,
                   help="characters generated at the end (240)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0.8)")
    p.add_argument("--peak-size", type=int_flag(1), default=512,
                   help="n of the n x n GEMMs that measure the machine's rate at start (512)")
    p.add_argument("--check", action="store_true",
                   help="train the serial float64 model beside it (rank 0) and compare")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="append one record per logged step and a last one with the sample")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="after training, save model + AdamW state + step to DIR")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="start from the checkpoint in DIR (any dp x tp); --steps more steps")
    p.add_argument("--quiet", action="store_true", help="print nothing (tests)")
    return p


# ---------------------------------------------------------------- data


class Text:
    """The corpus as token ids: ``train`` and ``val`` (int64 arrays), ``chars`` (the
    vocabulary, sorted), the unigram entropy of the training text in nats."""

    def __init__(self) -> None:
        from pydoc_data.topics import topics
        text = "".join(topics[k] for k in sorted(topics))
        self.chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(self.chars)}
        ids = np.fromiter((lookup[c] for c in text), dtype=np.int64, count=len(text))
        cut = int(SPLIT * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]
        freq = np.bincount(self.train, minlength=len(self.chars)) / len(self.train)
        freq = freq[freq > 0]
        self.entropy = float(-(freq * np.log(freq)).sum())

    def encode(self, s: str) -> np.ndarray:
        return np.array([self.chars.index(c) for c in s], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


@functools.lru_cache(maxsize=1)
def corpus() -> Text:
    """The corpus, read once per process."""
    return Text()


def windows(ids: np.ndarray, rows: int, seq: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` random windows of ``ids``: inputs and next-character targets, both
    ``(rows, seq)``."""
    start = rng.integers(0, len(ids) - seq - 1, size=rows)
    x = np.stack([ids[s:s + seq + 1] for s in start])
    return x[:, :-1], x[:, 1:]


def train_batch(text: Text, args: Any, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of ``step``: a function of ``(seed, step)`` only."""
    return windows(text.train, args.batch, args.block_size,
                   np.random.default_rng([args.seed, 1, step]))


def val_batches(text: Text, args: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fixed validation batches (global, like the training ones)."""
    rng = np.random.default_rng([args.seed, 2])
    return [windows(text.val, args.batch, args.block_size, rng)
            for _ in range(args.eval_batches)]


# ---------------------------------------------------------------- optimizer and schedule


def decays(name: str) -> bool:
    """Weight decay on matmul weights and the token embedding (tied to the LM head); none on
    biases, LayerNorm parameters and the position table."""
    return name.endswith(".weight") and ".ln_" not in name and ".wpe." not in name


def learning_rate(args: Any, step: int, decay_steps: int) -> float:
    """Linear warmup over ``--warmup`` steps, then a cosine from ``lr`` to ``lr / 10`` at
    ``decay_steps`` (flat after it)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(decay_steps - args.warmup, 1)
    ratio = min((step - args.warmup) / span, 1.0)
    return args.lr / 10 + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.lr / 10)


class AdamW:
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) over a model's ``parameters()``
    (dotted name, local param, local grad), updated in place; purely local."""

    def __init__(self, model: GPT, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8) -> None:
        self.model, self.params = model, list(model.parameters())
        self.weight_decay, self.betas, self.eps, self.t = weight_decay, betas, eps, 0
        self.m = [p * 0 for _, p, _ in self.params]
        self.v = [p * 0 for _, p, _ in self.params]

    def state_arrays(self) -> dict[str, dict[str, Any]]:
        """``{"adamw.m": {name: m}, "adamw.v": {name: v}}``, as :func:`tpmpi.save_checkpoint`
        and ``load_checkpoint`` take the state (sharded like the parameters; the pieces of a
        parameter saved in pieces are views of its moments)."""
        names = [n for n, _, _ in self.params]
        return state_by_piece(named_layers(self.model), {"adamw.m": dict(zip(names, self.m)),
                                                        "adamw.v": dict(zip(names, self.v))})

    def step(self, lr: float, grad_scale: float) -> None:
        """One update with learning rate ``lr`` of the gradients times ``grad_scale``."""
        self.t += 1
        b1, b2 = self.betas
        for (name, p, g), m, v in zip(self.params, self.m, self.v):
            g = g * grad_scale
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            if decays(name):
                p *= 1 - lr * self.weight_decay
            p -= (lr / (1 - b1 ** self.t)) * m / ((v / (1 - b2 ** self.t)) ** 0.5 + self.eps)


def clip_scale(norm: float, clip: float) -> float:
    """The factor that brings the gradient's 2-norm ``norm`` down to ``clip`` (1 when within;
    ``clip`` 0: no clipping)."""
    return min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0


class Trainer:
    """A GPT with its AdamW: one training step on a batch and the validation loss."""

    def __init__(self, model: GPT, args: Any, decay_steps: int) -> None:
        self.model, self.args, self.decay_steps = model, args, decay_steps
        self.opt = AdamW(model, args.weight_decay)

    def step(self, step: int, idx: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
        """Forward, backward, clip, update: ``(loss, gradient norm before clipping)``.
        Collective over the model's mesh."""
        self.model.zero_grad()
        loss = self.model(idx, targets)
        self.model.backward()
        norm = self.model.grad_norm()
        self.opt.step(learning_rate(self.args, step, self.decay_steps),
                      clip_scale(norm, self.args.grad_clip))
        return loss, norm

    def nll_sum(self, idx: np.ndarray, targets: np.ndarray) -> float:
        """Summed cross-entropy (nats, float64) of ``targets`` under the gathered logits of
        ``idx`` (no dropout, the dropout counter untouched). Collective over the TP group."""
        logits = self.model.backend.to_host(self.model.logits(idx)).astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        logz = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return float((logz - picked).sum())


# ---------------------------------------------------------------- model FLOPs and sampling


def model_flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token, Narayanan et al. 2021: 6 N (every parameter once, the tied
    embedding as the LM head's product) plus 12 L T d for attention's two products."""
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.block_size * cfg.n_embd


def machine_rate(comm: MPI.Comm, model: GPT, n: int, reps: int = 4, rounds: int = 3) -> float:
    """GFLOP/s of the whole machine: every rank multiplies ``n x n`` matrices in the model's
    dtype at the same time (its BLAS threads as configured), ``reps`` products between
    barriers after one warmup; the FLOPs of all ranks over the wall time, the best of
    ``rounds`` (the rate the ranks get together, not one rank's alone; the best, so that a
    round slowed by other work on the machine does not inflate the MFU), rank 0's figure on
    every rank. Collective."""
    backend = model.backend
    a = tpmpi.init_weight((n, n), 1, model.dtype, backend=backend, bound=1.0)
    out = backend.xp.matmul(a, a)
    best = 0.0
    for _ in range(rounds):
        backend.synchronize()
        comm.Barrier()
        began = MPI.Wtime()
        for _ in range(reps):
            backend.xp.matmul(a, a, out=out)
        backend.synchronize()
        comm.Barrier()
        best = max(best, comm.Get_size() * reps * 2.0 * n ** 3 / (MPI.Wtime() - began) / 1e9)
    return comm.bcast(best, root=0)


def sample(model: GPT, text: Text, args: Any, comm: MPI.Comm) -> str:
    """``--sample-chars`` characters after a newline, each drawn at ``--temperature`` from the
    gathered logits of the last ``block_size`` characters with a generator seeded by
    ``--seed``; rank 0's draw is broadcast so every rank holds the same text. Collective."""
    rng = np.random.default_rng([args.seed, 3])
    ids = list(text.encode("\n"))
    for _ in range(args.sample_chars):
        ctx = np.array([ids[-args.block_size:]], dtype=np.int64)
        last = model.backend.to_host(model.logits(ctx))[0, -1].astype(np.float64)
        z = (last - last.max()) / max(args.temperature, 1e-6)
        cdf = np.cumsum(np.exp(z))
        choice = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        ids.append(comm.bcast(min(choice, len(cdf) - 1), root=0))
    return text.decode(ids[1:])


# ---------------------------------------------------------------- checkpoints


def _resume(args: Any, model: GPT, opt: AdamW) -> dict:
    """Load ``--resume`` into ``model`` and ``opt`` (collective); the saved progress
    ``{"step", "calls", "t", "decay_steps"}``. ValueError naming the flag whose value differs
    from the saving run's."""
    saved = resume_training(args.resume, model, state=opt.state_arrays(), program="train_gpt",
                            flags={k: getattr(args, k) for k in RESUMED})
    opt.t, model.calls = saved["t"], saved["calls"]
    return saved


def _fmt(x: Optional[float]) -> str:
    return f"{x:.5f}" if x is not None else "-"


# ---------------------------------------------------------------- main


def check_flags(args: Any, nranks: int) -> None:
    """ValueError naming the first flag that cannot work on ``nranks`` ranks. Local."""
    if args.tp is None and nranks % args.dp:
        raise ValueError(f"--dp={args.dp}: expected a divisor of the {nranks} ranks")
    if args.tp is not None and args.dp * args.tp != nranks:
        raise ValueError(f"--dp {args.dp} x --tp {args.tp}: expected dp * tp = the {nranks} "
                         "ranks")
    if args.batch % args.dp:
        raise ValueError(f"--batch={args.batch}: expected a multiple of --dp={args.dp} (every "
                         "replica takes batch / dp rows of the global batch)")
    for name in ("lr", "temperature", "weight_decay", "grad_clip"):
        value, positive = getattr(args, name), name in ("lr", "temperature")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(f"--{name.replace('_', '-')}={value}: expected a "
                             f"{'positive' if positive else 'non-negative'} finite number")
    GPTConfig(len(corpus().chars), args.block_size, args.n_layer, args.n_head, args.n_embd,
              n_kv_head=args.n_kv_head, dropout=args.dropout)


class Run:
    """One training run on ``comm``: the mesh, the model and its trainer, the serial reference
    (rank 0 with --check), the data; :meth:`train` runs the steps, :meth:`finish` the end.
    Collective."""

    def __init__(self, args: Any, comm: MPI.Comm) -> None:
        self.args, self.comm, self.rank = args, comm, comm.Get_rank()
        self.say = (lambda *a: None) if args.quiet or self.rank else print
        self.text = corpus()
        self.cfg = GPTConfig(len(self.text.chars), args.block_size, args.n_layer, args.n_head,
                             args.n_embd, n_kv_head=args.n_kv_head, dropout=args.dropout)
        self.mesh = tpmpi.Mesh(comm, dp=args.dp, tp=args.tp)
        self.model = GPT(self.cfg, mesh=self.mesh, sequence_parallel=args.sequence_parallel,
                         dtype=args.dtype, seed=args.seed, backend=args.backend)
        self.trainer = Trainer(self.model, args, 0)
        saved: dict = {}
        if args.resume:
            with usage():  # a checkpoint that does not fit the flags is a usage error too
                saved = _resume(args, self.model, self.trainer.opt)
        self.start = saved.get("step", 0)
        self.decay = args.decay_steps or saved.get("decay_steps") or self.start + args.steps
        self.trainer.decay_steps = self.decay
        self.serial: Optional[Trainer] = None
        if args.check and self.rank == 0:
            self.serial = Trainer(GPT(self.cfg, grid=tpmpi.ProcessGrid(MPI.COMM_SELF, (1, 1)),
                                      dtype="float64", seed=args.seed, backend="numpy"),
                                  args, self.decay)
            for step in range(self.start):  # a resumed run's reference replays what it missed
                self.serial.step(step, *train_batch(self.text, args, step))
        self.n_params = sum(v.size for k, v in self.model.state_dict().items()
                            if k != "lm_head.weight")
        self.per_token = model_flops_per_token(self.cfg, self.n_params)
        self.peak = machine_rate(comm, self.model, args.peak_size)
        rows = args.batch // args.dp
        self.rows = slice(self.mesh.dp_rank * rows, (self.mesh.dp_rank + 1) * rows)
        self.vals = val_batches(self.text, args)
        self.layout = dict(ranks=comm.Get_size(), mpi_library=mpi_library(), dp=args.dp,
                           tp=self.mesh.tp.size,
                           sequence_parallel=args.sequence_parallel, dtype=args.dtype,
                           seed=args.seed, dropout=args.dropout, params=self.n_params)
        self.losses: list[float] = []
        self.reference: list[float] = []
        self.diffs: list[float] = []
        self.val: Optional[float] = None
        self.busy = self.total_busy = 0.0
        self.done = self.total_done = 0

    def validate(self) -> tuple[float, Optional[float]]:
        """The validation loss (nats/char) over the fixed batches, each replica its rows, and
        the reference's on rank 0 with --check. Collective."""
        count = self.args.eval_batches * self.args.batch * self.args.block_size
        mine = sum(self.trainer.nll_sum(x[self.rows], y[self.rows]) for x, y in self.vals)
        ref = sum(self.serial.nll_sum(x, y) for x, y in self.vals) / count \
            if self.serial else None
        return self.mesh.dp_comm.allreduce(mine) / count, ref

    def header(self) -> None:
        args, cfg = self.args, self.cfg
        if args.resume:
            self.say(f"resumed from {args.resume} at step {self.start} (dropout call "
                     f"{self.model.calls})")
        sp = " with sequence parallelism" if args.sequence_parallel else ""
        self.say(f"train_gpt: P={self.comm.Get_size()} as dp x tp = {args.dp} x "
                 f"{self.mesh.tp.size}{sp}, {args.dtype} on {self.model.backend.name}; GPT "
                 f"{cfg.n_layer} layers, "
                 f"{cfg.n_head} heads, d={cfg.n_embd}, T={cfg.block_size}, vocab "
                 f"{cfg.vocab_size} ({self.n_params:,} parameters), dropout {cfg.dropout}; "
                 f"batch {args.batch} ({args.batch // args.dp} per replica), AdamW lr "
                 f"{args.lr} (warmup {args.warmup}, cosine to step {self.decay}), clip "
                 f"{args.grad_clip}")
        self.say(f"text: pydoc_data.topics, {len(self.text.train):,} training / "
                 f"{len(self.text.val):,} validation characters; unigram entropy "
                 f"{self.text.entropy:.3f} nats/char (the loss of a model that ignores context); "
                 f"machine GEMM rate {self.peak:.1f} GFLOP/s over {self.comm.Get_size()} ranks "
                 f"({args.dtype}, n={args.peak_size})")
        self.say(f"{'step':>5} {'train loss':>11} {'serial':>11} {'rel diff':>9} "
                 f"{'val loss':>9} {'tokens/s':>9} {'MFU':>6} {'lr':>8} {'grad norm':>9}")

    def train(self, out: Optional[Any]) -> None:
        """The steps, each on the global batch of its step (this replica's rows); the log lines
        and records every --log-every steps, at a validation and at the last step."""
        args = self.args
        for step in range(self.start, self.start + args.steps):
            idx, targets = train_batch(self.text, args, step)
            self.comm.Barrier()  # the step's time is this layout's, not rank 0's reference
            began = time.perf_counter()
            loss, norm = self.trainer.step(step, idx[self.rows], targets[self.rows])
            self.busy += time.perf_counter() - began
            self.done += 1
            self.losses.append(self.mesh.dp_comm.allreduce(loss) / args.dp)
            rec: dict = dict(kind="train_gpt", step=step, train_loss=self.losses[-1])
            if self.serial is not None:
                rec["serial_loss"] = self.serial.step(step, idx, targets)[0]
                self.reference.append(rec["serial_loss"])
                self.diffs.append(abs(self.losses[-1] - rec["serial_loss"])
                                  / abs(rec["serial_loss"]))
            self.val = None
            if (step + 1) % args.eval_every == 0 or step == self.start + args.steps - 1:
                self.val, val_ref = self.validate()
                rec["val_loss"] = self.val
                if val_ref is not None:
                    rec["serial_val_loss"] = val_ref
                    self.diffs.append(abs(self.val - val_ref) / abs(val_ref))
            if step % args.log_every == 0 or "val_loss" in rec:
                self.log(rec, step, norm, out)

    def log(self, rec: dict, step: int, norm: float, out: Optional[Any]) -> None:
        """Print one line and append one record: the throughput since the last one (the
        slowest rank's step time, barriers excluded). Collective."""
        busy = self.comm.allreduce(self.busy, op=MPI.MAX)
        self.total_busy, self.total_done = self.total_busy + busy, self.total_done + self.done
        tps = self.args.batch * self.args.block_size * self.done / busy
        lr = learning_rate(self.args, step, self.decay)
        rec.update(tokens_per_s=tps, mfu=tps * self.per_token / (self.peak * 1e9), lr=lr,
                   grad_norm=norm, **self.layout)
        diff = f"{self.diffs[-1]:.1e}" if "serial_loss" in rec else "-"
        self.say(f"{step:5d} {rec['train_loss']:11.5f} {_fmt(rec.get('serial_loss')):>11} "
                 f"{diff:>9} {_fmt(rec.get('val_loss')):>9} {tps:9.0f} {rec['mfu']:6.1%} "
                 f"{lr:8.2e} {norm:9.3f}")
        write_record(rec, out)
        self.busy, self.done = 0.0, 0

    def finish(self, out: Optional[Any]) -> dict:
        """The summary, --check's verdict, --save, the sample and the last record."""
        args = self.args
        tokens_per_s = args.batch * args.block_size * self.total_done / self.total_busy
        mfu = tokens_per_s * self.per_token / (self.peak * 1e9)
        self.say(f"validation loss {_fmt(self.val)} nats/char against the unigram entropy "
                 f"{self.text.entropy:.3f}; {tokens_per_s:,.0f} tokens/s, model FLOP "
                 f"utilisation {mfu:.1%} of {self.peak:.1f} GFLOP/s")
        worst = self.comm.bcast(max(self.diffs) if self.diffs else None, root=0)
        tol = CHECK_TOL.get(args.dtype, 5e-2)
        agree = worst is None or worst <= tol
        if worst is not None:
            self.say(f"--check: worst relative difference from the serial float64 run over "
                     f"{len(self.reference)} training losses and the validation losses "
                     f"{worst:.1e} (tolerance {tol:.0e} for {args.dtype}): "
                     f"{'agree' if agree else 'DISAGREE'}")
        end = self.start + args.steps
        if args.save:
            tpmpi.save_checkpoint(args.save, self.model, state=self.trainer.opt.state_arrays(),
                                  meta={"train_gpt": {
                                      "step": end, "calls": self.model.calls,
                                      "t": self.trainer.opt.t, "decay_steps": self.decay,
                                      **{k: getattr(args, k) for k in RESUMED}}})
            self.say(f"saved model, AdamW state and step {end} to {args.save}")
        generated = sample(self.model, self.text, args, self.comm)
        self.say(f"sample (seed {args.seed}, temperature {args.temperature}):\n{generated}")
        write_record(dict(kind="train_gpt", step=end, sample=generated, val_loss=self.val,
                          unigram_entropy=self.text.entropy, tokens_per_s=tokens_per_s,
                          mfu=mfu, gemm_gflops=self.peak, **self.layout), out)
        self.mesh.free()
        return {"steps": list(range(self.start, end)), "losses": self.losses,
                "serial": self.reference if self.serial else None, "val_loss": self.val,
                "max_rel_diff": worst, "agree": agree, "sample": generated,
                "tokens_per_s": tokens_per_s, "mfu": mfu, "unigram_entropy": self.text.entropy}


def main(argv: Optional[Sequence[str]] = None, comm: Optional[MPI.Comm] = None) -> dict:
    """Train; returns ``{"steps", "losses", "serial", "val_loss", "max_rel_diff", "agree",
    "sample", "tokens_per_s", "mfu", "unigram_entropy"}`` (``losses``: the global training loss
    of every step run; ``serial``: the reference's, on rank 0 with --check, else None).
    Collective over ``comm`` (default COMM_WORLD); bad arguments raise the same ValueError on
    every rank."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    args = parse_args(build_parser(), argv, comm)
    with usage():
        agree_checks(comm, lambda: check_flags(args, comm.Get_size()))
    tpmpi.configure_blas_threads(comm)
    run = Run(args, comm)
    run.header()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.json, "a")) if args.json and run.rank == 0 \
            else None
        run.train(out)
        return run.finish(out)


def cli() -> int:
    """The command line's work: exit 2 with a one-line message (rank 0) on usage errors, 1 if
    ``--check`` finds the curves apart."""
    return 0 if main(sys.argv[1:], MPI.COMM_WORLD)["agree"] else 1


if __name__ == "__main__":
    launch.run(cli, "train_gpt.py")
