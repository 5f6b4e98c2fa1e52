#!/usr/bin/env python
"""Where a transformer block's step goes on one rank: the local kernels of tpmpi.layers
(LayerNorm, causal attention core, exact GELU, dropout masks, element-wise glue) and the block's
twelve GEMMs, each timed alone at the shard sizes of a TP rank, and their sum as the projected
step (no communication: add the collectives' time for TP > 1).

    python scripts/kernel_profile.py                          # nanoGPT block d=1024, 16 heads,
                                                              # T=512, B=4, float32; TP 1 x 1
                                                              # and 2 threads, TP 2 x 1 thread
    python scripts/kernel_profile.py --cases 2x1 --dropout 0.1 --json prof.jsonl
    python scripts/kernel_profile.py --baseline /tmp/old      # old tree's kernels side by side

Each case ``PxH`` is rank 0 of TP size ``P`` with ``H`` BLAS threads (threadpoolctl). Every
kernel runs ``--warmup`` times, then ``--repeats`` times; with ``--baseline DIR`` (a checkout
holding an older ``tpmpi/``, imported under another name) each repeat runs the old kernel and
then the new one, so both see the same load, and each record holds the best, the median and the
machine's 1-minute load average. The block is nanoGPT's (ln_1, fused QKV, causal attention,
c_proj, residual, ln_2, c_fc 4d, exact GELU, c_proj, residual, biases); a kernel's ``count`` is
how often a step runs it. Model FLOPs follow Narayanan et al. 2021 for one block: ``3 x (24 B T
d^2 + 4 B T^2 d)`` (causal masking not discounted); ``mfu_vs_gemm`` is the model FLOP/s of the
projected step over the GEMMs' own rate in the same case. One JSON line per kernel and per case
summary goes to stdout (and is appended to ``--json FILE``); the last lines compare each TP-P
case with the ceiling (TP 1 with P x threads) and with ``--torch-s`` (PyTorch DTensor's step).

On a shared machine the wall-clock figures carry the other users' load; each record also holds
the CPU time of this process (``cpu_*``), which for one thread is what the wall clock of a
quiet machine would read. The ``cpu_*`` comparison estimates the ceiling from TP 1 x 1: its
GEMMs divided by the P cores (perfect BLAS scaling: a conservative ceiling) plus its
element-wise work, which NumPy runs on one thread whatever the BLAS threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np
from threadpoolctl import threadpool_limits

import tpmpi
from tpmpi.core.heads import head_partition
from tpmpi.core.partition import block_partition


def load_tree(root: str) -> ModuleType:
    """The ``tpmpi`` package of the checkout ``root`` imported as ``tpmpi_baseline`` (its
    imports are relative, so it is self-contained beside this one)."""
    init = Path(root) / "tpmpi" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "tpmpi_baseline", init, submodule_search_locations=[str(init.parent)])
    assert spec is not None and spec.loader is not None, init
    module = importlib.util.module_from_spec(spec)
    sys.modules["tpmpi_baseline"] = module
    spec.loader.exec_module(module)
    return module


def kernels_of(package: ModuleType) -> SimpleNamespace:
    """The kernel entry points of one ``tpmpi`` package."""
    name = package.__name__

    def sub(path: str) -> Any:
        return importlib.import_module(f"{name}.{path}")
    functional, core = sub("layers.functional"), sub("layers.attention_core")
    dropout, activations = sub("core.dropout"), sub("layers.activations")
    gelu, gelu_grad = activations.get_activation("gelu_erf")
    return SimpleNamespace(layer_norm=functional.layer_norm,
                           layer_norm_backward=functional.layer_norm_backward,
                           dropout=functional.dropout, attention=core.causal_attention,
                           attention_backward=core.causal_attention_backward,
                           keep_mask=dropout.keep_mask, attention_keep=dropout.attention_keep,
                           gelu=gelu, gelu_grad=gelu_grad,
                           path=str(Path(str(package.__file__)).parent))


def block_products(N: int, d: int, qkv: int, proj: int, hidden: int
                   ) -> list[tuple[str, int, int, int]]:
    """``(name, m, k, n)`` of the block's forward, dX and dW products on one rank."""
    out = []
    for layer, fan_in, fan_out in (("c_attn", d, qkv), ("attn.c_proj", proj, d),
                                   ("c_fc", d, hidden), ("mlp.c_proj", hidden, d)):
        out += [(f"{layer}.forward", N, fan_in, fan_out), (f"{layer}.dx", N, fan_out, fan_in),
                (f"{layer}.dw", fan_out, N, fan_in)]
    return out


