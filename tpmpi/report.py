"""Plots and a markdown table from JSON-lines records (``python -m tpmpi report``).

Scheme records (``bench``/``run``) give: time vs ranks with ideal scaling, parallel
efficiency, compute/communication breakdown, predicted vs measured. Collective records
(``bench --collective``) give busbw vs message size. Needs matplotlib (extra ``plot``); the
Agg backend is used, so no display is needed.
"""
from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from typing import Iterable, Optional, Sequence

DIMS = ("m", "k", "n", "hidden")


def load(paths: Iterable[str]) -> list[dict]:
    """Every record of the JSON-lines files (blank lines skipped)."""
    out = []
    for path in paths:
        with open(path) as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError as exc:
                        raise ValueError(f"{path}:{i}: not JSON ({exc})") from None
    return out


def _opts(rec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((rec.get("options") or {}).items()))


def layout(rec: dict) -> str:
    """``scheme RxC [dp=D] [options]`` of a record (as ``plan`` labels layouts)."""
    o = _opts(rec)
    dp = (rec.get("mesh") or {}).get("dp", 1)
    return f"{rec['scheme']} {rec['grid']}" + (f" dp={dp}" if dp > 1 else "") \
        + (f" {o}" if o else "")


def problem_key(rec: dict) -> tuple:
    """What a layout choice must keep fixed: sizes, dtype, backward, ranks."""
    return tuple(rec.get(d) for d in DIMS) + (rec["dtype"], bool(rec.get("backward")),
                                              rec["ranks"])


def series_key(rec: dict) -> tuple:
    """A scaling series: same scheme/options/dtype, grid kind (1D or 2D), and sizes (weak
    sweeps: the scaled dimension per rank)."""
    dims = {d: rec.get(d) for d in DIMS}
    sweep = rec.get("sweep") or {}
    if sweep.get("kind") == "weak":
        dims[sweep["dim"]] = dims[sweep["dim"]] // rec["ranks"]
    two_d = not str(rec["grid"]).startswith("1x")
    return (rec["scheme"], _opts(rec), rec["dtype"], bool(rec.get("backward")), two_d,
            sweep.get("kind", "strong")) + tuple(dims.values())


def _series_label(key: tuple) -> str:
    scheme, opts, dtype, bwd, two_d, kind, m, k, n, h = key
    parts = [scheme + (" 2D" if two_d else ""), opts, dtype, "fwd+bwd" if bwd else "",
             f"{'weak ' if kind == 'weak' else ''}m={m} k={k} n={n}" + (f" h={h}" if h else "")]
    return " ".join(p for p in parts if p)


def series(records: Sequence[dict]) -> dict:
    """{series key: [(ranks, median time, record)] sorted by ranks}, fastest record per P."""
    best: dict = defaultdict(dict)
    for r in records:
        key, p, t = series_key(r), r["ranks"], r["time_s"]["median"]
        if p not in best[key] or t < best[key][p][1]:
            best[key][p] = (p, t, r)
    return {k: sorted(v.values(), key=lambda x: x[0]) for k, v in best.items()}


def accuracy(records: Sequence[dict]) -> dict:
    """Cost-model accuracy: median and max of |predicted - measured| / measured, and for each
    problem with several measured layouts whether the layout with the lowest predicted time is
    the measured-fastest one."""
    errs = [abs(r["predicted_s"] - r["time_s"]["median"]) / r["time_s"]["median"]
            for r in records if r.get("predicted_s") and r["time_s"]["median"]]
    groups = defaultdict(list)
    for r in records:
        if r.get("predicted_s"):
            groups[problem_key(r)].append(r)
    picks = []
    for key, recs in groups.items():
        if len({layout(r) for r in recs}) > 1:
            fastest = min(recs, key=lambda r: r["time_s"]["median"])
            chosen = min(recs, key=lambda r: r["predicted_s"])
            picks.append({"problem": dict(zip(DIMS + ("dtype", "backward", "ranks"), key)),
                          "measured_fastest": layout(fastest), "predicted_fastest":
                          layout(chosen), "hit": layout(fastest) == layout(chosen),
                          "loss": chosen["time_s"]["median"] / fastest["time_s"]["median"]})
    return {"records": len(errs),
            "median_rel_err": statistics.median(errs) if errs else None,
            "max_rel_err": max(errs) if errs else None,
            "ranked_first": sum(p["hit"] for p in picks), "problems": len(picks),
            "picks": picks}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("report needs matplotlib: pip install 'tpmpi[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str, name: str, files: list) -> None:
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    files.append(name)


def _legend(ax, outside: bool = False) -> None:
    """A readable legend; ``outside`` puts it below the axes (many long series labels)."""
    if ax.get_legend_handles_labels()[0]:
        if outside:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.14))
        else:
            ax.legend(fontsize="small", loc="best", framealpha=0.8)


