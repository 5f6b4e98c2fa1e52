"""Tables and plots from JSON-lines records (``python -m tpmpi report``).

Scheme records (``bench``/``run``) give report.md and report.csv (times as median and min-max,
speedup and per-core efficiency against the serial baseline, scaling efficiency against the
series' smallest P, flags) and the figures of :mod:`tpmpi.studies.plots`: time vs ranks, scaling
efficiency, time breakdown, predicted vs measured. Collective records (``bench
--collective``) give collectives.csv and busbw vs message size. Needs matplotlib (extra
``plot``); the Agg backend is used, so no display is needed.
"""
from __future__ import annotations

import csv
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Optional

from . import plots
from .costmodel import layout_label
from .problem import options_label
from ..core.args import check_field, is_number
from .record import check_record, read_lines
from .transformer import SPLIT_ORDER, describe
from .stats import PREDICTION_NOTE, SUPERLINEAR, prediction_mark, short

DIMS = ("m", "k", "n", "hidden")


def load(paths: Iterable[str]) -> list[dict]:
    """Every record of the JSON-lines files (blank lines skipped), each checked field by field
    (:func:`tpmpi.studies.record.check_record`); ValueError naming the file, the line and the
    field otherwise, so that no record is dropped or misdrawn silently."""
    out = []
    for where, rec in read_lines(paths):
        if isinstance(rec, dict) and rec.get("kind") == TRAINING:
            check_training(rec, where)
        else:
            check_record(rec, where)
        out.append(rec)
    return out


TRAINING = "train_gpt"
"""The ``kind`` of the records of ``scripts/train_gpt.py --json``."""


def check_training(rec: dict, where: str) -> None:
    """A training record: ``step`` a non-negative integer; the losses and ``tokens_per_s``,
    where present, finite non-negative numbers; ``sample`` a string (the run's last record).
    ValueError naming the file, the line and the field otherwise."""
    check_field(where, rec, "step", int, "a non-negative integer", lambda v: v >= 0)
    for key in ("train_loss", "val_loss", "serial_loss", "tokens_per_s"):
        if rec.get(key) is not None:
            check_field(where, rec, key, (int, float), "a finite non-negative number",
                        lambda v: is_number(v) and v >= 0)
    if "sample" in rec:
        check_field(where, rec, "sample", str, "the generated text")


def training_runs(records: Sequence[dict]) -> list[dict]:
    """The runs of training records in file order, each ended by its record holding the
    ``sample``: ``{"label", "steps", "train", "val", "serial", "last"}`` (``train``, ``val``,
    ``serial``: ``[(step, loss)]``; ``last``: the closing record, or None for a run cut
    short)."""
    runs: list[dict] = []
    current: Optional[dict] = None
    for rec in records:
        if current is None:
            sp = "+SP" if rec.get("sequence_parallel") else ""
            label = (f"dp {rec.get('dp', '?')} x tp {rec.get('tp', '?')}{sp}, "
                     f"{rec.get('dtype', '?')}, dropout {rec.get('dropout', 0)}")
            current = {"label": label, "train": [], "val": [], "serial": [], "last": None}
            runs.append(current)
        for key, field in (("train", "train_loss"), ("val", "val_loss"),
                           ("serial", "serial_loss")):
            if rec.get(field) is not None and "sample" not in rec:
                current[key].append((rec["step"], rec[field]))
        if "sample" in rec:
            current["last"] = rec
            current = None
    labels = [r["label"] for r in runs]
    for i, run in enumerate(runs):  # the same layout twice (e.g. a resumed run): numbered
        if labels.count(run["label"]) > 1:
            run["label"] += f" (run {labels[:i + 1].count(run['label'])})"
    return runs


