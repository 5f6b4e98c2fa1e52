"""scripts/kernel_profile.py: at a small block (uneven heads and hidden shards) every kernel
of the block and its twelve GEMMs are timed per case, with dropout the mask kernels too, the
summaries add up the records, the TP-2 case is compared with its ceiling, and an older tree
(here this one, loaded under another name) is timed side by side with the current kernels."""
import json

from conftest import ROOT, load_script

profile = load_script("kernel_profile")
SMALL = ["--batch", "2", "--seq", "5", "--d-model", "12", "--heads", "3", "--warmup", "0",
         "--repeats", "2"]


def records(capsys, argv):
    assert profile.main(SMALL + argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_kernel_and_gemm_per_case(capsys, tmp_path):
    out = tmp_path / "prof.jsonl"
    recs = records(capsys, ["--cases", "1x1", "2x1", "--dropout", "0.1", "--json", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs
    kernels = [r for r in recs if "kernel" in r]
    for case in ("tp1x1", "tp2x1"):
        names = {r["kernel"] for r in kernels if r["case"] == case}
        assert {"layer_norm.forward", "layer_norm.backward", "attention.forward",
                "attention.backward", "gelu.forward", "gelu.backward", "dropout.hidden_mask",
                "dropout.apply", "glue.bias_residual"} <= names
        assert len([n for n in names if n.startswith("gemm.")]) == 12
        summary = next(r for r in recs if r.get("summary") and r["case"] == case)
        mine = [r for r in kernels if r["case"] == case and r["tree"] == "current"]
        assert abs(summary["kernels_s"] - sum(r["count"] * r["best_ms"] for r in mine) / 1e3) \
            < 1e-3
        assert summary["projected_step_s"] >= summary["gemm_s"] > 0
    assert not any(r["best_ms"] < 0 or r["median_ms"] < r["best_ms"] for r in kernels)
    # no TP 1 x 2 threads case ran: the comparison is from CPU times only
    compare = next(r for r in recs if r.get("compare") == "tp2x1")
    assert "efficiency" not in compare and compare["cpu_efficiency"] > 0
    serial = next(r for r in recs if r.get("summary") and r["case"] == "tp1x1")
    want = serial["cpu_gemm_s"] / 2 + serial["cpu_kernels_s"] + serial["cpu_glue_s"]
    assert abs(compare["cpu_ceiling_est_s"] - want) < 1e-5


def test_baseline_tree_side_by_side_and_the_ceiling(capsys):
    recs = records(capsys, ["--cases", "1x2", "2x1", "--baseline", str(ROOT)])
    assert recs[0]["trees"]["baseline"] == recs[0]["trees"]["current"] == str(ROOT / "tpmpi")
    for tree in ("baseline", "current"):
        assert any(r.get("tree") == tree and r.get("kernel") == "attention.forward"
                   for r in recs)
        compare = next(r for r in recs if r.get("compare") == "tp2x1" and r["tree"] == tree)
        assert abs(compare["efficiency"] - compare["ceiling_s"] / compare["projected_step_s"]) \
            < 0.01 * compare["efficiency"]
