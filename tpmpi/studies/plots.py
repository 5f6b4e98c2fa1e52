"""The report's figures (matplotlib, Agg backend): readable from 1 to 20+ series.

* One panel per problem size (facets), one shared legend outside the panels on the right.
* Every series has its own (colour, marker) pair, the same in every panel and figure.
* A value axis is logarithmic when its values span a decade or more, linear otherwise.
* Spread: time points carry min-max error bars (the record's ``time_s``).
* Flags: a flagged point (docs/statistics.md) carries its flags' letters in red
  (:data:`FLAG_LETTERS`), and the figure says what the letters mean; the predictions of the
  cost model's defaults are hollow in ``predicted_vs_measured.png``.

Figures: ``time_vs_ranks.png``, ``efficiency.png`` (scaling efficiency, see
docs/statistics.md), ``breakdown.png`` (shares of the step time, so small problems stay
visible), ``predicted_vs_measured.png``, ``busbw.png``, ``loss.png`` (training runs).
"""
from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

from ..core.args import DIGITS
from .stats import short

DIGIT_RUNS = re.compile(r"[0-9]+")

if TYPE_CHECKING:  # matplotlib is an optional extra, imported when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import Formatter

COLORS = [f"C{i}" for i in range(10)]  # matplotlib's default cycle (tab10)
MARKERS = ("o", "s", "D", "^", "v", "<", ">", "p", "X", "h")
PANEL_IN = (4.2, 3.2)  # inches per facet
MAX_COLS = 3
DECADE = 10.0  # max/min ratio from which an axis is logarithmic
PARTS = (("local GEMM", "C0"), ("communication (blocked)", "C1"),
         ("other (Python, copies)", "C7"))  # the stacked shares of breakdown.png
FLAG_LETTERS = {"superlinear": "S", "superlinear-scaling": "E", "noisy": "N",
                "noisy-baseline": "B", "oversubscribed": "O", "slow-baseline": "L",
                "overlap-implausible": "V", "pred-defaults": "D", "pred-other-machine": "M",
                "pred-other-ranks": "R"}
"""The letters a flagged point carries (flags of tpmpi.studies.stats and report)."""
MEASUREMENT = tuple(f for f in FLAG_LETTERS if not f.startswith("pred-"))
FLAG_COLOR = "#c00000"


def plt() -> ModuleType:
    """matplotlib.pyplot on the Agg backend; ValueError naming the extra when missing."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("report needs matplotlib: pip install 'tpmpi[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def styles(labels: Sequence[str]) -> dict:
    """{label: (colour, marker)}, pairwise distinct for up to 100 labels (natural order)."""
    out = {}
    for i, label in enumerate(sorted(set(labels), key=_natural)):
        out[label] = (COLORS[i % len(COLORS)], MARKERS[(i + i // len(COLORS)) % len(MARKERS)])
    return out


def spans_decades(values: Sequence[Optional[float]]) -> bool:
    """Whether the positive ``values`` span a factor of :data:`DECADE` or more."""
    pos = [v for v in values if v is not None and v > 0]
    return bool(pos) and max(pos) / min(pos) >= DECADE


def value_scale(ax: Axes, values: Sequence[Optional[float]], axis: str = "y") -> str:
    """Set ``axis`` of ``ax`` to "log" when ``values`` span decades, else "linear"; returns
    the scale."""
    scale = "log" if spans_decades(values) else "linear"
    (ax.set_yscale if axis == "y" else ax.set_xscale)(scale)
    if scale == "log":  # plain numbers (0.2, 30), minor ticks labelled within a decade or two
        target = ax.yaxis if axis == "y" else ax.xaxis
        target.set_major_formatter(_plain_log())
        target.set_minor_formatter(_plain_log())
    return scale


def _plain_log() -> Formatter:
    """matplotlib's LogFormatter choice of labelled ticks, printed as plain numbers."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def __call__(self, x: float, pos: Optional[int] = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.5))


