"""tpmpi.studies.bench: run_case's per-iteration statistics and the table of records (the bench
CLI: test_cli.py; the sweeps: test_sweep.py; statistics and flags: test_stats.py)."""
import pytest

from problems import clean_record
from tpmpi.core.backend import get_backend
from tpmpi.studies import stats
from tpmpi.studies.bench import format_table, run_case
from tpmpi.studies.problem import Problem


def test_table_shows_spread_statistic_and_flags():
    rec = clean_record(flags=["noisy", "oversubscribed"], hidden=16, scheme="mlp")
    caption, head, row = format_table([rec]).splitlines()
    assert "median (min-max) over 10 timed iterations" in caption
    cols = head.split()
    assert cols[-3:] == ["speedup", "eff/core", "flags"] and "eff" not in cols
    assert "1.000 (0.98-1.05)" in row and "0.600 (0.5-0.7)" in row
    assert "0.300 (0.2-0.4)" in row
    assert row.endswith("noisy,oversubscribed") and "hidden=16" in row


@pytest.mark.mpi
@pytest.mark.parametrize("scheme", ["column", "mlp"])
def test_record_statistics_per_iteration(grid, scheme):
    """gemm_s / comm_s are medians of per-iteration values (each <= the iteration's time),
    with their spread; the MLP's hidden size in effect is in the record."""
    prob = Problem(scheme=scheme, m=9, k=6, n=6, backward=True)
    rec = run_case(prob, grid, get_backend("numpy"), warmup=1, iters=5, baseline=True)
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
