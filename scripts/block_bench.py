#!/usr/bin/env python
"""The transformer block's forward + backward side by side in one run: tpmpi at TP 2 (1 BLAS
thread per rank), tpmpi at TP 1 with 2 threads (the ceiling on 2 cores) and PyTorch DTensor TP 2
(scripts/torch_tp_block.py, 1 thread per rank; skipped with a note without torch).

    python scripts/block_bench.py                       # d=1024, 16 heads, T=512, B=4, float32
    flock /work/.mpi.lock python scripts/block_bench.py --iters 10 --json block.jsonl

Each configuration runs as its own job (``mpiexec -n P``); ``--rounds`` rounds alternate them,
so that load which comes and goes hits each alike, and a configuration's figure is the median
of its rounds' medians (min and max over all its steps). First the GEMM rate: the block's
twelve product shapes at TP 1 (forward, dX and dW of c_attn, c_proj, c_fc and the MLP's c_proj;
model FLOPs over the sum of each shape's best time) with all the threads the configurations
use, NumPy, measured in this process. Printed, and appended to
``--json`` as JSON lines: per configuration the median, min and max seconds of a step (the
slowest rank's), ``predicted_s`` (tpmpi's cost model for the same block and TP size: for torch,
what tpmpi's schedule predicts at its TP size), model GFLOP/s (Narayanan et al. 2021: forward
``24 B T d^2 + 4 B T^2 d``, x 3 with backward), MFU against the measured GEMM rate, the peak
memory per rank, and the load average before and after; then a summary line with the ceiling
ratio ``t(TP 1 x 2 threads) / t(TP 2) x 2 / (P x threads)`` and the ratios to torch. The machine
may be shared: compare the ratios measured side by side, and read the load. ``--baseline DIR``
adds an older checkout's TP 2 (its own ``tpmpi/``, run with DIR as the working directory) to
the same rounds, and the summary's ``baseline_over_tpmpi_tp2`` is the speedup measured side by
side.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch DTensor TP 2 x 1 thread"
BASELINE = "baseline tpmpi TP 2 x 1 thread"


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def gemm_rate(d: int, tokens: int, threads: int, repeats: int = 3) -> float:
    """GFLOP/s of the block's twelve product shapes at TP 1 (float32, ``threads`` threads)."""
    rng = np.random.default_rng(0)
    shapes = []
    for k, n in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):
        shapes += [(tokens, k, n), (tokens, n, k), (k, tokens, n)]  # forward, dX, dW
    flops = seconds = 0.0
    with threadpool_limits(limits=threads):
        for m, k, n in shapes:
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            flops += 2.0 * m * k * n
            seconds += best
    return flops / seconds / 1e9