def _entry_in(labels: Sequence[str]) -> float:
    """Width in inches of one legend entry (marker + the longest label, small font)."""
    return 0.55 + 0.07 * max((len(s) for s in labels), default=0)


def legend_cols(width_in: float, labels: Sequence[str]) -> int:
    """Legend columns that fit across a figure ``width_in`` inches wide."""
    return max(1, min(len(labels), int((width_in - 0.3) // _entry_in(labels))))


def facets(pyplot: ModuleType, n: int, *, width: float = PANEL_IN[0],
           height: float = PANEL_IN[1], legend_labels: Sequence[str] = (),
           max_cols: int = MAX_COLS) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` panels (a row of up to 3, else a near-square grid of up to
    ``max_cols`` columns), constrained layout, with room below the panels for a legend of
    ``legend_labels`` (at least two columns of entries wide); returns (fig, axes)."""
    cols = max(1, min(max_cols, n if n <= 3 else math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    fig_w = max(cols * width, 2 * _entry_in(legend_labels) + 0.3 if legend_labels else 0)
    entries = math.ceil(len(legend_labels) / legend_cols(fig_w, legend_labels)) \
        if legend_labels else 0
    fig, axes = pyplot.subplots(rows, cols, figsize=(fig_w, rows * height + 0.4 + 0.2 * entries),
                                layout="constrained", squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def legend(fig: Figure, handles_by_label: dict[str, Any], sort: bool = True) -> None:
    """One figure legend below the panels (inside the figure), in as many columns as fit;
    entries in natural order (``sort``) or as given."""
    if handles_by_label:
        labels = sorted(handles_by_label, key=_natural) if sort else list(handles_by_label)
        fig.legend([handles_by_label[k] for k in labels], labels, loc="outside lower center",
                   ncols=legend_cols(fig.get_figwidth(), labels), fontsize="small")


def suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    fig.suptitle(textwrap.fill(text, max(30, int(fig.get_figwidth() * 12))), fontsize="medium")


def mark_flags(ax: Axes, x: float, y: float, flags: Sequence[str], shown: set,
               keep: Sequence[str] = MEASUREMENT) -> None:
    """Write the letters of ``flags`` (those in ``keep``) next to the point ``(x, y)`` in red
    and remember them in ``shown`` for :func:`flags_note`."""
    letters = "".join(FLAG_LETTERS[f] for f in keep if f in flags)
    if letters:
        ax.annotate(letters, (x, y), xytext=(4, 4), textcoords="offset points",
                    color=FLAG_COLOR, fontsize=7, fontweight="bold")
        shown.update(f for f in keep if f in flags)


def flags_note(fig: Figure, shown: set) -> None:
    """A red line at the figure's top left saying what the flag letters on it mean."""
    if shown:
        text = ", ".join(f"{FLAG_LETTERS[f]} {f}" for f in FLAG_LETTERS if f in shown)
        fig.text(0.005, 0.995, f"flagged (docs/statistics.md): {text}", color=FLAG_COLOR,
                 fontsize=7, ha="left", va="top")


def save(pyplot: ModuleType, fig: Figure, out: str, name: str, files: list[str]) -> None:
    """Write ``name`` into ``out`` and close the figure."""
    fig.savefig(os.path.join(out, name), dpi=110)
    pyplot.close(fig)
    files.append(name)


def _rank_axis(ax: Axes, ranks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks))
    ax.set_xticklabels([str(p) for p in ranks])
    ax.minorticks_off()
    ax.set_xlabel("ranks P")
    ax.grid(True, which="major", alpha=0.3)


def scaling(pyplot: ModuleType, panels: dict, out: str, files: list[str], note: str = ""
            ) -> None:
    """time_vs_ranks.png and efficiency.png. ``panels`` = {panel title: {series label:
    [(P, median s, min s, max s, scaling efficiency or None, flags)]}} in display order, points
    sorted by P; ``note`` (what all series share) goes into the titles. efficiency.png shows
    the series of several P only (a lone point has no scaling efficiency), and is not written
    when there is none."""
    labels = sorted({s for series in panels.values() for s in series})
    style = styles(labels)
    ranks = sorted({pt[0] for series in panels.values() for pts in series.values()
                    for pt in pts})
    scaled = {title: {label: pts for label, pts in series.items() if pts[0][4] is not None}
              for title, series in panels.items()}
    scaled = {title: series for title, series in scaled.items() if series}
    fig, axes = facets(pyplot, len(panels), legend_labels=labels)
    handles: dict = {}
    shown: set = set()
    for ax, (title, series) in zip(axes, panels.items()):
        values = []
        for label, pts in sorted(series.items()):
            color, marker = style[label]
            ps = [p for p, *_ in pts]
            med = [t * 1e3 for _, t, *_ in pts]
            err = [[(t - lo) * 1e3 for _, t, lo, *_ in pts],
                   [(hi - t) * 1e3 for _, t, _, hi, *_ in pts]]
            handles[label] = ax.errorbar(ps, med, yerr=err, color=color, marker=marker,
                                         ms=5, capsize=2, lw=1.2)
            for (p, *_, flags), y in zip(pts, med):
                mark_flags(ax, p, y, flags, shown)
            ideal = [med[0] * ps[0] / p for p in ps] if "weak" not in title else \
                [med[0]] * len(ps)
            ax.plot(ps, ideal, ls="--", color=color, alpha=0.5, lw=0.9)
            values += med + [lo * 1e3 for _, _, lo, *_ in pts] + ideal
        _rank_axis(ax, ranks)
        ax.set_title(title, fontsize="medium")
        value_scale(ax, values)
        ax.set_ylabel("time per step (ms)")
    note = f" ({note})" if note else ""
    suptitle(fig, f"Time per step vs ranks{note}: median, bars min-max; dashed: ideal from "
             "the smallest P")
    flags_note(fig, shown)
    legend(fig, handles)
    save(pyplot, fig, out, "time_vs_ranks.png", files)
    if scaled:
        _efficiency(pyplot, scaled, style, ranks, note, out, files)


def _efficiency(pyplot: ModuleType, panels: dict, style: dict, ranks: list, note: str,
                out: str, files: list[str]) -> None:
    """efficiency.png of the series of several P (``panels`` as :func:`scaling`'s)."""
    labels = sorted({s for series in panels.values() for s in series})
    fig, axes = facets(pyplot, len(panels), legend_labels=labels)
    handles: dict = {}
    shown: set = set()
    for ax, (title, series) in zip(axes, panels.items()):
        for label, pts in sorted(series.items()):
            color, marker = style[label]
            effs = [e for *_, e, _ in pts]
            handles[label], = ax.plot([p for p, *_ in pts], effs, color=color, marker=marker,
                                      ms=5, lw=1.2)
            for (p, *_, flags), e in zip(pts, effs):
                mark_flags(ax, p, e, flags, shown)
        _rank_axis(ax, ranks)
        ax.set_title(title, fontsize="medium")
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        top = max([e for pts in series.values() for *_, e, _ in pts] + [1.0])
        ax.set_ylim(0, max(1.2, top * 1.08))
        ax.set_ylabel("scaling efficiency")
    suptitle(fig, f"Scaling efficiency{note} vs the series' smallest P0: strong "
             "T(P0)·P0 / (P·T(P)), weak T(P0) / T(P)")
    flags_note(fig, shown)
    legend(fig, handles)
    save(pyplot, fig, out, "efficiency.png", files)


def breakdown(pyplot: ModuleType, panels: dict, out: str, files: list[str], note: str = ""
              ) -> None:
    """breakdown.png: per record, the local-GEMM, blocked-communication and other shares of its
    median step time (stacked to 100 %), the median in ms above each bar (and its flags'
    letters). ``panels`` = {panel title: [(bar label, time s, gemm s, comm s, flags)]} in
    display order."""
    most = max(len(bars) for bars in panels.values())
    fig, axes = facets(pyplot, len(panels), width=max(PANEL_IN[0], 0.22 * most + 1.2),
                       height=PANEL_IN[1] + 0.2 + 0.055 * max(len(b[0]) for bars in
                                                             panels.values() for b in bars),
                       legend_labels=[name for name, _ in PARTS],
                       max_cols=MAX_COLS if most <= 12 else 1)
    handles = {}
    shown: set = set()
    for ax, (title, bars) in zip(axes, panels.items()):
        x = list(range(len(bars)))
        bottom = [0.0] * len(bars)
        shares = []
        for _, t, g, c, _ in bars:
            whole = max(t, g + c, 1e-30)
            shares.append((100 * g / whole, 100 * c / whole, 100 * max(0.0, t - g - c) / whole))
        for j, (name, color) in enumerate(PARTS):
            vals = [s[j] for s in shares]
            handles[name] = ax.bar(x, vals, bottom=bottom, color=color, width=0.8)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for xi, (_, t, _, _, flags) in zip(x, bars):
            ax.text(xi, 101, short(t * 1e3), ha="center", va="bottom", fontsize=6,
                    rotation=90)
            mark_flags(ax, xi, 0, flags, shown)
        ax.set_xticks(x)
        ax.set_xticklabels([b[0] for b in bars], rotation=90, fontsize=6)
        ax.set_ylim(0, 122)
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.set_ylabel("share of step time (%)")
        ax.set_title(title, fontsize="medium")
    suptitle(fig, "Where the step time goes" + (f" ({note})" if note else "")
             + ": shares of the median step; median ms above each bar")
    flags_note(fig, shown)
    legend(fig, handles, sort=False)
    save(pyplot, fig, out, "breakdown.png", files)


def predicted(pyplot: ModuleType, points: dict, out: str, files: list[str]) -> None:
    """predicted_vs_measured.png; ``points`` = {series label: [(measured s, predicted s,
    flags)]}. A prediction from the model's defaults (flag ``pred-defaults``) is hollow, every
    flagged point carries its letters, and the title counts the uncalibrated ones."""
    style = styles(list(points))
    fig, (ax,) = facets(pyplot, 1, width=5.0, height=4.4, legend_labels=list(points))
    handles: dict[str, Any] = {}
    shown: set = set()
    vals = [v * 1e3 for pts in points.values() for m, p, _ in pts for v in (m, p) if v > 0]
    for label, pts in sorted(points.items()):
        color, marker = style[label]
        for hollow in (False, True):
            some = [(m, p) for m, p, flags in pts if ("pred-defaults" in flags) == hollow]
            if some:
                handles[label] = ax.scatter(
                    [m * 1e3 for m, _ in some], [p * 1e3 for _, p in some], marker=marker,
                    s=22, **({"facecolors": "none", "edgecolors": color} if hollow else
                             {"color": color}))
        for m, p, flags in pts:
            mark_flags(ax, m * 1e3, p * 1e3, flags, shown, keep=tuple(FLAG_LETTERS))
    lo, hi = min(vals) / 1.5, max(vals) * 1.5
    handles["predicted = measured"], = ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    for axis in ("x", "y"):
        value_scale(ax, vals, axis)
    ax.set_xlabel("measured time per step, median (ms)")
    ax.set_ylabel("predicted time (ms)")
    total = sum(len(pts) for pts in points.values())
    defaults = sum("pred-defaults" in f for pts in points.values() for *_, f in pts)
    ax.set_title("Cost model: predicted vs measured" + (
        f"\n{defaults} of {total} from the model's defaults (hollow: uncalibrated, run "
        "calibrate)" if defaults else ""), fontsize="medium",
        color=FLAG_COLOR if defaults else "black")
    ax.grid(True, which="major", alpha=0.3)
    flags_note(fig, shown)
    legend(fig, handles)
    save(pyplot, fig, out, "predicted_vs_measured.png", files)


def loss(pyplot: ModuleType, runs: Sequence[dict], out: str, files: list[str]) -> None:
    """loss.png: per training run (:func:`tpmpi.studies.report.training_runs`) the training
    loss (line), the validation loss (large markers, dashed) and, with ``--check``, the serial
    float64 run's loss (black dots, drawn over the run's line); the unigram entropy of the text
    as a grey line (a model that ignores context)."""
    labels = [run["label"] for run in runs]
    style = styles(labels)
    entries = [f"{label}: {what}" for label in labels for what in ("train", "validation")]
    fig, (ax,) = facets(pyplot, 1, width=6.4, height=4.2,
                        legend_labels=entries + ["serial float64 (--check)"])
    handles: dict[str, Any] = {}
    for run in runs:
        color, marker = style[run["label"]]
        if run["train"]:
            steps, values = zip(*run["train"])
            handles[f"{run['label']}: train"], = ax.plot(steps, values, color=color, lw=1.2)
        if run["val"]:
            steps, values = zip(*run["val"])
            handles[f"{run['label']}: validation"], = ax.plot(
                steps, values, color=color, ls="--", marker=marker, ms=6)
        if run["serial"]:
            steps, values = zip(*run["serial"])
            handles["serial float64 (--check)"], = ax.plot(steps, values, "k.", ms=3)
    entropies = {run["last"]["unigram_entropy"] for run in runs
                 if run["last"] and run["last"].get("unigram_entropy")}
    for h in sorted(entropies):
        handles["unigram entropy of the text"] = ax.axhline(h, color="0.5", lw=1, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title("GPT training loss", fontsize="medium")
    ax.grid(True, alpha=0.3)
    legend(fig, handles, sort=False)
    save(pyplot, fig, out, "loss.png", files)


def busbw(pyplot: ModuleType, panels: dict, out: str, files: list[str]) -> None:
    """busbw.png: one panel per collective; ``panels`` = {collective: {series label:
    [(size B, busbw GB/s)]}}."""
    labels = sorted({s for series in panels.values() for s in series})
    style = styles(labels)
    fig, axes = facets(pyplot, len(panels), legend_labels=labels)
    handles = {}
    for ax, (op, series) in zip(axes, sorted(panels.items())):
        vals = []
        for label, pts in sorted(series.items()):
            color, marker = style[label]
            pts = sorted(pts)
            handles[label], = ax.plot([s for s, _ in pts], [b for _, b in pts], color=color,
                                      marker=marker, ms=4, lw=1.2)
            vals += [b for _, b in pts]
        _bytes_axis(ax, [s for pts in series.values() for s, _ in pts])
        value_scale(ax, vals)
        ax.set_xlabel("message size S")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.set_title(op, fontsize="medium")
        ax.grid(True, which="major", alpha=0.3)
    suptitle(fig, "Collective bus bandwidth vs message size (nccl-tests convention)")
    legend(fig, handles)
    save(pyplot, fig, out, "busbw.png", files)


def _bytes_axis(ax: Axes, sizes: Sequence[int]) -> None:
    """Log2 x axis with ticks at powers of 16 bytes labelled B, KiB, MiB, GiB."""
    ax.set_xscale("log", base=2)
    lo, hi = min(sizes), max(sizes)
    ticks = [16 ** i for i in range(12) if lo <= 16 ** i * 1.01 and 16 ** i <= hi * 1.01]
    if len(ticks) >= 2:
        ax.set_xticks(ticks)
        ax.set_xticklabels([_bytes(t) for t in ticks], fontsize="small")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:g} {unit}"
        n /= 1024
    return f"{n:g} TiB"


def _natural(label: str) -> list:
    """Sort key putting "P=8" before "P=16" (runs of ASCII digits compare as numbers)."""
    return [(0, int(t), "") if DIGITS.fullmatch(t) else (1, 0, t) for t in
            DIGIT_RUNS.sub(lambda m: f" {m[0]} ", label).split()]

