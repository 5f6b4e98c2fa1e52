#!/usr/bin/env python
"""nanoGPT's transformer block in PyTorch (CPU), tensor-parallel with DTensor over gloo: the
comparison that tpmpi's own TP block is timed against.

    torchrun --nproc-per-node 2 scripts/torch_tp_block.py           # DTensor TP 2, 1 thread each
    mpiexec -n 2 python scripts/torch_tp_block.py --json torch.jsonl # the same under MPI
    python scripts/torch_tp_block.py --threads 2                     # TP 1: plain torch
    mpiexec -n 2 python scripts/torch_tp_block.py --check --d-model 64 --heads 4 --seq 16

The block is ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`` with nanoGPT's module names (fused
``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``), biases, LayerNorm eps 1e-5,
causal softmax attention (``scaled_dot_product_attention``, nanoGPT's own call, or with
``--attention explicit`` nanoGPT's path without it) and the exact (erf) GELU; no dropout. At
TP size P (``--tp``, the launched world size) the plan is torchtitan's pre-refactor Llama plan:
``ColwiseParallel`` on ``c_attn`` and ``c_fc`` (replicated input, output sharded by columns,
kept local), ``RowwiseParallel`` on both ``c_proj`` (output all-reduced), so each rank runs
``heads / P`` attention heads with no communication inside attention: one all-reduce after
each ``c_proj`` in forward and one of dX at each column input in backward. A contiguous
column shard of nanoGPT's blocked ``[Q | K | V]`` rows would hand rank 0 only queries, so
``c_attn`` is stored with its rows grouped per rank (``qkv_rows``) and the state dict is kept,
and compared, in nanoGPT's layout.

A step is forward + backward of one block on a replicated input x (B, T, d) with a fixed
upstream gradient: every parameter gradient and dX. Timing: ``--warmup`` steps, then ``--iters``
steps, each started after a barrier; a step's time is the slowest rank's, and the record holds
their median, min and max. Model FLOPs follow Narayanan et al. 2021 for one block: forward
``24 B T d^2 + 4 B T^2 d`` (causal masking not discounted), forward + backward 3 x forward.
Beside them, in the same run, rank 0 measures the GEMM rate (``--gemm-threads`` threads,
default every core the run uses) of torch and of NumPy at the block's twelve product shapes
(forward, dX and dW of the four linears at TP 1, in ``--dtype``; each shape's best of
``--gemm-repeats``) and the record gives the block's model FLOP/s (at the median step) as a
fraction of each.

Threads: ``torch.set_num_threads(--threads)`` on every rank, default the node's cores divided
by the ranks on it, so P ranks never oversubscribe the cores. Rendezvous: ``torchrun``'s
environment, or under ``mpiexec``/``srun`` mpi4py's COMM_WORLD, whose rank 0 picks a free TCP
port for gloo's store and broadcasts it. ``--check`` first compares the TP block's output, dX
and every parameter gradient (gathered) with the same block run serially in float64 and with
the independent NumPy reference ``tests/gpt_reference.py`` (relative error in the max norm per
tensor), and exits 1 when the worst exceeds the dtype's tolerance. One JSON line per run goes
to stdout on rank 0 (and is appended to ``--json FILE``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import resource
import socket
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from threadpoolctl import threadpool_info, threadpool_limits
from torch import nn

TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
"""Worst relative error (max norm per tensor) that ``--check`` accepts, per dtype."""

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "gpt_reference.py"


@dataclass
class World:
    """Where this process runs: its rank, the world size, the ranks on its node and the launcher
    ("single", "torchrun" or "mpi")."""

    rank: int = 0
    size: int = 1
    local_size: int = 1
    launcher: str = "single"


def discover() -> World:
    """The world from torchrun's environment, else from mpi4py under an MPI launcher, else one
    process."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(env):
        size = int(env["WORLD_SIZE"])
        return World(int(env["RANK"]), size, int(env.get("LOCAL_WORLD_SIZE", size)), "torchrun")
    if any(k in env for k in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
                              "SLURM_PROCID")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        world = World(comm.Get_rank(), comm.Get_size(), local.Get_size(), "mpi")
        local.Free()
        return world
    return World()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=1024, help="model width d (default 1024)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--seq", type=int, default=512, help="sequence length T (default 512)")
    p.add_argument("--batch", type=int, default=4, help="batch size B (default 4)")
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    p.add_argument("--attention", choices=sorted(ATTENTION), default="sdpa",
                   help="sdpa: scaled_dot_product_attention (default); explicit: the scores of "
                        "every local head formed at once (nanoGPT without flash)")
    p.add_argument("--tp", type=int, default=None,
                   help="TP size: the launched world size (default); 1 runs plain torch")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: the node's cores / its ranks)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--gemm-threads", type=int, default=None,
                   help="threads of the GEMM-rate measurement (default: threads x local ranks)")
    p.add_argument("--gemm-repeats", type=int, default=3,
                   help="timed repeats per GEMM shape (0: no GEMM-rate measurement)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a gloo collective waits for a missing rank (default 300)")
    p.add_argument("--check", action="store_true",
                   help="compare output and every gradient with the float64 references first")
    p.add_argument("--json", metavar="FILE", help="append the record to FILE")
    return p