def shard_dims(a: argparse.Namespace, tp: int) -> dict[str, int]:
    """The product dimensions of rank 0 of TP size ``tp``: tokens ``N``, ``d``, its fused QKV
    columns, its attention-projection inputs and its MLP hidden columns."""
    shard = head_partition(a.heads, a.kv_heads or a.heads, tp).shard(0)
    hd = a.d_model // a.heads
    h0, h1 = block_partition(4 * a.d_model, tp)[0]
    return dict(N=a.batch * a.seq, d=a.d_model, qkv=(shard.n_q + 2 * shard.n_kv) * hd,
                proj=shard.n_q * hd, hidden=h1 - h0)


def gemm_flops(a: argparse.Namespace, tp: int) -> float:
    return sum(2.0 * m * k * n for _, m, k, n in block_products(**shard_dims(a, tp)))


class Case:
    """Rank 0 of TP size ``tp``: its shard's inputs and the kernels' calls on them."""

    def __init__(self, args: argparse.Namespace, tp: int) -> None:
        B, T, d, H = args.batch, args.seq, args.d_model, args.heads
        self.hd = d // H
        part = head_partition(H, args.kv_heads or H, tp)
        shard = part.shard(0)
        self.kv_of_q, self.q_head0 = shard.kv_of_q, shard.q_heads[0]
        self.dims = shard_dims(args, tp)
        hidden = self.dims["hidden"]
        rng = np.random.default_rng(0)
        dt = np.dtype(args.dtype)

        def normal(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape, dtype=np.float32).astype(dt)
        self.x, self.dy = normal(B, T, d), normal(B, T, d)
        self.w, self.b = 1 + 0.1 * normal(d), normal(d)
        self.q, self.dq = normal(B, T, shard.n_q, self.hd), normal(B, T, shard.n_q, self.hd)
        self.k, self.v = normal(B, T, shard.n_kv, self.hd), normal(B, T, shard.n_kv, self.hd)
        self.f, self.df = normal(B, T, hidden), normal(B, T, hidden)
        self.qkv_out = normal(B, T, self.dims["qkv"])
        self.bias_qkv, self.bias_fc = normal(self.dims["qkv"]), normal(hidden)
        self.args = args
        self.mats = {name: (normal(m, k) if not name.endswith("dw") else normal(k, m).T,
                            normal(k, n)) for name, m, k, n in block_products(**self.dims)}

    def kernels(self, K: SimpleNamespace) -> dict[str, tuple[int, Callable[[], Any]]]:
        """name -> (calls per step, call) for the kernels of ``K``."""
        a, p = self.args, self.args.dropout
        key = dict(seed=1, call=0, layer=0)
        keep = K.attention_keep(p, **key, n_head=a.heads, seq=a.seq, q_head0=self.q_head0) \
            if p else None
        _, ln_saved = K.layer_norm(self.x, self.w, self.b)
        _, att_saved = K.attention(self.q, self.k, self.v, self.kv_of_q, p=p, keep=keep)
        out: dict[str, tuple[int, Callable[[], Any]]] = {
            "layer_norm.forward": (2, lambda: K.layer_norm(self.x, self.w, self.b)),
            "layer_norm.backward": (2, lambda: K.layer_norm_backward(self.dy, ln_saved)),
            "attention.forward": (1, lambda: K.attention(self.q, self.k, self.v, self.kv_of_q,
                                                         p=p, keep=keep)),
            "attention.backward": (1, lambda: K.attention_backward(self.dq, att_saved)),
            "gelu.forward": (1, lambda: K.gelu(self.f)),
            "gelu.backward": (1, lambda: self.df * K.gelu_grad(self.f)),
        }
        if p:
            def hidden_keep() -> Any:
                return K.keep_mask(p, **key, site=3, sample_shape=(a.seq, a.d_model),
                                   samples=(0, a.batch))
            mask = hidden_keep()
            out["dropout.hidden_mask"] = (4, hidden_keep)  # two sites, regenerated in backward
            out["dropout.apply"] = (4, lambda: K.dropout(self.x, mask, p))
        return out

    def glue(self) -> dict[str, tuple[int, Callable[[], Any]]]:
        """The block's own element-wise work around the kernels (bias adds, residual adds,
        bias gradients), plain NumPy: the same for every tree."""
        return {"glue.bias_residual": (1, lambda: (self.qkv_out + self.bias_qkv,
                                                   self.f + self.bias_fc,
                                                   self.x + (self.dy + self.b),
                                                   self.x + (self.dy + self.b))),
                "glue.bias_grads": (1, lambda: (self.qkv_out.sum(axis=(0, 1)),
                                                self.f.sum(axis=(0, 1)),
                                                self.dy.sum(axis=(0, 1)),
                                                self.dy.sum(axis=(0, 1))))}

    def gemms(self) -> dict[str, tuple[int, Callable[[], Any]]]:
        def product(a: np.ndarray, b: np.ndarray) -> Callable[[], Any]:
            return lambda: a @ b
        return {f"gemm.{name}": (1, product(*self.mats[name]))
                for name, *_ in block_products(**self.dims)}


