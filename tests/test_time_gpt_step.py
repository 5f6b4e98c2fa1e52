"""scripts/time_gpt_step.py at a tiny size on one rank: a record with the block's and the GPT's
median and best seconds (best <= median, the GPT slower than one of its blocks) and the load."""
import json

from conftest import load_script

time_gpt_step = load_script("time_gpt_step")


def test_a_tiny_run_writes_its_record(tmp_path):
    from mpi4py import MPI

    out = tmp_path / "times.jsonl"
    rec = time_gpt_step.main(["--layers", "2", "--hidden", "32", "--heads", "4", "--seq", "8",
                              "--batch", "2", "--vocab", "50", "--iters", "3", "--warmup", "1",
                              "--json", str(out)], MPI.COMM_SELF)
    assert json.loads(out.read_text()) == rec and rec["tp"] == 1 and len(rec["load"]) == 2
    for what in ("block", "gpt"):
        assert 0 < rec[f"{what}_best_s"] <= rec[f"{what}_median_s"]
    assert rec["gpt_best_s"] > rec["block_best_s"]
