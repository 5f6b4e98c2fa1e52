"""report: plots and report.md from records; cost-model accuracy (serial)."""
import json
import re

import pytest

from tpmpi.studies.report import accuracy, report, series

pytest.importorskip("matplotlib")


def rec(scheme, ranks, grid, t, pred, m=64, options=None, sweep="strong"):
    return {"scheme": scheme, "ranks": ranks, "grid": grid, "m": m, "k": 32, "n": 32,
            "hidden": None, "dtype": "float32", "backward": False, "options": options or {},
            "time_s": {"median": t, "min": t, "max": t}, "gemm_s": t / 2, "comm_s": t / 4,
            "gflops": 1.0, "busbw_gbs": 1.0, "mem_peak_bytes": 1 << 20, "predicted_s": pred,
            "speedup": None, "efficiency": None, "sweep": {"kind": sweep, "dim": "m"}}


RECORDS = [rec("column", 1, "1x1", 4e-3, 4e-3), rec("column", 2, "1x2", 2.5e-3, 2e-3),
           rec("tile2d", 2, "1x2", 3e-3, 3e-3), rec("column", 4, "1x4", 1.5e-3, 1e-3),
           rec("column", 1, "1x1", 1e-3, 1e-3, m=16, sweep="weak"),
           rec("column", 2, "1x2", 1.2e-3, 1e-3, m=32, sweep="weak")]
COLL = [{"collective": "allgather", "ranks": 2, "size": s, "count": s // 4, "dtype": "float32",
         "time_s": 1e-5, "algbw_gbs": s / 1e4, "busbw_gbs": s / 2e4, "wrong": 0}
        for s in (8, 64, 512)]


def test_accuracy_median_and_ranking():
    acc = accuracy(RECORDS)
    assert acc["records"] == 6
    assert acc["median_rel_err"] == pytest.approx(1 / 12)  # of 0, .2, 0, 1/3, 0, 1/6
    assert acc["problems"] == 1 and acc["ranked_first"] == 1  # column beats tile2d at P=2


def test_series_groups_weak_by_per_rank_size():
    keys = list(series(RECORDS))
    assert sum(1 for k in keys if k[5] == "weak") == 1


