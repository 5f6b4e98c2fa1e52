"""report: plots and report.md from records; cost-model accuracy (serial)."""
import json

import pytest

from tpmpi.report import accuracy, report, series

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
    text = open(md).read()
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
