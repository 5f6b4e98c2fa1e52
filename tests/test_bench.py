"""bench / calibrate / plan CLI: sweeps over sub-communicators, collective mode, usage errors."""
import json

import pytest

from tpmpi.cli import main
from tpmpi.studies.collbench import sizes_sweep
from tpmpi.studies.sweep import configs, default_ranks, grids_for, parse_size


def test_parse_size_and_sweep():
    assert parse_size("64") == 64 and parse_size("4K") == 4096 and parse_size("1M") == 1 << 20
    assert sizes_sweep(8, 64, 2) == [8, 16, 32, 64]
    with pytest.raises(ValueError):
        sizes_sweep(64, 8, 2)


def test_default_ranks_and_grids():
    assert default_ranks("strong", 6) == [1, 2, 4, 6]
    assert default_ranks("sizes", 6) == [6]
    assert grids_for("tile2d", 4, ["auto"]) == [(2, 2)]
    assert grids_for("column", 4, ["auto", "2x2", "1x3", "1x4"]) == [(1, 4)]
    assert grids_for("tile2d", 4, ["auto", "1x4", "4x1"]) == [(2, 2), (1, 4), (4, 1)]


def _configs(kind, **kw):
    args = dict(schemes=["column", "tile2d"], dims={"m": [8], "k": [4], "n": [6],
                                                    "hidden": [None]},
                dim="m", sizes=[], ranks=[1, 2], grids=["auto"], dtypes=["float32"],
                backward=False, options={"panel": [None, 2], "chunks": [None]})
    args.update(kw)
    return configs(kind, **args)


def test_configs_strong_weak_sizes():
    strong = _configs("strong")
    assert [c.ranks for c in strong][0] == 2  # largest P first
    assert {c.problem.m for c in strong} == {8}
    # panel applies to tile2d only: column 1 + tile2d 2 per P
    assert len(strong) == 6
    assert {c.problem.opts.get("panel") for c in strong if c.problem.scheme == "tile2d"} \
        == {None, 2}
    weak = _configs("weak")
    assert {(c.ranks, c.problem.m) for c in weak} == {(1, 8), (2, 16)}
    sizes = _configs("sizes", sizes=[16, 32], ranks=[2], schemes=["column"])
    assert [c.problem.m for c in sizes] == [16, 32] and sizes[0].sweep == ("sizes", "m")


def _read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.mpi
def test_bench_strong_sweep_records(world, tmp_path_factory):
    if not world.member:
        return
    path = str(tmp_path_factory.mktemp("b", numbered=True) / "s.jsonl") \
        if world.comm.Get_rank() == 0 else None
    path = world.comm.bcast(path)
    ranks = ",".join(str(p) for p in sorted({1, world.size}))
    code = main(["bench", "--m", "8", "--k", "16", "--n", "12", "--iters", "2", "--warmup", "1",
                 "--ranks", ranks, "--json", path], comm=world.comm)
    assert code == 0
    if world.comm.Get_rank() == 0:
        recs = _read(path)
        assert sorted(r["ranks"] for r in recs) == sorted({1, world.size})
        for r in recs:
            assert r["max_rel_err"] <= r["tolerance"]
            assert r["predicted_s"] > 0 and r["baseline_s"] > 0 and r["efficiency"] > 0
            assert r["sweep"] == {"kind": "strong", "dim": "m"}
    world.comm.Barrier()


@pytest.mark.mpi
def test_bench_collective_mode_verifies(world, tmp_path_factory, capsys):
    if not world.member:
        return
    path = str(tmp_path_factory.mktemp("c", numbered=True) / "c.jsonl") \
        if world.comm.Get_rank() == 0 else None
    path = world.comm.bcast(path)
    code = main(["bench", "--collective", "allgather,allreduce,reduce_scatter,bcast",
                 "-b", "8", "-e", "4K", "-f", "8", "--iters", "2", "--json", path],
                comm=world.comm)
    assert code == 0
    if world.comm.Get_rank() == 0:
        recs = _read(path)
        assert len(recs) == 4 * 4  # 8, 64, 512, 4096 bytes
        assert all(r["wrong"] == 0 and r["ranks"] == world.size for r in recs)
        out = capsys.readouterr().out
        assert "algbw" in out and "busbw" in out and "#wrong" in out
    world.comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [
    ["bench", "--ranks", "99"],
    ["bench", "--sweep", "sizes"],
    ["bench", "--collective", "allgather"],
    ["bench", "--scheme", "bogus"],
    ["bench", "--grid", "7x7", "--ranks", "1"],
    ["bench", "-b", "8"],
])
def test_bench_usage_errors_exit_2_everywhere(world, argv):
    if not world.member:
        return
    codes = world.comm.allgather(main(argv, comm=world.comm))
    assert codes == [2] * world.size


@pytest.mark.mpi
def test_calibrate_writes_fits(world, tmp_path_factory):
    if not world.member:
        return
    path = str(tmp_path_factory.mktemp("cal", numbered=True) / "c.json") \
        if world.comm.Get_rank() == 0 else None
    path = world.comm.bcast(path)
    assert main(["calibrate", "--json", path, "-b", "64", "-e", "4K", "--iters", "2",
                 "--dtype", "float32"], comm=world.comm) == 0
    if world.comm.Get_rank() == 0:
        with open(path) as fh:
            data = json.load(fh)
        assert data["machine"]["ranks"] == world.size and "blas" in data["machine"]
        assert set(data["rates"]["numpy:float32"]) == {"thin", "small", "medium", "large"}
        if world.size > 1:
            assert str(world.size) in data["alpha"]["allgather"]
            assert data["beta"]["allreduce"][str(world.size)] >= 0
    world.comm.Barrier()