def test_report_writes_pngs_and_markdown(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS + COLL) + "\n")
    md = report([str(path)], str(tmp_path / "out"))
    with open(md) as fh:
        text = fh.read()
    for name in ("time_vs_ranks.png", "efficiency.png", "breakdown.png",
                 "predicted_vs_measured.png", "busbw.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
        assert name in text
    assert "column 1x2" in text and "allgather" in text and "Cost model accuracy" in text


def test_report_rejects_empty(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        report([str(path)], str(tmp_path / "out"))


# ------------------------------------------------ plots that scale, CSV, one efficiency name

import csv  # noqa: E402

from tpmpi.studies import plots  # noqa: E402
from tpmpi.studies.report import CSV_COLUMNS, scaling_efficiency, table_rows  # noqa: E402

import synthetic  # noqa: E402

NO_MARKER = ("None", "", " ", "_", "|")


@pytest.fixture
def figures(monkeypatch):
    """The report's figures by file name, drawn and kept open (plots.save replaced)."""
    saved = {}
    monkeypatch.setattr(plots, "save", _keeper(saved))
    yield saved
    import matplotlib.pyplot as plt

    plt.close("all")


def _keeper(saved: dict):
    def keep(pyplot, fig, out, name, files):
        fig.canvas.draw()
        saved[name] = fig
        files.append(name)
    return keep


def _rank0_only():
    """Plot checks are serial: under mpiexec only rank 0 draws (the ranks share the cores)."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() > 0:
        pytest.skip("plots are checked on rank 0")


_RENDERED: dict = {}


def rendered(name: str, tmp_path_factory) -> dict:
    """The figures of the record set ``name`` of :data:`SETS`, drawn once per session."""
    _rank0_only()
    if name not in _RENDERED:
        tmp = tmp_path_factory.mktemp(name)
        saved: dict = {}
        with pytest.MonkeyPatch.context() as mp:
            import matplotlib

            mp.setattr(plots, "save", _keeper(saved))
            mp.setitem(matplotlib.rcParams, "figure.max_open_warning", 0)
            report([_write(tmp, SETS[name]())], str(tmp / "out"))
        _RENDERED[name] = saved
    return _RENDERED[name]


def _write(tmp_path, recs) -> str:
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return str(path)


def _inside(inner, outer, slack=1.0) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack
            and inner.x1 <= outer.x1 + slack and inner.y1 <= outer.y1 + slack)


def _marked_lines(ax):
    return [ln for ln in ax.lines if ln.get_marker() not in NO_MARKER]


SETS = {"one": lambda: synthetic.laptop(1)[:1], "laptop2": lambda: synthetic.laptop(2),
        "laptop4": lambda: synthetic.laptop(4), "crowded20": lambda: synthetic.crowded(20),
        "cluster64": synthetic.cluster}


@pytest.mark.parametrize("name", list(SETS))
def test_legends_and_labels_stay_inside_the_figure(tmp_path_factory, name):
    figures = rendered(name, tmp_path_factory)
    # a lone record has no scaling efficiency, hence no efficiency.png
    assert {"time_vs_ranks.png", "breakdown.png"} | (
        set() if name == "one" else {"efficiency.png"}) <= set(figures)
    for fname, fig in figures.items():
        renderer = fig.canvas.get_renderer()
        assert fig.legends, fname
        for leg in fig.legends:
            box = leg.get_window_extent(renderer)
            assert _inside(box, fig.bbox), (fname, box, fig.bbox)
            for ax in fig.axes:
                if ax.get_visible():
                    assert not box.overlaps(ax.get_window_extent(renderer)), fname
        for ax in fig.axes:  # tick labels, axis labels and titles do not overrun
            if ax.get_visible():
                assert _inside(ax.get_tightbbox(renderer), fig.bbox), (fname, ax.get_title())
        if fig._suptitle is not None:
            title = fig._suptitle.get_window_extent(renderer)
            assert _inside(title, fig.bbox) and not any(
                title.overlaps(leg.get_window_extent(renderer)) for leg in fig.legends), fname


@pytest.mark.parametrize("name", ["laptop2", "crowded20", "cluster64"])
def test_every_series_has_its_own_colour_and_marker(tmp_path_factory, name):
    figures = rendered(name, tmp_path_factory)
    for fname in ("time_vs_ranks.png", "efficiency.png", "busbw.png"):
        if fname not in figures:
            continue
        legend_labels = [t.get_text() for t in figures[fname].legends[0].get_texts()]
        styles = {}
        for ax in figures[fname].axes:
            lines = _marked_lines(ax)
            pairs = [(ln.get_color(), ln.get_marker()) for ln in lines]
            assert len(set(pairs)) == len(pairs), (fname, ax.get_title())
            for ln in lines:
                styles.setdefault((ln.get_color(), ln.get_marker()), ln)
        assert len(styles) == len(legend_labels), fname  # one style per legend entry
    if name == "crowded20":
        (ax,) = [a for a in figures["time_vs_ranks.png"].axes if a.get_visible()]
        assert len(_marked_lines(ax)) == 20


def test_styles_are_distinct_pairs_up_to_100():
    pairs = plots.styles([f"s{i}" for i in range(100)])
    assert len(set(pairs.values())) == 100
    assert plots.styles(["b", "a"]) == {"a": ("C0", "o"), "b": ("C1", "s")}


def test_log_scale_when_values_span_decades(tmp_path_factory):
    import matplotlib.pyplot as plt

    assert plots.spans_decades([1.0, 10.0]) and not plots.spans_decades([1.0, 9.9, None])
    fig, ax = plt.subplots()
    assert plots.value_scale(ax, [0.5, 200.0]) == "log" and ax.get_yscale() == "log"
    assert plots.value_scale(ax, [3.0, 5.0], axis="x") == "linear"
    assert ax.get_xscale() == "linear"
    plt.close(fig)
    figures = rendered("cluster64", tmp_path_factory)
    time_axes = [a for a in figures["time_vs_ranks.png"].axes if a.get_visible()]
    assert len(time_axes) == 4 and {a.get_yscale() for a in time_axes} == {"log"}
    assert {a.get_yscale() for a in figures["busbw.png"].axes if a.get_visible()} == {"log"}
    (pred,) = figures["predicted_vs_measured.png"].axes
    assert pred.get_xscale() == pred.get_yscale() == "log"
    bars = [a for a in figures["breakdown.png"].axes if a.get_visible()]
    assert {a.get_yscale() for a in bars} == {"linear"}  # shares of 100 %


def test_narrow_range_stays_linear(tmp_path, figures):
    recs = [rec("column", p, f"1x{p}", t, t) for p, t in ((1, 2.0e-3), (2, 1.2e-3))]
    report([_write(tmp_path, recs)], str(tmp_path / "out"))
    (ax,) = [a for a in figures["time_vs_ranks.png"].axes if a.get_visible()]
    assert ax.get_yscale() == "linear"


def test_breakdown_keeps_small_problems_visible(tmp_path, figures):
    tiny = rec("column", 2, "1x2", 1e-5, 1e-5, m=8)
    big = rec("column", 2, "1x2", 1.0, 1.0, m=4096)
    report([_write(tmp_path, [tiny, big])], str(tmp_path / "out"))
    heights = [p.get_height() for ax in figures["breakdown.png"].axes for p in ax.patches]
    assert heights and min(h for h in heights if h > 0) >= 20  # 50 %/25 %/25 % of each step


def test_scaling_efficiency_and_its_flag():
    recs = [rec("column", 1, "1x1", 4e-3, None), rec("column", 2, "1x2", 1.6e-3, None),
            rec("column", 1, "1x1", 1e-3, None, m=16, sweep="weak"),
            rec("column", 2, "1x2", 1.25e-3, None, m=32, sweep="weak")]
    eff = scaling_efficiency(recs)
    assert [round(eff[id(r)], 6) for r in recs] == [1.0, 1.25, 1.0, 0.8]
    rows = table_rows(recs)
    assert rows[1]["flags"] == ["superlinear-scaling"] and rows[0]["flags"] == []


def test_csv_and_markdown_carry_spread_and_flags(tmp_path):
    recs = synthetic.laptop(2)
    recs[0]["flags"] = ["noisy", "oversubscribed"]
    recs[0]["speedup"], recs[0]["efficiency"] = 1.9, 0.95
    with open(report([_write(tmp_path, recs)], str(tmp_path / "out"))) as fh:
        md = fh.read()
    assert "**median (min–max)**" in md and "| eff/core | scaling eff |" in md
    assert "noisy, oversubscribed" in md and "report.csv" in md
    with open(tmp_path / "out" / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    schemes = [r for r in recs if "scheme" in r]
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == len(schemes)
    first = rows[0]
    t = schemes[0]["time_s"]
    assert float(first["time_ms_min"]) == pytest.approx(t["min"] * 1e3)
    assert float(first["gemm_ms_max"]) == pytest.approx(schemes[0]["spread"]["gemm_s"]["max"] * 1e3)
    assert first["flags"] == "noisy;oversubscribed" and first["eff_core"] == "0.95"
    with open(tmp_path / "out" / "collectives.csv") as fh:
        colls = list(csv.DictReader(fh))
    assert len(colls) == len(recs) - len(schemes) and colls[0]["collective"] == "allgather"


# ------------------------------------------------ records checked field by field


@pytest.mark.parametrize("edit,says", [
    (lambda r: r["time_s"].update(median=0), (r"field 'time_s.median' is 0: expected a positive "
                                             r"number \(seconds\)")),
    (lambda r: r["time_s"].update(median="1.2"), "field 'time_s.median' is '1.2'"),
    (lambda r: r["time_s"].update(median=-1e-3), "field 'time_s.median' is -0.001"),
    (lambda r: r.update(ranks=0), "field 'ranks' is 0: expected a positive integer"),
    (lambda r: r.update(flags="noisy"), ("field 'flags' is 'noisy': expected a list of flag "
                                        "names")),
    (lambda r: r.update(grid="2by2"), "field 'grid' is '2by2': expected a grid RxC"),
    (lambda r: r.pop("scheme"), ("neither 'scheme' nor 'collective': expected a record of "
                                "run/bench --json or bench --collective --json")),
    (lambda r: r.update(gemm_s=None), "field 'gemm_s' is None: expected seconds >= 0"),
    (lambda r: r.update(predicted_s=float("nan")), "field 'predicted_s' is nan"),
    (lambda r: r["sweep"].update(kind="diagonal"), ("field 'sweep.kind' is 'diagonal': expected "
                                                   "strong, weak or sizes")),
])
def test_every_bad_record_is_named_with_its_file_line_and_field(tmp_path, edit, says):
    """report used to drop a zero median or a record without scheme, spell a string flags
    letter by letter, and crash on a string or negative median or ranks 0."""
    recs = synthetic.laptop(2)[:3]
    edit(recs[1])
    path = _write(tmp_path, recs)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:2: {says}"):
        report([path], str(tmp_path / "out"))


def test_a_collective_record_is_checked_too(tmp_path):
    colls = synthetic.collectives([2], sizes=[8, 64])
    colls[1]["time_s"] = "fast"
    path = _write(tmp_path, colls)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}:2: field 'time_s' is 'fast'"):
        report([path], str(tmp_path / "out"))


def test_flags_are_drawn_in_every_figure(tmp_path, figures):
    recs = synthetic.laptop(4)
    schemes = [r for r in recs if "scheme" in r]
    schemes[1]["flags"] = ["noisy", "oversubscribed"]
    schemes[2]["flags"] = ["pred-defaults"]
    report([_write(tmp_path, recs)], str(tmp_path / "out"))
    for name in ("time_vs_ranks.png", "efficiency.png", "breakdown.png",
                 "predicted_vs_measured.png"):
        fig = figures[name]
        notes = [t.get_text() for t in fig.texts]
        letters = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any("N noisy" in n and "O oversubscribed" in n for n in notes), (name, notes)
        assert "NO" in letters, (name, letters)
    notes = [t.get_text() for t in figures["predicted_vs_measured.png"].texts]
    assert any("D pred-defaults" in n for n in notes)


def test_a_lone_run_record_is_not_a_scaling_series(tmp_path, figures):
    """A record of `run` (no sweep) is a panel of kind "run" without scaling efficiency."""
    one = synthetic.laptop(1)[0]
    del one["sweep"]
    md = report([_write(tmp_path, [one])], str(tmp_path / "out"))
    assert "efficiency.png" not in figures
    assert figures["time_vs_ranks.png"].axes[0].get_title().startswith("run: m=")
    assert table_rows([one])[0]["scaling_eff"] is None
    with open(md) as fh:
        assert "![efficiency.png]" not in fh.read()


def test_uncalibrated_predictions_are_marked_in_tables_and_figure(tmp_path, figures):
    recs = [r for r in synthetic.laptop(2) if "scheme" in r][:4]
    for r in recs[:3]:
        r["calibration"] = {"source": "defaults", "fitted": []}
        r["flags"] = ["pred-defaults"]
    md = report([_write(tmp_path, recs)], str(tmp_path / "out"))
    with open(md) as fh:
        text = fh.read()
    assert "pred_ms: * the cost model's defaults (uncalibrated" in text
    rows = [line for line in text.splitlines() if line.startswith("| column")]
    assert rows and all(re.search(r"\| [0-9.]+\* \|", line) for line in rows[:3])
    title = figures["predicted_vs_measured.png"].axes[0].get_title()
    assert "3 of 4 from the model's defaults (hollow: uncalibrated" in title


def _training_records(layout: dict, steps: int, resumed_at: int = 0) -> list:
    recs = [dict(kind="train_gpt", step=s, train_loss=4.0 - 0.1 * s, serial_loss=4.0 - 0.1 * s,
                 tokens_per_s=1000.0, **layout) for s in range(resumed_at, steps)]
    recs[-1]["val_loss"] = 3.5
    recs.append(dict(kind="train_gpt", step=steps, sample="def f():", val_loss=3.5, ranks=4,
                     unigram_entropy=3.25, tokens_per_s=1000.0, mfu=0.02, **layout))
    return recs


def test_training_records_give_the_loss_curve(tmp_path):
    """Two runs of train_gpt.py appended to one file (the second resumed at the same layout):
    each is a series of loss.png, numbered, and a row of report.md with its sample."""
    from tpmpi.studies.report import training_runs

    layout = dict(dp=2, tp=2, sequence_parallel=True, dtype="float64", dropout=0.1)
    recs = _training_records(layout, 5) + _training_records(layout, 8, resumed_at=5)
    path = tmp_path / "gpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    runs = training_runs(recs)
    assert [r["label"] for r in runs] == ["dp 2 x tp 2+SP, float64, dropout 0.1 (run 1)",
                                          "dp 2 x tp 2+SP, float64, dropout 0.1 (run 2)"]
    assert [s for s, _ in runs[1]["train"]] == [5, 6, 7] and runs[1]["val"] == [(7, 3.5)]
    with open(report([str(path)], str(tmp_path / "out"))) as fh:
        md = fh.read()
    assert (tmp_path / "out" / "loss.png").stat().st_size > 10_000
    assert "## Training" in md and "| 4 | 5-7 | 3.3000 | 3.5000 | 3.250 | 1,000 | 2.0% |" in md
    assert "def f():" in md and "![loss.png](loss.png)" in md
    path.write_text(json.dumps(dict(recs[0], train_loss="x")) + "\n")
    with pytest.raises(ValueError, match=r"gpt.jsonl:1: field 'train_loss' is 'x': expected a "
                                         "finite non-negative number"):
        report([str(path)], str(tmp_path / "bad"))
