"""tpmpi.studies.sweep: size strings, the default P values and grids of a sweep, its
configurations (strong, weak, sizes; scheme options), the cost estimate that drives the
progress bar, and run_sweep / collective_sweep at world sizes 1-4: each configuration on the
first P ranks, records on rank 0 only, an error of one configuration raised on every rank."""
import pytest

from conftest import all_ranks_raise
from tpmpi.core.backend import get_backend
from tpmpi.studies import sweep
from tpmpi.studies.problem import Problem
from tpmpi.studies.sweep import Config, collective_sweep, configs, default_ranks, estimate, \
    grids_for, parse_size, run_sweep


def test_parse_size():
    assert parse_size("64") == 64 and parse_size("4K") == 4096 and parse_size("1M") == 1 << 20
    assert parse_size(" 2g ") == 2 << 30 and parse_size("1.5K") == 1536
    for bad in ("abc", "4KB", "", "²", "1_0", "inf", "nan", "1e3", "1.3", "0.1K"):
        with pytest.raises(ValueError, match=r"size '.*': expected an integer with optional "
                                             r"K/M/G"):
            parse_size(bad)


def test_default_ranks_and_grids():
    assert default_ranks("strong", 6) == [1, 2, 4, 6]
    assert default_ranks("sizes", 6) == [6]
    assert default_ranks("weak", 8) == [1, 2, 4, 8] and default_ranks("strong", 1) == [1]
    assert grids_for("tile2d", 4, ["auto"]) == [(2, 2)]
    assert grids_for("column", 4, ["auto", "2x2", "1x3", "1x4"]) == [(1, 4)]
    assert grids_for("tile2d", 4, ["auto", "1x4", "4x1"]) == [(2, 2), (1, 4), (4, 1)]
    assert grids_for("tile2d", 3, ["auto", "2x2"]) == [(1, 3)]


def _configs(kind, **kw):
    args = dict(schemes=["column", "tile2d"], dims={"m": [8], "k": [4], "n": [6],
                                                    "hidden": [None]},
                dim="m", sizes=[], ranks=[1, 2], grids=["auto"], dtypes=["float32"],
                backward=False, options={"panel": [None, 2], "chunks": [None]})
    args.update(kw)
    return configs(kind, **args)


def test_configs_strong_weak_sizes():
    strong = _configs("strong")
    assert strong[0].ranks == 2  # largest P first
    assert {c.problem.m for c in strong} == {8}
    # panel applies to tile2d only: column 1 + tile2d 2 per P
    assert len(strong) == 6
    assert {c.problem.opts.get("panel") for c in strong if c.problem.scheme == "tile2d"} \
        == {None, 2}
    weak = _configs("weak")
    assert {(c.ranks, c.problem.m) for c in weak} == {(1, 8), (2, 16)}
    sizes = _configs("sizes", sizes=[16, 32], ranks=[2], schemes=["column"])
    assert [c.problem.m for c in sizes] == [16, 32] and sizes[0].sweep == ("sizes", "m")


def test_sweep_estimate_counts_each_baseline_once():
    cfgs = [Config(Problem(m=64, k=64, n=64), p, (1, p)) for p in (2, 1)]
    kw = dict(warmup=1, iters=2, overlap=False, world=2)
    with_base = estimate(cfgs, "numpy", None, baseline=True, **kw)
    without = estimate(cfgs, "numpy", None, baseline=False, **kw)
    assert with_base[0] > without[0] and with_base[1] == pytest.approx(without[1])


def _run(comm, cfgs, records, baseline=False):
    run_sweep(comm, cfgs, get_backend("numpy"), threads=1, warmup=0, iters=1,
              baseline=baseline, calibration=None, on_record=records.append)


@pytest.mark.mpi
def test_run_sweep_runs_each_configuration_on_its_first_ranks(world):
    ranks = sorted({1, world.size})
    cfgs = _configs("strong", ranks=ranks, schemes=["column"], backward=True)
    records = []
    _run(world.comm, cfgs, records, baseline=True)
    if world.comm.Get_rank() > 0:
        assert records == []  # rank 0 writes every record
        return
    assert [(r["ranks"], r["grid"]) for r in records] == \
        [(c.ranks, f"{c.grid[0]}x{c.grid[1]}") for c in cfgs]
    for rec in records:
        assert rec["sweep"] == {"kind": "strong", "dim": "m"} and rec["m"] == 8
        assert rec["max_rel_err"] <= rec["tolerance"] and rec["baseline_s"] > 0
    # one serial baseline per problem, measured at its first (largest) P and reused
    assert len({r["baseline_s"] for r in records}) == 1


@pytest.mark.mpi
def test_an_error_of_one_configuration_is_raised_on_every_rank(world, monkeypatch):
    """The configuration runs on rank 0 alone; the other ranks wait, then raise its error."""
    def fail(sub, cfg, backend, **kw):
        raise ValueError(f"a configuration on {sub.Get_size()} rank(s) failed")

    monkeypatch.setattr(sweep, "_run_config", fail)
    cfgs = [Config(Problem(m=4, k=4, n=4), 1, (1, 1))]
    all_ranks_raise(world.comm, lambda: _run(world.comm, cfgs, []),
                    r"^a configuration on 1 rank\(s\) failed")


@pytest.mark.mpi
def test_collective_sweep_table_and_records(world):
    ranks, ops, sizes = sorted({1, world.size}), ["allreduce", "bcast"], [8, 64]
    lines, records = [], []
    collective_sweep(world.comm, ops, sizes, ranks, "float32", get_backend("numpy"), warmup=0,
                     iters=1, on_record=records.append, out=lines.append)
    if world.comm.Get_rank() > 0:
        assert records == [] and lines == []
        return
    assert [(r["collective"], r["ranks"], r["size"]) for r in records] == \
        [(op, p, s) for p in ranks for op in ops for s in sizes]
    assert all(r["wrong"] == 0 and r["dtype"] == "float32" for r in records)
    heads = [line for line in lines if line.startswith("# tpmpi ")]
    assert heads == [f"# tpmpi {op}: {p} ranks, dtype float32, warmup 0, iters 1"
                     for p in ranks for op in ops]
    assert sum(line.startswith("# Avg bus bandwidth") for line in lines) == len(ranks) * len(ops)