def validate(args: argparse.Namespace, world: World) -> None:
    """Fill the defaults and raise ValueError naming any bad argument; every rank parses the same
    command line, so every rank raises the same error before any collective."""
    for name in ("d_model", "heads", "seq", "batch", "threads", "gemm_threads", "timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={value}: expected a positive number")
    for name in ("warmup", "iters", "gemm_repeats"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 0")
    args.tp = world.size if args.tp is None else args.tp
    if args.tp != world.size:
        raise ValueError(f"--tp={args.tp}: expected the launched world size {world.size} "
                         f"(launcher {world.launcher})")
    if args.d_model % args.heads:
        raise ValueError(f"--d-model={args.d_model}: expected a multiple of --heads={args.heads}")
    if args.heads % args.tp:
        raise ValueError(f"--heads={args.heads}: expected a multiple of the TP size {args.tp} "
                         "(DTensor shards whole heads evenly)")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // world.local_size)
    if args.gemm_threads is None:
        args.gemm_threads = args.threads * world.local_size


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """nanoGPT's path without flash attention: q, k, v (B, h, T, hd) -> (B, h, T, hd), the
    (B, h, T, T) scores of every head formed at once, masked, softmaxed."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's ``scaled_dot_product_attention`` (a flash kernel on CPU), nanoGPT's default."""
    return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


ATTENTION = {"sdpa": fused_attention, "explicit": explicit_attention}


class Attention(nn.Module):
    """Causal self-attention over the heads whose rows ``c_attn`` holds locally: ``c_attn``'s
    output (B, T, 3 h hd) is ``[Q | K | V]`` of those h heads (all of them at TP 1)."""

    def __init__(self, d: int, heads: int, core: str = "sdpa") -> None:
        super().__init__()
        self.head_dim = d // heads
        self.core = ATTENTION[core]
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under TP the local output holds heads / P of them
        q, k, v = self.c_attn(x).view(B, T, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.c_proj(self.core(q, k, v).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """``c_proj(gelu(c_fc(x)))``, width 4 d, exact GELU."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """nanoGPT's ``Block`` without dropout: (B, T, d) -> (B, T, d)."""

    def __init__(self, d: int, heads: int, core: str = "sdpa") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = Attention(d, heads, core)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def qkv_rows(d: int, heads: int, tp: int) -> torch.Tensor:
    """The order of nanoGPT's ``c_attn`` rows (blocked ``[Q | K | V]``, head-major inside each)
    that makes torch's contiguous shard r of 3 d / tp rows ``[Q | K | V]`` of heads
    ``r heads/tp .. (r+1) heads/tp - 1``: stored row i is nanoGPT row ``qkv_rows(...)[i]``."""
    return torch.arange(3 * d).view(3, tp, d // tp).transpose(0, 1).reshape(-1)


def canonical_state(d: int, heads: int, seed: int) -> dict:
    """A float64 state dict of one block in nanoGPT's names and layout (LayerNorm weights near
    1, everything else normal with nanoGPT's std 0.02 scaled up so the check sees every term)."""
    shapes = {name: tuple(t.shape) for name, t in Block(d, heads).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        draw = torch.randn(shape, generator=g, dtype=torch.float64)
        state[name] = 1.0 + 0.1 * draw if name.startswith("ln_") else 0.2 * draw / d ** 0.25
    return state


def _permuted(state: dict, rows: torch.Tensor) -> dict:
    """``state`` with ``attn.c_attn`` rows taken in the order ``rows`` (a copy)."""
    out = dict(state)
    for key in ("attn.c_attn.weight", "attn.c_attn.bias"):
        out[key] = state[key][rows]
    return out


def make_block(args: argparse.Namespace, state: dict, dtype: torch.dtype) -> nn.Module:
    """The block holding ``state`` (nanoGPT layout) in ``dtype``, tensor-parallel over the
    default process group when ``args.tp`` > 1 (rows of c_attn grouped per rank first)."""
    block = Block(args.d_model, args.heads, args.attention).to(dtype)
    if args.tp > 1:
        state = _permuted(state, qkv_rows(args.d_model, args.heads, args.tp))
    block.load_state_dict(state)
    if args.tp == 1:
        return block
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (args.tp,))
    plan = {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    return parallelize_module(block, mesh, plan)


def step(block: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one block: the output; gradients land in ``.grad``."""
    for p in block.parameters():
        p.grad = None
    x.grad = None
    y = block(x)
    y.backward(dy)
    return y.detach()


def gathered_grads(block: nn.Module, args: argparse.Namespace) -> dict:
    """{name: full float64 gradient} in nanoGPT's layout (sharded ones gathered: collective)."""
    grads = {}
    for name, p in block.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).to(torch.float64)
    if args.tp > 1:
        back = torch.argsort(qkv_rows(args.d_model, args.heads, args.tp))
        grads = _permuted(grads, back)
    return grads


def reference_block(state: dict, x: np.ndarray, dy: np.ndarray, heads: int) -> dict:
    """Output, dX and gradients of tests/gpt_reference.py's block (NumPy float64)."""
    spec = importlib.util.spec_from_file_location("gpt_reference", REFERENCE)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{REFERENCE}: the NumPy reference is part of the repository")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    sd = {f"h.{k}": v.numpy() for k, v in state.items()}
    cfg = types.SimpleNamespace(n_head=heads, n_kv_head=heads, n_embd=x.shape[-1], vocab_size=1)
    z = ref.Dims(cfg, x.shape[0], x.shape[1])
    y, saved = ref._block(x, sd, "h", 0, z, None)
    grads: dict = {}
    dx = ref._block_back(dy, sd, "h", z, saved, grads)
    out = {k[2:]: torch.from_numpy(v) for k, v in grads.items()}
    out.update(output=torch.from_numpy(y), x=torch.from_numpy(dx))
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    scale = float(want.abs().max())
    diff = float((got.to(torch.float64) - want).abs().max())
    return diff / scale if scale else diff


def check(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Worst relative errors of the TP block in ``dtype`` against the serial torch block in
    float64 and against the NumPy reference, over the output, dX and every parameter gradient;
    also the two references against each other."""
    state = canonical_state(args.d_model, args.heads, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, args.seq, args.d_model)
    x, dy = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))

    def run(block: nn.Module, dt: torch.dtype, tp_args: argparse.Namespace) -> dict:
        xin = x.to(dt, copy=True).requires_grad_()
        y = step(block, xin, dy.to(dt))
        result = gathered_grads(block, tp_args)
        result.update(output=y.to(torch.float64), x=xin.grad.to(torch.float64))
        return result

    serial_args = argparse.Namespace(**{**vars(args), "tp": 1})
    serial = run(make_block(serial_args, state, torch.float64), torch.float64, serial_args)
    tp = run(make_block(args, state, dtype), dtype, args)
    ref = reference_block(state, x.numpy(), dy.numpy(), args.heads)
    errs: dict = {"serial": {}, "reference": {}, "references": {}}
    for name, want in serial.items():
        errs["serial"][name] = rel_err(tp[name], want)
        errs["reference"][name] = rel_err(tp[name], ref[name])
        errs["references"][name] = rel_err(want, ref[name])
    return errs


def gemm_shapes(tokens: int, d: int) -> list:
    """(m, k, n) of the block's twelve linear products at TP 1: forward X W^T, dX = dY W and
    dW = dY^T X of c_attn (d -> 3d), attn.c_proj (d -> d), c_fc (d -> 4d), mlp.c_proj (4d -> d);
    their FLOPs sum to 72 tokens d^2, the linear part of the model FLOPs."""
    shapes = []
    for n_in, n_out in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):
        shapes += [(tokens, n_in, n_out), (tokens, n_out, n_in), (n_out, tokens, n_in)]
    return shapes


def gemm_rate(shapes: list, repeats: int, matmul: Callable, make: Callable) -> float:
    """FLOP/s of ``matmul(a, b)`` over ``shapes``: total FLOPs over the sum of each shape's
    best time of ``repeats`` runs (after one untimed run), the machine's rate at those shapes
    as tpmpi's GEMM peak takes it (a shared machine only ever slows a run down)."""
    flops = seconds = 0.0
    for m, k, n in shapes:
        a, b = make((m, k)), make((k, n))
        matmul(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a, b)
            times.append(time.perf_counter() - t0)
        flops += 2.0 * m * k * n
        seconds += min(times)
    return flops / seconds


def gemm_rates(args: argparse.Namespace) -> dict:
    """{"torch": FLOP/s, "numpy": FLOP/s} of the block's products in ``--dtype`` with
    ``--gemm-threads`` threads (this rank's torch threads are restored after)."""
    shapes = gemm_shapes(args.batch * args.seq, args.d_model)
    rng = np.random.default_rng(args.seed)

    def make_np(shape: tuple) -> np.ndarray:
        return rng.standard_normal(shape).astype(args.dtype)

    torch.set_num_threads(args.gemm_threads)
    try:
        rate_torch = gemm_rate(shapes, args.gemm_repeats, torch.mm,
                               lambda shape: torch.from_numpy(make_np(shape)))
    finally:
        torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.gemm_threads, user_api="blas"):
        rate_numpy = gemm_rate(shapes, args.gemm_repeats, np.matmul, make_np)
    return {"torch": rate_torch, "numpy": rate_numpy}


def model_flops(args: argparse.Namespace) -> float:
    """Narayanan et al. 2021 for one block, forward + backward: 3 (24 B T d^2 + 4 B T^2 d)."""
    B, T, d = args.batch, args.seq, args.d_model
    return 3.0 * (24.0 * B * T * d * d + 4.0 * B * T * T * d)


def barrier(args: argparse.Namespace) -> None:
    if args.tp > 1:
        dist.barrier()


def time_steps(args: argparse.Namespace, dtype: torch.dtype) -> list:
    """Seconds of each timed step, the slowest rank's (max all-reduce over the group)."""
    state = canonical_state(args.d_model, args.heads, args.seed)
    block = make_block(args, state, dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, args.seq, args.d_model)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=dtype)
    times = []
    for i in range(args.warmup + args.iters):
        barrier(args)
        t0 = time.perf_counter()
        step(block, x, dy)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64)
    if args.tp > 1:
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def init_group(world: World, timeout: float) -> None:
    """gloo's default group: torchrun's environment, or a TCP store whose port rank 0 of
    mpi4py's COMM_WORLD picks and broadcasts."""
    wait = datetime.timedelta(seconds=timeout)
    if world.launcher == "torchrun":
        dist.init_process_group("gloo", timeout=wait)
        return
    from mpi4py import MPI

    host = "127.0.0.1" if world.local_size == world.size else socket.gethostname()
    port = 0
    if world.rank == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    host, port = MPI.COMM_WORLD.bcast((host, port), root=0)
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=world.rank,
                            world_size=world.size, timeout=wait)


def _numpy_blas() -> str:
    libs = [f"{i['internal_api']} {i.get('version')}" for i in threadpool_info()
            if i["user_api"] == "blas"]
    return ", ".join(libs)


def record(args: argparse.Namespace, world: World, times: list, rates: Optional[dict],
           errs: Optional[dict]) -> dict:
    """The run's JSON record (rank 0's view; times are already the slowest rank's)."""
    flops = model_flops(args)
    median = statistics.median(times) if times else None
    rate = flops / median if median else None
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])
    if args.tp > 1:
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    worst = None if errs is None else max(
        ((err, kind, name) for kind in ("serial", "reference") for name, err in errs[kind].items()),
        key=lambda item: item[0])
    return {
        "scheme": "torch_block", "impl": "dtensor" if args.tp > 1 else "torch",
        "ranks": world.size, "tp": args.tp, "launcher": world.launcher,
        "threads_per_rank": args.threads, "d_model": args.d_model, "heads": args.heads,
        "seq": args.seq, "batch": args.batch, "dtype": args.dtype, "attention": args.attention,
        "warmup": args.warmup, "iters": args.iters,
        "time_s": None if not times else {"median": median, "min": min(times),
                                          "max": max(times)},
        "model_flops": flops, "gflops": None if rate is None else rate / 1e9,
        "gemm_threads": args.gemm_threads,
        "gemm_gflops": None if rates is None else {k: v / 1e9 for k, v in rates.items()},
        "gemm_fraction": None if rates is None or rate is None else {
            k: rate / v for k, v in rates.items()},
        "max_rel_err": None if errs is None else max(errs["serial"].values()),
        "max_rel_err_reference": None if errs is None else max(errs["reference"].values()),
        "references_rel_err": None if errs is None else max(errs["references"].values()),
        "check_worst": None if worst is None else f"{worst[2]} vs {worst[1]}",
        "check_ok": None if worst is None else worst[0] <= TOLERANCE[args.dtype],
        "rss_peak_bytes": int(rss.item()),
        "torch_version": torch.__version__, "numpy_version": np.__version__,
        "numpy_blas": _numpy_blas(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: Optional[list] = None, world: Optional[World] = None) -> dict:
    """Run (and ``--check``) as the command line says; the record, on every rank. ValueError
    for bad arguments (every rank alike, before any collective)."""
    world = discover() if world is None else world
    args = build_parser().parse_args(argv)
    validate(args, world)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    if args.tp > 1:
        init_group(world, args.timeout)
    try:
        errs = check(args, dtype) if args.check else None
        times = time_steps(args, dtype) if args.iters else []
        rates = None
        if args.gemm_repeats:
            barrier(args)  # the other ranks wait idle while rank 0 measures
            rates = gemm_rates(args) if world.rank == 0 else None
            barrier(args)
        rec = record(args, world, times, rates, errs)
    finally:
        if args.tp > 1:
            dist.destroy_process_group()
    if world.rank == 0:
        line = json.dumps(rec)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(line + "\n")
    return rec


def cli(argv: Optional[list] = None) -> int:
    """The command line: 0 when done, 1 when ``--check`` fails, 2 for bad arguments (the
    message once, from rank 0)."""
    world = discover()
    try:
        result = main(argv, world)
    except ValueError as exc:  # bad arguments: raised on every rank alike
        if world.rank == 0:
            print(f"torch_tp_block.py: error: {exc}", file=sys.stderr)
        return 2
    if result["check_ok"] is False:
        if world.rank == 0:
            print(f"torch_tp_block.py: check failed: {result['check_worst']} exceeds "
                  f"{TOLERANCE[result['dtype']]:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