def _finish(fig, ax, out: str, name: str, files: list, *, xlabel: str, ylabel: str,
            title: str, grid: bool = True) -> None:
    """Labels, grid, legend, then save ``name``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    _save(fig, out, name, files)


def _scaling_plots(plt, ser: dict, out: str, files: list) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fig2, ax2 = plt.subplots(figsize=(7, 4.5))
    for i, (key, pts) in enumerate(sorted(ser.items(), key=lambda kv: str(kv[0]))):
        color = f"C{i % 10}"
        ps = [p for p, _, _ in pts]
        ts = [t * 1e3 for _, t, _ in pts]
        weak = key[5] == "weak"
        ax.plot(ps, ts, "o-", color=color, label=_series_label(key))
        p0, t0 = ps[0], ts[0]
        ideal = [t0 if weak else t0 * p0 / p for p in ps]
        ax.plot(ps, ideal, "--", color=color, alpha=0.6)
        eff = [t0 / t if weak else t0 * p0 / (p * t) for p, t in zip(ps, ts)]
        ax2.plot(ps, eff, "o-", color=color, label=_series_label(key))
    ax.plot([], [], "k--", alpha=0.6, label="ideal (dashed)")
    ranks = sorted({p for pts in ser.values() for p, _, _ in pts})
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(ranks)
        a.set_xticklabels([str(p) for p in ranks])
        a.minorticks_off()
        a.set_xlabel("ranks P")
        a.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("time per step, median (ms)")
    ax.set_title("Time vs ranks (dashed: ideal scaling)")
    ax2.axhline(1.0, color="k", lw=0.8, ls=":")
    ax2.set_ylabel("parallel efficiency (strong: T1·P1/(P·TP); weak: T1/TP)")
    ax2.set_title("Parallel efficiency")
    ax2.set_ylim(bottom=0)
    _legend(ax, outside=True)
    _legend(ax2, outside=True)
    _save(fig, out, "time_vs_ranks.png", files)
    _save(fig2, out, "efficiency.png", files)


def _breakdown(plt, recs: Sequence[dict], out: str, files: list) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(recs) + 2), 4.5))
    labels = [f"{layout(r)}\nP={r['ranks']} m={r['m']}" for r in recs]
    gemm = [r["gemm_s"] * 1e3 for r in recs]
    comm = [r["comm_s"] * 1e3 for r in recs]
    other = [max(0.0, r["time_s"]["median"] * 1e3 - g - c) for r, g, c in zip(recs, gemm, comm)]
    x = range(len(recs))
    ax.bar(x, gemm, label="local GEMM")
    ax.bar(x, comm, bottom=gemm, label="communication (blocked)")
    ax.bar(x, other, bottom=[g + c for g, c in zip(gemm, comm)], label="other (Python, copies)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize="x-small")
    _finish(fig, ax, out, "breakdown.png", files, xlabel="", ylabel="time per step (ms)",
            title="Compute / communication breakdown", grid=False)


def _predicted(plt, recs: Sequence[dict], out: str, files: list) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    by_scheme = defaultdict(list)
    for r in recs:
        by_scheme[r["scheme"]].append((r["time_s"]["median"] * 1e3, r["predicted_s"] * 1e3))
    for scheme, pts in sorted(by_scheme.items()):
        ax.scatter([m for m, _ in pts], [p for _, p in pts], label=scheme)
    vals = [v for pts in by_scheme.values() for pair in pts for v in pair if v > 0]
    lo, hi = min(vals) / 1.5, max(vals) * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(fig, ax, out, "predicted_vs_measured.png", files,
            xlabel="measured time, median (ms)", ylabel="predicted time (ms)",
            title="Cost model: predicted vs measured")


def _busbw(plt, recs: Sequence[dict], out: str, files: list) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = defaultdict(list)
    for r in recs:
        if r.get("busbw_gbs") is not None:
            groups[(r["collective"], r["ranks"], r["dtype"])].append((r["size"], r["busbw_gbs"]))
    for (op, p, dtype), pts in sorted(groups.items()):
        pts.sort()
        ax.plot([s for s, _ in pts], [b for _, b in pts], "o-", label=f"{op} P={p} {dtype}")
    ax.set_xscale("log", base=2)
    _finish(fig, ax, out, "busbw.png", files,
            xlabel="message size S (bytes, nccl-tests convention)",
            ylabel="bus bandwidth (GB/s)", title="Collective bus bandwidth vs message size")


def _fmt(v, f: str) -> str:
    return "–" if v is None else f.format(v)


def markdown(schemes: Sequence[dict], colls: Sequence[dict], acc: Optional[dict],
             files: Sequence[str]) -> str:
    """report.md: the measured table, the collective summary, cost-model accuracy, plots."""
    lines = ["# tpmpi report", ""]
    if schemes:
        lines += ["| layout | P | m | k | n | dtype | time ms | pred ms | GEMM ms | comm ms | "
                  "GFLOP/s | busbw GB/s | speedup | eff | mem MiB |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in schemes:
            pred = r.get("predicted_s")
            lines.append(
                f"| {layout(r)} | {r['ranks']} | {r['m']} | {r['k']} | {r['n']} | {r['dtype']} "
                f"| {r['time_s']['median'] * 1e3:.3f} | {_fmt(pred and pred * 1e3, '{:.3f}')} "
                f"| {r['gemm_s'] * 1e3:.3f} | {r['comm_s'] * 1e3:.3f} "
                f"| {_fmt(r.get('gflops'), '{:.1f}')} | {_fmt(r.get('busbw_gbs'), '{:.2f}')} "
                f"| {_fmt(r.get('speedup'), '{:.2f}')} | {_fmt(r.get('efficiency'), '{:.2f}')} "
                f"| {r['mem_peak_bytes'] / 2**20:.1f} |")
        lines.append("")
        lines.append("speedup / eff: against the serial single-process baseline measured in the "
                     "same job (all of the node's BLAS threads on one process).")
        lines.append("")
    if colls:
        best = defaultdict(float)
        for r in colls:
            best[(r["collective"], r["ranks"], r["dtype"])] = max(
                best[(r["collective"], r["ranks"], r["dtype"])], r.get("busbw_gbs") or 0.0)
        lines += ["| collective | P | dtype | peak busbw GB/s | #wrong |",
                  "|---|---:|---|---:|---:|"]
        for (op, p, dtype), bw in sorted(best.items()):
            wrong = sum(r.get("wrong") or 0 for r in colls
                        if (r["collective"], r["ranks"], r["dtype"]) == (op, p, dtype))
            lines.append(f"| {op} | {p} | {dtype} | {bw:.3f} | {wrong} |")
        lines.append("")
    if acc and acc["records"]:
        lines += ["## Cost model accuracy", "",
                  f"median \\|predicted − measured\\| / measured: {acc['median_rel_err']:.1%} "
                  f"over {acc['records']} records (max {acc['max_rel_err']:.1%}); predicted "
                  f"fastest layout = measured fastest in {acc['ranked_first']} of "
                  f"{acc['problems']} problems.", ""]
        for p in acc["picks"]:
            lines.append(f"- {p['problem']}: measured fastest `{p['measured_fastest']}`, "
                         f"predicted `{p['predicted_fastest']}` ({p['loss']:.2f}x)")
        lines.append("")
    lines += [f"![{f}]({f})" for f in files]
    return "\n".join(lines) + "\n"


def report(paths: Sequence[str], out: str) -> str:
    """Write the PNG plots and report.md for the records in ``paths`` into ``out``; returns
    the report.md path. ValueError when there is nothing to plot or matplotlib is missing."""
    records = load(paths)
    schemes = [r for r in records if "scheme" in r and r.get("time_s", {}).get("median")]
    colls = [r for r in records if "collective" in r]
    if not schemes and not colls:
        raise ValueError(f"no records in {', '.join(paths)}")
    plt = _plt()
    os.makedirs(out, exist_ok=True)
    files: list[str] = []
    if schemes:
        _scaling_plots(plt, series(schemes), out, files)
        _breakdown(plt, schemes, out, files)
        with_pred = [r for r in schemes if r.get("predicted_s")]
        if with_pred:
            _predicted(plt, with_pred, out, files)
    if colls:
        _busbw(plt, colls, out, files)
    plt.close("all")
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write(markdown(schemes, colls, accuracy(schemes) if schemes else None, files))
    return path