def timed(calls: dict[Any, Callable[[], Any]], warmup: int, repeats: int
          ) -> tuple[dict[Any, list[float]], dict[Any, list[float]]]:
    """Wall-clock and CPU seconds (this process, all its threads) of each call, ``repeats``
    samples each, the calls interleaved per repeat."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    wall: dict[Any, list[float]] = {name: [] for name in calls}
    cpu: dict[Any, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def model_flops(a: argparse.Namespace) -> float:
    B, T, d = a.batch, a.seq, a.d_model
    return 3.0 * (24 * B * T * d * d + 4 * B * T * T * d)


Split = dict[str, float]
"""Seconds of a step's parts: ``gemm``, ``kernels`` (this tree's), ``glue``."""


def run_case(a: argparse.Namespace, tp: int, threads: int, trees: dict[str, SimpleNamespace],
             emit: Callable[[dict], None]) -> dict[tuple[str, str], Split]:
    """Time one case; emits a record per kernel and tree and a summary per tree; returns the
    step's split per (tree, clock) with clock "wall" or "cpu"."""
    case = Case(a, tp)
    label = f"tp{tp}x{threads}"
    with threadpool_limits(threads):
        shared = {**case.glue(), **case.gemms()}
        per_tree = {tree: case.kernels(K) for tree, K in trees.items()}
        calls = {(tree, name): fn for tree, ks in per_tree.items() for name, (_, fn) in ks.items()}
        calls.update({("shared", name): fn for name, (_, fn) in shared.items()})
        clocks = dict(zip(("wall", "cpu"), timed(calls, a.warmup, a.repeats)))
    load = os.getloadavg()[0]
    counts = {("shared", n): c for n, (c, _) in shared.items()}
    counts.update({(t, n): c for t, ks in per_tree.items() for n, (c, _) in ks.items()})
    for (tree, name), s in clocks["wall"].items():
        emit({"case": label, "tree": tree, "kernel": name, "count": counts[tree, name],
              "best_ms": round(1e3 * min(s), 3), "median_ms": round(1e3 * statistics.median(s), 3),
              "cpu_best_ms": round(1e3 * min(clocks["cpu"][tree, name]), 3),
              "load": round(load, 2)})

    def total(clock: str, tree: str, gemm: bool = False) -> float:
        return sum(counts[key] * min(s) for key, s in clocks[clock].items()
                   if key[0] == tree and key[1].startswith("gemm.") == gemm)
    flops = gemm_flops(a, tp)
    out: dict[tuple[str, str], Split] = {}
    for tree in trees:
        for clock in clocks:
            out[tree, clock] = {"gemm": total(clock, "shared", gemm=True),
                                "kernels": total(clock, tree), "glue": total(clock, "shared")}
        wall, cpu = out[tree, "wall"], out[tree, "cpu"]
        step = sum(wall.values())
        emit({"case": label, "tree": tree, "summary": True, "tp": tp, "threads": threads,
              **{f"{k}_s": round(v, 6) for k, v in wall.items()},
              "projected_step_s": round(step, 6),
              **{f"cpu_{k}_s": round(v, 6) for k, v in cpu.items()},
              "cpu_projected_step_s": round(sum(cpu.values()), 6),
              "gemm_gflops": round(flops / wall["gemm"] / 1e9, 1),
              "model_gflops": round(model_flops(a) / step / 1e9, 1),
              "mfu_vs_gemm": round(model_flops(a) / step / (flops * tp / wall["gemm"]), 3),
              "load": round(load, 2)})
    return out


