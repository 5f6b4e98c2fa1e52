"""tpmpi.studies.bench: run_case's per-iteration statistics and the table of records (the bench
CLI: test_cli.py; the sweeps: test_sweep.py; statistics and flags: test_stats.py)."""
import json

import pytest

from jobs import job_env
from problems import clean_record
from tpmpi.core.backend import get_backend
from tpmpi.studies import stats
from tpmpi.studies.bench import format_table, run_case
from tpmpi.studies.problem import Problem


def test_table_shows_spread_statistic_and_flags():
    rec = clean_record(flags=["noisy", "oversubscribed"], hidden=16, scheme="mlp")
    caption, head, row = format_table([rec], width=0).splitlines()
    assert "median (min-max) over 10 timed iterations" in caption
    cols = head.split()
    assert cols[-3:] == ["speedup", "eff/core", "flags"] and "eff" not in cols
    assert "1.000 (0.98-1.05)" in row and "0.600 (0.5-0.7)" in row
    assert "0.300 (0.2-0.4)" in row
    assert row.endswith("noisy,oversubscribed") and "hidden=16" in row


def test_table_fits_120_columns_by_default():
    """Columns in blocks of at most 120 characters, each repeating scheme, ranks and grid; the
    caption wrapped too; every cell of the one-line form is there."""
    flags = ["superlinear", "noisy", "noisy-baseline", "oversubscribed", "pred-defaults"]
    recs = [clean_record(flags=flags, hidden=4096, scheme="mlp", m=2048, k=1024, n=1024),
            clean_record(ranks=4, grid="2x2")]
    lines = format_table(recs).splitlines()
    assert max(map(len, lines)) <= 120
    heads = [line.split() for line in lines if line.startswith("scheme")]
    assert len(heads) > 1 and all(h[:3] == ["scheme", "ranks", "grid"] for h in heads)
    whole = format_table(recs, width=0).splitlines()
    assert len(whole[-1]) > 120
    assert sum(len(h) - 3 for h in heads) + 3 == len(whole[1].split())
    cells = " ".join(lines)
    assert all(cell in cells for cell in whole[-1].split())
    assert " ".join(line.lstrip("# ") for line in lines if line.startswith("#")) == \
        whole[0].lstrip("# ")


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


FIRST_AND_SECOND = """
from mpi4py import MPI
import tpmpi
from tpmpi.core.backend import get_backend
from tpmpi.studies.bench import run_case
from tpmpi.studies.problem import Problem
grid = tpmpi.ProcessGrid(MPI.COMM_SELF)
p = Problem(scheme="mlp", m=64, k=64, n=64, backward=True, dtype="bfloat16")
print([run_case(p, grid, get_backend("numpy"), warmup=0, iters=1)["mem_peak_bytes"]
       for _ in range(2)])
"""


def test_the_first_configuration_of_a_process_is_not_charged_one_off_allocations():
    """A fresh process (ml_dtypes' bfloat16 loops are set up on first use, ~6 MB): the first
    configuration's mem_peak_bytes is the second's, within 10 %."""
    import subprocess
    import sys

    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("one fresh process is enough: the serial run checks it")
    out = subprocess.run([sys.executable, "-c", FIRST_AND_SECOND], capture_output=True,
                         text=True, timeout=120, check=True, env=job_env()).stdout
    first, second = json.loads(out.strip().splitlines()[-1])
    assert abs(first - second) <= 0.1 * second, (first, second)