def run_json(cmd: list[str], json_path: str, timeout: float, cwd: Path = ROOT
             ) -> Optional[dict]:
    """Run ``cmd`` in ``cwd`` (which appends one JSON line to ``json_path``); its last record,
    or None with the reason printed."""
    print(f"$ (cd {cwd}) " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    try:
        out = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s", flush=True)
        return None
    if out.returncode != 0:
        print(f"  exit {out.returncode}: {(out.stderr or out.stdout).strip()[-400:]}",
              flush=True)
        return None
    lines = [ln for ln in Path(json_path).read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def tpmpi_cmd(args: argparse.Namespace, ranks: int, threads: int, out: str) -> list[str]:
    return [*shlex.split(args.mpiexec), "-n", str(ranks), sys.executable, "-m", "tpmpi", "run",
            "--scheme", "block", "--m", str(args.batch * args.seq), "--k", str(args.d_model),
            "--heads", str(args.heads), "--seq", str(args.seq), "--dtype", "float32",
            "--backward", "--threads", str(threads), "--warmup", str(args.warmup),
            "--iters", str(args.iters), "--json", out] + (
            ["--calibration", args.calibration] if args.calibration else [])


def torch_cmd(args: argparse.Namespace, out: str) -> list[str]:
    return [*shlex.split(args.mpiexec), "-n", "2", sys.executable,
            str(ROOT / "scripts" / "torch_tp_block.py"), "--d-model", str(args.d_model),
            "--heads", str(args.heads), "--seq", str(args.seq), "--batch", str(args.batch),
            "--threads", "1", "--warmup", str(args.warmup), "--iters", str(args.iters),
            "--gemm-repeats", "1", "--json", out]


def predicted(args: argparse.Namespace, tp: int, threads: int) -> Optional[float]:
    """tpmpi's cost model for the block at TP ``tp`` (the torch row's reference)."""
    from tpmpi.studies.costmodel import load_calibration, predict
    from tpmpi.studies.problem import Problem

    problem = Problem(scheme="block", m=args.batch * args.seq, k=args.d_model, n=args.d_model,
                      heads=args.heads, seq=args.seq, backward=True)
    pred = predict(problem, tp, (1, tp), load_calibration(args.calibration),
                   oversubscription=tp * threads / max(1, os.cpu_count() or 1))
    return pred.time_s if pred else None


def merged(recs: list[dict]) -> Optional[dict]:
    """The rounds' records of one configuration as one: the median of their medians, the
    least minimum and the largest maximum; the other fields the first round's."""
    if not recs:
        return None
    medians = sorted(r["time_s"]["median"] for r in recs)
    median = float(np.median(medians))
    out = dict(recs[0], time_s={"median": median, "min": min(r["time_s"]["min"] for r in recs),
                                "max": max(r["time_s"]["max"] for r in recs)},
               rounds=len(recs))
    out["gflops"] = recs[0]["gflops"] * recs[0]["time_s"]["median"] / median
    return out


def row(name: str, rec: Optional[dict], peak: float, pred: Optional[float],
        before: list[float], note: str = "") -> dict[str, Any]:
    """One configuration's JSON line."""
    if rec is None:
        return {"config": name, "skipped": note or "failed (see above)", "load": before}
    t = rec["time_s"]
    gflops = rec.get("gflops")
    mem = rec.get("mem_peak_bytes", rec.get("rss_peak_bytes"))
    return {"config": name, "time_s": t, "spread": (t["max"] - t["min"]) / t["median"],
            "predicted_s": rec.get("predicted_s", pred), "gflops": gflops,
            "mfu": gflops / peak if gflops else None, "gemm_gflops": peak,
            "mem_peak_bytes": mem, "max_rel_err": rec.get("max_rel_err"),
            "split": rec.get("split"), "rounds": rec.get("rounds"),
            "own_gemm_gflops": rec.get("gemm_gflops") if name == TORCH else None,
            "load": [before, load()]}


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds, each running every configuration once, alternating")
    ap.add_argument("--calibration", metavar="FILE", default=None,
                    help="tpmpi's cost-model calibration for predicted_s")
    ap.add_argument("--mpiexec", default=os.environ.get("MPIEXEC", "mpiexec"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="a checkout of an older tpmpi: its TP 2 runs in the same rounds (its "
                         "own tpmpi/ imported from DIR), so the speedup is measured side by side")
    ap.add_argument("--json", metavar="FILE", help="append the JSON lines to FILE")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = load()
        peak = gemm_rate(args.d_model, args.batch * args.seq, threads=2)
        print(f"GEMM rate at the block's shapes, 2 threads: {peak:.1f} GFLOP/s (load {before})",
              flush=True)
        has_torch = subprocess.run([sys.executable, "-c", "import torch"], check=False,
                                   capture_output=True).returncode == 0
        configs = [("tpmpi TP 2 x 1 thread", lambda out: tpmpi_cmd(args, 2, 1, out), ROOT),
                   ("tpmpi TP 1 x 2 threads", lambda out: tpmpi_cmd(args, 1, 2, out), ROOT)]
        if args.torch and has_torch:
            configs.append((TORCH, lambda out: torch_cmd(args, out), ROOT))
        if args.baseline:
            configs.append((BASELINE, lambda out: tpmpi_cmd(args, 2, 1, out),
                            Path(args.baseline).resolve()))
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        first_load = load()
        for i in range(args.rounds):  # the configurations alternate: load hits them alike
            for k, (name, cmd, cwd) in enumerate(configs):
                out = os.path.join(tmp, f"{len(runs[name])}-{k}.jsonl")
                rec = run_json(cmd(out), out, args.timeout, cwd)
                if rec is not None:
                    runs[name].append(rec)
            print(f"round {i + 1}/{args.rounds} done (load {load()})", flush=True)
        for name, _, _ in configs:
            rows.append(row(name, merged(runs[name]), peak,
                            predicted(args, 2, 1) if name == TORCH else None, first_load))
        if not (args.torch and has_torch):
            rows.append(row(TORCH, None, peak, None, first_load,
                            "torch is not installed (pip install torch, CPU)"
                            if args.torch else "--no-torch"))
    times = {r["config"]: r["time_s"]["median"] for r in rows if "time_s" in r}
    tp2 = times.get("tpmpi TP 2 x 1 thread")
    summary: dict[str, Any] = {"summary": True, "d_model": args.d_model, "heads": args.heads,
                               "seq": args.seq, "batch": args.batch, "gemm_gflops": peak}
    if tp2 and times.get("tpmpi TP 1 x 2 threads"):
        summary["ceiling_ratio"] = times["tpmpi TP 1 x 2 threads"] / tp2 * 2 / (2 * 1)
    if tp2 and times.get(TORCH):
        summary["torch_over_tpmpi_tp2"] = times[TORCH] / tp2
    if tp2 and times.get(BASELINE):
        summary["baseline"] = args.baseline
        summary["baseline_over_tpmpi_tp2"] = times[BASELINE] / tp2
    for r in rows + [summary]:
        line = json.dumps(r)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(line + "\n")
    show(rows, summary)
    return 0


def show(rows: list[dict], summary: dict) -> None:
    """The side-by-side table of the rows and the summary's ratios."""
    print(f"{'config':32s} {'median s':>9s} {'min-max':>15s} {'pred s':>8s} {'GFLOP/s':>8s} "
          f"{'MFU':>6s} {'MiB/rank':>9s}  load")
    for r in rows:
        if "time_s" not in r:
            print(f"{r['config']:32s} skipped: {r['skipped']}")
            continue
        t = r["time_s"]
        pred = f"{r['predicted_s']:.3f}" if r.get("predicted_s") else "-"
        mem = f"{r['mem_peak_bytes'] / 2**20:.0f}" if r.get("mem_peak_bytes") else "-"
        print(f"{r['config']:32s} {t['median']:9.3f} {t['min']:7.3f}-{t['max']:<7.3f} {pred:>8s} "
              f"{r['gflops']:8.1f} {r['mfu']:6.1%} {mem:>9s}  {r['load'][0][0]}->"
              f"{r['load'][1][0]}")
    if "ceiling_ratio" in summary:
        print(f"ceiling ratio (TP 2 against TP 1 x 2 threads): {summary['ceiling_ratio']:.3f}")
    if "torch_over_tpmpi_tp2" in summary:
        print(f"torch DTensor TP 2 / tpmpi TP 2: {summary['torch_over_tpmpi_tp2']:.3f}")
    if "baseline_over_tpmpi_tp2" in summary:
        print(f"baseline TP 2 / tpmpi TP 2: {summary['baseline_over_tpmpi_tp2']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