def _md_training(runs: Sequence[dict]) -> list[str]:
    """report.md's training section: per run the last validation loss, tokens/s, sample."""
    lines = ["## Training (scripts/train_gpt.py)", "",
             ("| run | ranks | steps | last train loss | val loss | unigram entropy | tokens/s "
              "| MFU |"), "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        last = run["last"] or {}
        steps = f"{run['train'][0][0]}-{run['train'][-1][0]}" if run["train"] else "-"
        lines.append(f"| {run['label']} | {last.get('ranks', '–')} | {steps} | "
                     f"{_fmt(run['train'][-1][1] if run['train'] else None, '{:.4f}')} | "
                     f"{_fmt(last.get('val_loss'), '{:.4f}')} | "
                     f"{_fmt(last.get('unigram_entropy'), '{:.3f}')} | "
                     f"{_fmt(last.get('tokens_per_s'), '{:,.0f}')} | "
                     f"{_fmt(last.get('mfu'), '{:.1%}')} |")
    samples = [(run["label"], run["last"]["sample"]) for run in runs if run["last"]]
    for label, text in samples[-1:]:
        lines += ["", f"Sample of the last run ({label}):", "", "```", text, "```"]
    return lines + [""]


def _opts(rec: dict) -> str:
    return options_label(rec.get("options") or {})


def layout(rec: dict) -> str:
    """``scheme RxC [dp=D] [options]`` of a record (:func:`tpmpi.studies.costmodel.layout_label`, as
    ``plan`` labels layouts)."""
    return layout_label(rec["scheme"], rec["grid"].split("x"),
                        (rec.get("mesh") or {}).get("dp", 1), rec.get("options"))


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
    # records of run (no sweep) are a series of their own kind: strong scaling only when they
    # hold several P
    return (rec["scheme"], _opts(rec), rec["dtype"], bool(rec.get("backward")), two_d,
            sweep.get("kind", "run")) + tuple(dims.values())


def _labels(keys: Iterable[tuple]) -> tuple[dict, str]:
    """({series key: legend label}, the parts common to all series): the label names the
    layout (scheme, 2D, options, MLP hidden size), plus dtype and pass where they vary."""
    keys = list(keys)
    dtypes = {k[2] for k in keys}
    passes = {"fwd+bwd" if k[3] else "forward" for k in keys}
    labels = {}
    for key in keys:
        scheme, opts, dtype, bwd, two_d, _kind, _m, _k, _n, h = key
        parts = [scheme + (" 2D" if two_d else ""), opts, dtype if len(dtypes) > 1 else "",
                 ("fwd+bwd" if bwd else "forward") if len(passes) > 1 else "",
                 f"h={h}" if h else ""]
        labels[key] = " ".join(p for p in parts if p)
    common = [d for d in (dtypes, passes) if len(d) == 1]
    return labels, ", ".join(next(iter(d)) for d in common)


def _panel_key(key: tuple) -> tuple:
    """Panels in order: sweep kind, then m, k, n."""
    return key[5:9]


def _panel_title(key: tuple) -> str:
    """The panel of a series: the sweep kind and the problem size (weak: per rank)."""
    kind, m, k, n = key[5:9]
    return f"{kind}: " + (f"m/P={m}" if kind == "weak" else f"m={m}") + f" k={k} n={n}"


def series(records: Sequence[dict]) -> dict:
    """{series key: [(ranks, median time, record)] sorted by ranks}, fastest record per P."""
    best: dict = defaultdict(dict)
    for r in records:
        key, p, t = series_key(r), r["ranks"], r["time_s"]["median"]
        if p not in best[key] or t < best[key][p][1]:
            best[key][p] = (p, t, r)
    return {k: sorted(v.values(), key=lambda x: x[0]) for k, v in best.items()}


def scaling_efficiency(records: Sequence[dict]) -> dict:
    """{id(record): scaling efficiency} against the fastest record at the smallest P0 of its
    series: strong (and runs without a sweep) T(P0)·P0 / (P·T(P)), weak T(P0) / T(P). A series
    of one P has none (1.00 by definition would read as perfect scaling)."""
    out = {}
    for key, pts in series(records).items():
        if len(pts) < 2:
            continue
        p0, t0, _ = pts[0]
        for r in records:
            if series_key(r) == key:
                t = r["time_s"]["median"]
                out[id(r)] = t0 / t if key[5] == "weak" else t0 * p0 / (r["ranks"] * t)
    return out


def report_flags(rec: dict, scaling_eff: Optional[float]) -> list[str]:
    """The record's flags plus ``superlinear-scaling`` when its scaling efficiency exceeds
    :data:`tpmpi.studies.stats.SUPERLINEAR`."""
    return list(rec.get("flags") or []) + (
        ["superlinear-scaling"] if (scaling_eff or 0.0) > SUPERLINEAR else [])


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


def _scaling_panels(ser: dict, eff: dict) -> tuple[dict, str]:
    """({panel title: {series label: [(P, median, min, max, scaling efficiency or None,
    flags)]}}, the parts common to every series); panels ordered by sweep kind and size."""
    labels, common = _labels(ser)
    panels: dict = {}
    for key in sorted(ser, key=_panel_key):
        panels.setdefault(_panel_title(key), {})[labels[key]] = [
            (p, t, r["time_s"].get("min", t), r["time_s"].get("max", t), eff.get(id(r)),
             report_flags(r, eff.get(id(r)))) for p, t, r in ser[key]]
    return panels, common


def _breakdown_panels(records: Sequence[dict], eff: dict) -> dict:
    """{panel title: [(bar label, time, gemm, comm, flags)]}, panels ordered by sweep kind and
    size, bars by series label then P."""
    labels, _ = _labels({series_key(r) for r in records})
    panels: dict = {}
    for r in sorted(records, key=lambda r: (_panel_key(series_key(r)),
                                            labels[series_key(r)], r["ranks"])):
        key = series_key(r)
        panels.setdefault(_panel_title(key), []).append(
            (f"{labels[key]} P={r['ranks']}", r["time_s"]["median"], r["gemm_s"], r["comm_s"],
             report_flags(r, eff.get(id(r)))))
    return panels


def _busbw_panels(colls: Sequence[dict]) -> dict:
    """{collective: {"P=.. dtype": [(size, busbw)]}}."""
    panels: dict = defaultdict(lambda: defaultdict(list))
    for r in colls:
        if r.get("busbw_gbs") is not None:
            panels[r["collective"]][f"P={r['ranks']} {r['dtype']}"].append(
                (r["size"], r["busbw_gbs"]))
    return {op: dict(series) for op, series in panels.items()}


TIMED = ("time", "gemm", "comm")
# report.csv columns (the markdown table shows the same values)
CSV_COLUMNS = (["layout", "scheme", "grid", "ranks", "m", "k", "n", "hidden", "dtype", "backward",
                "options", "iters"]
               + [f"{t}_ms_{s}" for t in TIMED for s in ("median", "min", "max")]
               + ["pred_ms", "gflops", "busbw_gbs", "speedup", "eff_core", "scaling_eff",
                  "mem_mib", "max_rel_err", "flags"])
COLL_COLUMNS = ("collective", "ranks", "dtype", "size", "count", "time_us", "algbw_gbs",
                "busbw_gbs", "wrong")


def _ms(summary: Optional[dict], key: str) -> Optional[float]:
    value = (summary or {}).get(key)
    return None if value is None else value * 1e3


def table_rows(schemes: Sequence[dict]) -> list[dict]:
    """One dict of :data:`CSV_COLUMNS` per scheme record (times in ms, flags a list)."""
    eff = scaling_efficiency(schemes)
    rows = []
    for r in schemes:
        spread = r.get("spread") or {}
        timed = {"time": r["time_s"], "gemm": spread.get("gemm_s") or {"median": r["gemm_s"]},
                 "comm": spread.get("comm_s") or {"median": r["comm_s"]}}
        row = {"layout": layout(r), **{c: r.get(c) for c in (
            "scheme", "grid", "ranks", "m", "k", "n", "hidden", "dtype", "backward", "iters")},
            "options": _opts(r)}
        for t in TIMED:
            for stat in ("median", "min", "max"):
                row[f"{t}_ms_{stat}"] = _ms(timed[t], stat)
        row.update(pred_ms=_ms(r, "predicted_s"), pred_mark=prediction_mark(r),
                   gflops=r.get("gflops"),
                   busbw_gbs=r.get("busbw_gbs"), speedup=r.get("speedup"),
                   eff_core=r.get("efficiency"), scaling_eff=eff.get(id(r)),
                   mem_mib=r["mem_peak_bytes"] / 2**20, max_rel_err=r.get("max_rel_err"),
                   flags=report_flags(r, eff.get(id(r))))
        rows.append(row)
    return rows


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """``rows`` as CSV with a header of ``columns`` (None empty, lists joined with ';')."""
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(columns)
        for row in rows:
            out.writerow(["" if row.get(c) is None else
                          ";".join(row[c]) if isinstance(row[c], list) else row[c]
                          for c in columns])


def _fmt(v: object, f: str) -> str:
    return "–" if v is None else f.format(v)


def _range(row: dict, t: str) -> str:
    """``median (min–max)`` ms of a timed column."""
    med, lo, hi = (row[f"{t}_ms_{s}"] for s in ("median", "min", "max"))
    return _fmt(med, "{:.3f}") + ("" if lo is None else f" ({short(lo)}–{short(hi)})")


def _md_schemes(schemes: Sequence[dict]) -> list[str]:
    """report.md's measured table (one row per scheme record)."""
    lines = [("Times per step in ms: **median (min–max)** over the timed iterations, each "
              "iteration the slowest rank's. speedup = serial baseline / time; eff/core = "
              "speedup × baseline threads / (P × threads per rank), both against the serial "
              "single-process baseline of the same job; scaling eff = T(P0)·P0 / (P·T(P)) "
              "(weak: T(P0) / T(P)) against the smallest P0 of the series, as in "
              f"efficiency.png; none for a series of one P. {PREDICTION_NOTE}. Flags: "
              "docs/statistics.md; in the figures, each flagged point carries its flags' "
              "letters. Also in report.csv."), "",
             ("| layout | P | m | k | n | dtype | time ms | GEMM ms | comm ms | pred ms | "
              "GFLOP/s | busbw GB/s | speedup | eff/core | scaling eff | mem MiB | flags |"),
             ("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              "---|")]
    for row in table_rows(schemes):
        lines.append(
            f"| {row['layout']}" + (f" h={row['hidden']}" if row["hidden"] else "")
            + f" | {row['ranks']} | {row['m']} | {row['k']} | {row['n']} | {row['dtype']} "
            + "".join(f"| {_range(row, t)} " for t in TIMED)
            + f"| {_fmt(row['pred_ms'], '{:.3f}')}{row['pred_mark']} "
            f"| {_fmt(row['gflops'], '{:.1f}')} "
            f"| {_fmt(row['busbw_gbs'], '{:.2f}')} | {_fmt(row['speedup'], '{:.2f}')} "
            f"| {_fmt(row['eff_core'], '{:.2f}')} | {_fmt(row['scaling_eff'], '{:.2f}')} "
            f"| {row['mem_mib']:.1f} | {', '.join(row['flags']) or '–'} |")
    return lines + [""]


def _md_collectives(colls: Sequence[dict]) -> list[str]:
    """report.md's collective summary: peak bus bandwidth and wrong elements per op, P and
    dtype."""
    best: dict = defaultdict(float)
    for r in colls:
        best[(r["collective"], r["ranks"], r["dtype"])] = max(
            best[(r["collective"], r["ranks"], r["dtype"])], r.get("busbw_gbs") or 0.0)
    lines = [("Collectives: time is the mean of back-to-back calls (nccl-tests convention), "
              "per size in collectives.csv."), "",
             "| collective | P | dtype | peak busbw GB/s | #wrong |",
             "|---|---:|---|---:|---:|"]
    for (op, p, dtype), bw in sorted(best.items()):
        wrong = sum(r.get("wrong") or 0 for r in colls
                    if (r["collective"], r["ranks"], r["dtype"]) == (op, p, dtype))
        lines.append(f"| {op} | {p} | {dtype} | {bw:.3f} | {wrong} |")
    return lines + [""]


def _md_accuracy(acc: dict) -> list[str]:
    """report.md's cost-model accuracy section (:func:`accuracy`)."""
    lines = ["## Cost model accuracy", "",
             (f"median \\|predicted − measured\\| / measured: {acc['median_rel_err']:.1%} "
              f"over {acc['records']} records (max {acc['max_rel_err']:.1%}); predicted "
              f"fastest layout = measured fastest in {acc['ranked_first']} of "
              f"{acc['problems']} problems."), ""]
    for p in acc["picks"]:
        lines.append(f"- {p['problem']}: measured fastest `{p['measured_fastest']}`, "
                     f"predicted `{p['predicted_fastest']}` ({p['loss']:.2f}x)")
    return lines + [""]


def _md_transformer(records: Sequence[dict]) -> list[str]:
    """report.md's transformer section: per record of a transformer scheme its model, model
    GFLOP/s and MFU, and where a step goes: the cost model's parts of the schedule and the
    measured products, collectives and the rest (ms)."""
    rows = [r for r in records if r.get("model") and r.get("split")]
    if not rows:
        return []
    parts = sorted({k for r in rows for k in r["split"]["predicted"]},
                   key=lambda k: (k not in SPLIT_ORDER, SPLIT_ORDER.index(k)
                                  if k in SPLIT_ORDER else 0, k))
    head = (["layout", "model", "ranks", "time_ms", "pred_ms", "GFLOP/s", "MFU"]
            + [f"pred {k}" for k in parts] + ["meas products", "meas collectives",
                                               "meas other"])
    lines = ["## Transformer: where a step goes", "",
             ("Model FLOPs as Narayanan et al. 2021 (docs/cli.md, \"Transformer schemes\"); "
              "MFU against `gemm_peak_gflops`. `pred` parts: the cost model's seconds of each "
              "part of the layers' schedule (collectives whole, overlapped or not); `meas`: "
              "the layers' local products, the time blocked in collectives, and the rest "
              "(attention core, element-wise work, Python), medians in ms."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pred, meas = r["split"]["predicted"], r["split"]["measured"]
        cells = [layout(r), describe(r["model"]), str(r["ranks"]),
                 _fmt(r["time_s"]["median"] * 1e3, "{:.4g}"),
                 _fmt(r["predicted_s"] * 1e3 if r.get("predicted_s") else None, "{:.4g}"),
                 _fmt(r.get("gflops"), "{:.4g}"), _fmt(r.get("mfu"), "{:.1%}")]
        cells += [_fmt(pred[k] * 1e3 if k in pred else None, "{:.3g}") for k in parts]
        cells += [_fmt(meas[k] * 1e3, "{:.3g}") for k in ("products", "collectives", "other")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(schemes: Sequence[dict], colls: Sequence[dict], acc: Optional[dict],
             files: Sequence[str], runs: Sequence[dict] = ()) -> str:
    """report.md: the measured table, the collective summary, cost-model accuracy, the
    training runs (:func:`training_runs`), plots."""
    lines = ["# tpmpi report", ""]
    if schemes:
        lines += _md_schemes(schemes) + _md_transformer(schemes)
    if colls:
        lines += _md_collectives(colls)
    if acc and acc["records"]:
        lines += _md_accuracy(acc)
    if runs:
        lines += _md_training(runs)
    lines += [f"![{f}]({f})" for f in files if f.endswith(".png")]
    return "\n".join(lines) + "\n"


def report(paths: Sequence[str], out: str) -> str:
    """Write the PNG plots, report.md and report.csv (collectives.csv for collective records)
    for the records in ``paths`` into ``out``; returns the report.md path. ValueError when
    there is nothing to plot or matplotlib is missing."""
    records = load(paths)
    schemes = [r for r in records if "scheme" in r]
    colls = [r for r in records if "collective" in r]
    runs = training_runs([r for r in records if r.get("kind") == TRAINING])
    if not schemes and not colls and not runs:
        raise ValueError(f"no records in {', '.join(paths)}")
    pyplot = plots.plt()
    os.makedirs(out, exist_ok=True)
    files: list[str] = []
    if schemes:
        eff = scaling_efficiency(schemes)
        panels, common = _scaling_panels(series(schemes), eff)
        plots.scaling(pyplot, panels, out, files, note=common)
        plots.breakdown(pyplot, _breakdown_panels(schemes, eff), out, files, note=common)
        with_pred: dict = defaultdict(list)
        for r in schemes:
            if r.get("predicted_s"):
                with_pred[r["scheme"]].append((r["time_s"]["median"], r["predicted_s"],
                                               report_flags(r, eff.get(id(r)))))
        if with_pred:
            plots.predicted(pyplot, dict(with_pred), out, files)
        write_csv(os.path.join(out, "report.csv"), table_rows(schemes), CSV_COLUMNS)
        files.append("report.csv")
    if colls:
        plots.busbw(pyplot, _busbw_panels(colls), out, files)
        write_csv(os.path.join(out, "collectives.csv"),
                  [dict(r, time_us=r["time_s"] * 1e6) for r in colls], COLL_COLUMNS)
        files.append("collectives.csv")
    if runs:
        plots.loss(pyplot, runs, out, files)
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write(markdown(schemes, colls, accuracy(schemes) if schemes else None, files,
                          runs))
    return path
