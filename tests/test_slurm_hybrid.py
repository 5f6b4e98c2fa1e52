"""slurm/hybrid.sbatch with a fake ``srun`` (tests/test_slurm.py's harness): the mesh it derives
from the allocation (TP = ranks per node, DP = nodes), block distribution, commands that the
parsers of train_mlp.py and tpmpi accept, and the refusal of a TP size that does not divide the
ranks."""
import pytest

import test_slurm
from test_slurm import _bench_argv
from test_train_mlp import train_mlp

cluster = test_slurm.cluster  # the fixture: a copy of slurm/ with fake srun

JOB = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
       "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "2", "SLURM_JOB_NAME": "tpmpi-hybrid"}


def run(cluster, **env):
    return cluster("hybrid.sbatch", cwd=cluster.repo, **dict(JOB, **env))


def train_args(call):
    i = call.index("scripts/train_mlp.py")
    return train_mlp.build_parser().parse_args(call[i + 1:])


def test_tp_inside_nodes_dp_across(cluster):
    proc, calls = run(cluster)
    assert proc.returncode == 0, proc.stderr
    assert "dp 2 x tp 4" in proc.stdout
    assert len(calls) == 3 and all("--distribution=block:block" in c for c in calls)
    assert calls[0][-4:] == ["python", "-m", "tpmpi", "info"]
    train = train_args(calls[1])
    assert (train.dp, train.tp, train.sequence_parallel, train.measure_overlap) == \
        (2, "4", False, True)
    argv, args = _bench_argv(calls[2])
    assert args.dp == [1, 2] and args.mode == ["megatron", "sequence"]
    assert (args.k, args.n, args.hidden) == ([2048], [2048], [8192]) and args.backward
    assert argv[argv.index("--json") + 1].endswith("results/tpmpi-hybrid-7.jsonl")


def test_sequence_parallel_and_smaller_tp(cluster):
    proc, calls = run(cluster, TP="2", SP="1")
    assert proc.returncode == 0, proc.stderr
    train = train_args(calls[1])
    assert (train.dp, train.tp, train.sequence_parallel) == (4, "2", True)
    assert _bench_argv(calls[2])[1].dp == [1, 4]


@pytest.mark.parametrize("tp", ["3", "16"])
def test_tp_must_divide_the_ranks(cluster, tp):
    proc, calls = run(cluster, TP=tp)
    assert proc.returncode == 2 and f"TP={tp} does not divide the 8 ranks" in proc.stderr
    assert calls == []  # refused before any srun
