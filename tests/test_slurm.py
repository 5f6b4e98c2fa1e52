"""The SLURM templates with a fake ``sbatch`` / ``srun`` on PATH: the argument vectors they
would run, results/ created, usage errors, and bench flags that tpmpi's own parser accepts;
slurm/hybrid.sbatch: the mesh it derives from the allocation (TP = ranks per node, DP = nodes),
block distribution, commands that the parsers of train_mlp.py and tpmpi accept, and the
refusal of a TP size that does not divide the ranks."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, load_script
from tpmpi.cli import make_parser

FAKE = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def cluster(tmp_path):
    """A copy of the repository's slurm/ in ``repo`` (no results/), fake sbatch and srun in
    ``bin``, an unrelated working directory ``elsewhere``; returns a runner."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "slurm", repo / "slurm")
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("sbatch", "srun"):
        (fake / tool).write_text(FAKE)
        (fake / tool).chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / "calls.jsonl"

    def run(script, *args, cwd=elsewhere, **env):
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        base.update(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
                    VENV=str(tmp_path / "no-venv"), **env)
        if log.exists():
            log.unlink()
        proc = subprocess.run(["bash", str(repo / "slurm" / script), *args], cwd=cwd,
                              env=base, capture_output=True, text=True, timeout=60,
                              check=False)
        calls = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
        return proc, calls
    run.repo = repo
    return run


def test_submit_with_default_node_list_from_another_directory(cluster):
    proc, calls = cluster("submit_scaling.sh", "cpu", "strong")
    assert proc.returncode == 0, proc.stderr
    repo = str(cluster.repo)
    assert calls == [["sbatch", f"--chdir={repo}", f"--nodes={n}", f"--array={n}",
                      "--job-name=tpmpi-cpu-strong", "--export=ALL,SWEEP=strong",
                      "slurm/cpu_scaling.sbatch"] for n in (1, 2, 4, 8)]
    assert (cluster.repo / "results").is_dir()


def test_submit_passes_extra_sbatch_arguments(cluster):
    proc, calls = cluster("submit_scaling.sh", "gpu", "weak", "1 2", "--partition=gpu",
                          "--time=00:10:00")
    assert proc.returncode == 0, proc.stderr
    assert [c[2:] for c in calls] == [
        [f"--nodes={n}", f"--array={n}", "--job-name=tpmpi-gpu-weak", "--export=ALL,SWEEP=weak",
         "--partition=gpu", "--time=00:10:00", "slurm/gpu_scaling.sbatch"] for n in (1, 2)]


@pytest.mark.parametrize("args, says", [
    ((), "kind '': expected cpu or gpu"),
    (("tpu", "strong"), "kind 'tpu': expected cpu or gpu"),
    (("cpu",), "sweep '': expected strong or weak"),
    (("cpu", "strong", "--partition=x"), "node count '--partition=x'"),
])
def test_submit_usage_errors(cluster, args, says):
    proc, calls = cluster("submit_scaling.sh", *args)
    assert proc.returncode == 2 and calls == []
    assert says in proc.stderr and "usage:" in proc.stderr


JOB = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "2",
       "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "4",
       "SWEEP": "strong"}


def _bench_argv(call):
    """The tpmpi arguments of an srun vector, parsed by tpmpi's own parser."""
    i = call.index("tpmpi")
    assert call[i - 2:i] == ["python", "-m"]
    return call[i + 1:], make_parser().parse_args(call[i + 1:])


def test_cpu_template_runs_info_then_bench(cluster):
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo,
                          SLURM_JOB_NAME="tpmpi-cpu-strong", **JOB)
    assert proc.returncode == 0, proc.stderr
    srun = ["srun", "--mpi=pmix", "--cpus-per-task=4", "--cpu-bind=cores"]
    assert [c[:4] for c in calls] == [srun, srun]
    assert calls[0][4:] == ["python", "-m", "tpmpi", "info"]
    argv, args = _bench_argv(calls[1])
    out = f"{cluster.repo}/results/tpmpi-cpu-strong-70-2.jsonl"
    assert argv == ["bench", "--sweep", "strong", "--ranks", "8", "--scheme", "column,row,tile2d",
                    "--m", "8192", "--k", "8192", "--n", "8192", "--dtype", "float32",
                    "--warmup", "3", "--iters", "20", "--json", out, "--backend", "numpy"]
    assert args.ranks == [8] and args.backend == "numpy"
    assert (cluster.repo / "results").is_dir()  # created when missing


def test_gpu_template_and_overrides(cluster):
    proc, calls = cluster("gpu_scaling.sbatch", cwd=cluster.repo, SLURM_JOB_NAME="tpmpi-gpu",
                          MPI_PLUGIN="pmi2", CALIBRATION="calib.json", M="4096",
                          BENCH_ARGS="--grid auto,2x4 --backward", **dict(JOB, SWEEP="weak"))
    assert proc.returncode == 0, proc.stderr
    bench = calls[1]
    assert bench[:6] == ["srun", "--mpi=pmi2", "--cpus-per-task=4", "--cpu-bind=cores",
                         "--gpus-per-task=1", "--gpu-bind=closest"]
    argv, args = _bench_argv(bench)
    assert args.sweep == "weak" and args.m == [4096] and args.backend == "cupy"
    assert args.calibration == "calib.json" and args.grid == ["auto", "2x4"] and args.backward
    assert "--json" in argv and argv[argv.index("--json") + 1].endswith(
        "results/tpmpi-gpu-70-2.jsonl")


# --------------------------------------------------------------------------- hybrid.sbatch


HYBRID_JOB = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "2",
              "SLURM_JOB_NAME": "tpmpi-hybrid"}


def run_hybrid(cluster, **env):
    return cluster("hybrid.sbatch", cwd=cluster.repo, **dict(HYBRID_JOB, **env))


def train_args(call):
    i = call.index("scripts/train_mlp.py")
    return load_script("train_mlp").build_parser().parse_args(call[i + 1:])


def test_hybrid_tp_inside_nodes_dp_across(cluster):
    proc, calls = run_hybrid(cluster)
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


def test_hybrid_sequence_parallel_and_smaller_tp(cluster):
    proc, calls = run_hybrid(cluster, TP="2", SP="1")
    assert proc.returncode == 0, proc.stderr
    train = train_args(calls[1])
    assert (train.dp, train.tp, train.sequence_parallel) == (4, "2", True)
    assert _bench_argv(calls[2])[1].dp == [1, 4]


@pytest.mark.parametrize("tp", ["3", "16"])
def test_hybrid_tp_must_divide_the_ranks(cluster, tp):
    proc, calls = run_hybrid(cluster, TP=tp)
    assert proc.returncode == 2 and f"TP={tp} does not divide the 8 ranks" in proc.stderr
    assert calls == []  # refused before any srun