def compare(a: argparse.Namespace, splits: dict[tuple[int, int], dict[tuple[str, str], Split]],
            emit: Callable[[dict], None]) -> None:
    """For each TP > 1 case: its projected step against the ceiling, TP 1 with as many BLAS
    threads as the case has cores (measured when that case ran), and against ``--torch-s``;
    with the TP 1 x 1 case and one thread a rank, the same from CPU times too (the figure a
    loaded machine does not distort), the ceiling then estimated as TP 1 x 1's GEMMs divided by
    the cores plus its single-threaded element-wise work."""
    for (tp, threads), by in splits.items():
        if tp == 1:
            continue
        for tree in sorted({t for t, _ in by}):
            rec: dict[str, Any] = {"compare": f"tp{tp}x{threads}", "tree": tree,
                                   "torch_s": a.torch_s}
            step = sum(by[tree, "wall"].values())
            ceiling = splits.get((1, tp * threads))
            if ceiling:
                top = sum(ceiling[tree, "wall"].values())
                rec.update(projected_step_s=round(step, 6), ceiling_s=round(top, 6),
                           efficiency=round(top / step, 3), vs_torch=round(a.torch_s / step, 3))
            serial = splits.get((1, 1))
            if serial and threads == 1:
                one = serial[tree, "cpu"]
                top = one["gemm"] / tp + one["kernels"] + one["glue"]
                cpu_step = sum(by[tree, "cpu"].values())
                rec.update(cpu_step_s=round(cpu_step, 6), cpu_ceiling_est_s=round(top, 6),
                           cpu_efficiency=round(top / cpu_step, 3),
                           cpu_vs_torch=round(a.torch_s / cpu_step, 3),
                           cpu_mfu_vs_gemm=round(model_flops(a) / cpu_step / (
                               tp * gemm_flops(a, 1) / one["gemm"]), 3))
            emit(rec)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--cases", nargs="+", default=["1x1", "1x2", "2x1"],
                    help="PxH: rank 0 of TP size P with H BLAS threads")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", default=None, help="a checkout whose tpmpi/ is the 'before'")
    ap.add_argument("--torch-s", type=float, default=0.78,
                    help="PyTorch DTensor TP step measured here (scripts/torch_tp_block.py)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    trees = {"current": kernels_of(tpmpi)}
    if a.baseline:
        trees = {"baseline": kernels_of(load_tree(a.baseline)), **trees}

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if a.json:
            with open(a.json, "a") as fh:
                fh.write(line + "\n")
    emit({"config": {k: v for k, v in vars(a).items() if k != "json"},
          "trees": {t: K.path for t, K in trees.items()}, "cpus": os.cpu_count()})
    splits = {}
    for spec in a.cases:
        tp, threads = (int(x) for x in spec.split("x"))
        splits[tp, threads] = run_case(a, tp, threads, trees, emit)
    compare(a, splits, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
