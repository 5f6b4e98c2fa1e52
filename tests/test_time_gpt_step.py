"""scripts/time_gpt_step.py at a tiny size on one rank: a record with the block's and the GPT's
median and best seconds, wall clock and CPU time (best <= median), the load, and with
``--calibration`` the CPU preset's predictions of both, the block's terms adding up."""
import json

import pytest

from conftest import load_script
from tpmpi.studies.costmodel import Calibration

time_gpt_step = load_script("time_gpt_step")
TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq", "8", "--batch", "2",
        "--vocab", "50", "--iters", "3", "--warmup", "1"]


def test_a_tiny_run_writes_its_record(tmp_path):
    from mpi4py import MPI

    out = tmp_path / "times.jsonl"
    rec = time_gpt_step.main(TINY + ["--json", str(out)], MPI.COMM_SELF)
    assert json.loads(out.read_text()) == rec and rec["tp"] == 1 and len(rec["load"]) == 2
    for what in ("block", "gpt"):
        assert 0 < rec[f"{what}_best_s"] <= rec[f"{what}_median_s"]
        assert 0 < rec[f"{what}_cpu_best_s"] <= rec[f"{what}_cpu_median_s"]
    assert "block_pred_s" not in rec


def test_a_calibration_adds_its_predictions(tmp_path):
    from mpi4py import MPI

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(Calibration(machine={"source": "calibrate", "ranks": 1,
                                                   "cores_per_node": 1}).to_json()))
    rec = time_gpt_step.main(TINY + ["--json", str(tmp_path / "t.jsonl"), "--calibration",
                                     str(cal)], MPI.COMM_SELF)
    assert rec["oversubscription"] == 1.0
    assert rec["gpt_pred_s"] > rec["block_pred_s"] > 0
    assert rec["block_pred_s"] == pytest.approx(
        rec["block_products_s"] + rec["block_pointwise_s"] + rec["block_collectives_s"])