def test_plan_prints_ranked_layouts(capsys):
    from mpi4py import MPI

    assert main(["plan", "--m", "64", "--k", "256", "--n", "256", "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank():
        return  # printed on rank 0
    assert out.splitlines()[0].split()[:2] == ["order", "layout"]
    assert "tile2d 2x2" in out and "column 1x4" in out


# --------------------------------------------------------------- statistics, flags, the table

from tpmpi.studies import stats  # noqa: E402
from tpmpi.studies.bench import format_table  # noqa: E402


def _rec(**kw):
    """A clean record (no flag applies) with ``kw`` replacing its fields."""
    t = {"median": 1e-3, "min": 0.98e-3, "max": 1.05e-3}
    rec = {"scheme": "column", "ranks": 2, "grid": "1x2", "m": 8, "k": 4, "n": 6,
           "hidden": None, "options": {}, "dtype": "float32", "backend": "numpy",
           "threads_per_rank": 1, "iters": 10, "time_s": t, "gemm_s": 6e-4, "comm_s": 3e-4,
           "spread": {"gemm_s": {"median": 6e-4, "min": 5e-4, "max": 7e-4},
                      "comm_s": {"median": 3e-4, "min": 2e-4, "max": 4e-4},
                      "baseline_s": {"median": 2e-3, "min": 1.99e-3, "max": 2.01e-3}},
           "gflops": 1.0, "algbw_gbs": 1.0, "busbw_gbs": 0.5, "mem_peak_bytes": 1 << 20,
           "max_rel_err": 1e-7, "predicted_s": 1e-3, "speedup": 2.0, "efficiency": 1.0,
           "load_per_cpu": 0.5, "oversubscription": 1.0}
    rec.update(kw)
    return rec


def test_summary_and_spread():
    s = stats.summary([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert stats.spread(s) == pytest.approx(9 / 2.5)
    assert stats.summary([]) is None and stats.spread(None) is None


@pytest.mark.parametrize("change, flag", [
    ({"efficiency": 1.2}, "superlinear"),
    ({"time_s": {"median": 1.0, "min": 0.95, "max": 1.2}}, "noisy"),
    ({"spread": {"baseline_s": {"median": 1.0, "min": 0.9, "max": 1.11}}}, "noisy-baseline"),
    ({"load_per_cpu": 1.6}, "oversubscribed"),
    ({"oversubscription": 2.0}, "oversubscribed"),
])
def test_each_flag(change, flag):
    assert stats.flags(_rec()) == []
    assert stats.flags(_rec(**change)) == [flag]


def test_flags_at_the_thresholds_stay_clear():
    edge = _rec(efficiency=stats.SUPERLINEAR, load_per_cpu=1.0,
                time_s={"median": 1.0, "min": 1.0, "max": 1.0 + 0.99 * stats.NOISY})
    assert stats.flags(edge) == []


def test_load_per_cpu(monkeypatch):
    monkeypatch.setattr(stats.os, "getloadavg", lambda: (6.0, 1.0, 1.0))
    monkeypatch.setattr(stats.os, "cpu_count", lambda: 4)
    assert stats.load_per_cpu() == 1.5

    def missing():
        raise OSError("no load average")
    monkeypatch.setattr(stats.os, "getloadavg", missing)
    assert stats.load_per_cpu() is None


def test_table_shows_spread_statistic_and_flags():
    rec = _rec(flags=["noisy", "oversubscribed"], hidden=16, scheme="mlp")
    caption, head, row = format_table([rec]).splitlines()
    assert "median (min-max) over 10 timed iterations" in caption
    cols = head.split()
    assert cols[-3:] == ["speedup", "eff/core", "flags"] and "eff" not in cols
    assert "1.000 (0.98-1.05)" in row and "0.600 (0.5-0.7)" in row
    assert "0.300 (0.2-0.4)" in row
    assert row.endswith("noisy,oversubscribed") and "hidden=16" in row


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", ["column", "mlp"])
def test_record_statistics_per_iteration(world, scheme):
    """gemm_s / comm_s are medians of per-iteration values (each <= the iteration's time),
    with their spread; the MLP's hidden size in effect is in the record."""
    if not world.member:
        return
    from tpmpi.core.backend import get_backend
    from tpmpi.studies.bench import run_case
    from tpmpi.core.grid import ProcessGrid
    from tpmpi.studies.schemes import Problem

    grid = ProcessGrid(world.comm, blas_threads=None)
    prob = Problem(scheme=scheme, m=9, k=6, n=6, backward=True)
    rec = run_case(prob, grid, get_backend("numpy"), warmup=1, iters=5, baseline=True)
    grid.free()
    t, sp = rec["time_s"], rec["spread"]
    for key in ("gemm_s", "comm_s", "fwd_s", "bwd_s", "baseline_s"):
        s = sp[key]
        assert 0 <= s["min"] <= s["median"] <= s["max"], key
    assert rec["gemm_s"] == sp["gemm_s"]["median"] and rec["comm_s"] == sp["comm_s"]["median"]
    assert rec["baseline_s"] == sp["baseline_s"]["median"]
    # per iteration, GEMM (and communication) time is part of the step time
    assert rec["gemm_s"] <= t["median"] and rec["comm_s"] <= t["median"]
    assert rec["hidden"] == (24 if scheme == "mlp" else None)
    assert rec["flags"] == stats.flags(rec)
    assert rec["load_per_cpu"] is None or rec["load_per_cpu"] >= 0
    assert rec["oversubscription"] > 0


def test_short_numbers_have_no_exponent():
    assert [stats.short(v) for v in (1440.4, 285.13, 0.011834, 3.0)] == \
        ["1440", "285", "0.0118", "3"]
