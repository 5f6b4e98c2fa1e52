"""scripts/step_split.py: one rank's block step split into its regions inside the real step --
at a small uneven block, on every rank of COMM_WORLD (with and without sequence parallelism),
each phase's regions and ``other`` add up to its wall time, the kernels and (on more than one
rank) the collectives appear, page faults are counted, and the wrapped functions are put back."""
import json

import pytest
from mpi4py import MPI

from conftest import load_script
from tpmpi.core import gemm
from tpmpi.layers import attention, block

split = load_script("step_split")
SMALL = ["--d-model", "12", "--heads", "3", "--seq", "5", "--batch", "3", "--warmup", "1",
         "--iters", "2"]


@pytest.mark.parametrize("sp", [[], ["--sequence-parallel"]], ids=["nosp", "sp"])
def test_regions_add_up_to_the_step(capsys, tmp_path, sp):
    comm = MPI.COMM_WORLD
    originals = (gemm.LocalWork.product, attention.causal_attention, block.layer_norm)
    out = comm.bcast(tmp_path / "split.jsonl")  # one file: the ranks agree on --json
    assert split.main(SMALL + sp + ["--label", "t", "--json", str(out)]) == 0
    assert (gemm.LocalWork.product, attention.causal_attention, block.layer_norm) == originals
    recs = comm.bcast([json.loads(line) for line in capsys.readouterr().out.splitlines()]
                      if comm.Get_rank() == 0 else None)
    if comm.Get_rank() == 0:
        assert [json.loads(line) for line in out.read_text().splitlines()] == recs
    assert [r["rank"] for r in recs] == list(range(comm.Get_size()))
    for r in recs:
        assert r["label"] == "t" and r["tp"] == comm.Get_size()
        for phase in ("forward", "backward"):
            regions = r[phase]["split_s"]
            # two steps: each median is a mean, so the medians add up like the steps do
            assert abs(sum(regions.values()) - r[phase]["wall_s"]) <= 1e-4
            assert all(v >= 0 for k, v in regions.items() if k != "other")
            assert {"gemm", "attn_core", "layer_norm", "gelu"} <= regions.keys()
            assert isinstance(r[phase]["page_faults"]["other"], int)
        assert abs(sum(r["split_s"].values()) - r["forward"]["wall_s"]
                   - r["backward"]["wall_s"]) <= 2e-4
        assert "colsum" in r["backward"]["split_s"]
        if comm.Get_size() > 1:
            ops = {k for k in r["split_s"] if k.startswith("comm.")}
            assert ops == ({"comm.allgather", "comm.reduce_scatter"} if sp else
                           {"comm.allreduce"})


def test_overlap_probe_times_the_three_forms(capsys):
    comm = MPI.COMM_WORLD
    assert split.main(["--overlap-probe", "--d-model", "12", "--seq", "5", "--batch", "3",
                       "--warmup", "0", "--iters", "2"]) == 0
    recs = comm.bcast([json.loads(line) for line in capsys.readouterr().out.splitlines()]
                      if comm.Get_rank() == 0 else None)
    assert [r["rank"] for r in recs] == list(range(comm.Get_size()))
    for r in recs:
        assert r["shape"] == [15, 48 // comm.Get_size(), 12]
        assert all(r[f"{k}_s"] > 0 for k in ("blocking", "during", "pipelined", "gemm_only"))
