"""Long work announces the cost model's estimate and shows progress (rank 0, stderr)."""
import io
import sys

import pytest

from tpmpi.studies import progress
from tpmpi.cli import main
from tpmpi.studies.costmodel import Calibration
from tpmpi.studies.schemes import Problem


def test_duration():
    assert progress.duration(0.3) == "0.3 s"
    assert progress.duration(42) == "42 s"
    assert progress.duration(200) == "3 min 20 s"
    assert progress.duration(3900) == "1 h 05 min"


def test_announce_only_long_work_and_only_where_enabled():
    out = io.StringIO()
    assert not progress.announce("x", progress.LONG_S * 0.9, True, out)
    assert out.getvalue() == ""
    assert progress.announce("bench: 3 configurations", 200.0, False, out)
    assert out.getvalue() == ""
    assert progress.announce("bench: 3 configurations", 200.0, True, out)
    assert out.getvalue() == ("tpmpi: bench: 3 configurations: estimated 3 min 20 s "
                              "(cost model; progress below)\n")


def test_progress_lines_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    out = io.StringIO()
    bar = progress.Progress([1.0, 2.0], True, stream=out)
    bar.step("a")
    bar.step("b")
    bar.step("extra")  # ignored: no more units
    assert out.getvalue() == "[1/2] a\n[2/2] b\n"
    quiet = io.StringIO()
    progress.Progress([1.0], False, stream=quiet).step("a")
    assert quiet.getvalue() == ""


def test_progress_bar_with_tqdm():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    bar = progress.Progress([0.5, 1.5], True, stream=out, unit="step")
    bar.step("first")
    bar.step("second")
    text = out.getvalue()
    assert "[2/2 steps] second" in text and "100%" in text


def test_units_follow_run_case_order():
    cal = Calibration()
    p = Problem(m=64, k=64, n=64)
    units = progress.case_units(p, 2, (1, 2), cal, "numpy", warmup=2, iters=3, baseline=True,
                                overlap=True)
    assert [u for u, _ in units] == ["first step", "warmup", "warmup", "timed", "timed",
                                     "timed", "overlap", "verify", "baseline"]
    assert all(t > 0 for _, t in units)
    short = progress.case_s(p, 2, (1, 2), cal, "numpy", warmup=0, iters=1, baseline=False)
    assert short < sum(t for _, t in units)


@pytest.mark.mpi
def test_run_case_reports_every_unit(grid):
    from tpmpi.core.backend import get_backend
    from tpmpi.studies.bench import run_case

    seen = []
    prob = Problem(m=6, k=5, n=4, backward=True)
    run_case(prob, grid, get_backend("numpy"), warmup=2, iters=3, baseline=True,
             overlap=True, progress=seen.append)
    units = progress.case_units(prob, grid.size, grid.shape, Calibration(), "numpy",
                                warmup=2, iters=3, baseline=True, overlap=True)
    assert len(seen) == len(units)
    assert [s.split()[0] for s in seen] == [u.split()[0] for u, _ in units]


def test_cli_run_announces_long_work(monkeypatch, capsys):
    from mpi4py import MPI

    monkeypatch.setattr(progress, "LONG_S", 0.0)
    argv = ["run", "--m", "16", "--k", "8", "--n", "8", "--iters", "2", "--warmup", "1"]
    assert main(argv, MPI.COMM_SELF) == 0
    captured = capsys.readouterr()
    assert "tpmpi: run column on 1 rank: estimated" in captured.err
    assert "[5/5 steps] verify" in captured.err or "[5/5] verify" in captured.err
    assert "estimated" not in captured.out
    monkeypatch.setattr(progress, "LONG_S", 1e9)
    assert main(argv, MPI.COMM_SELF) == 0
    assert "estimated" not in capsys.readouterr().err
