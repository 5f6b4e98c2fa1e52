"""The SLURM templates with fake ``sbatch`` / ``srun`` / ``mpiexec`` / ``scancel`` on PATH (no
Slurm needed; tests/test_slurm_cluster.py runs them under a real one): the argument vectors
they would run, results/ created, usage errors, every size of a sweep checked before any is
submitted, bench flags that tpmpi's own parser accepts; env.sh: the srun plugin of the MPI that
mpi4py loads, the mpiexec launcher, threads per rank, and a stop with one line before any rank
starts for a missing venv or tpmpi, an --export that sbatch split at a comma, a launch that
started singletons; the batch shell outliving its launcher on SIGTERM; slurm/hybrid.sbatch:
the mesh it derives from the allocation (TP = ranks per node, DP = nodes), block distribution,
commands that the parsers of train_mlp.py and tpmpi accept, and the refusal of a TP size that
does not divide the ranks."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from mpi4py import MPI

from conftest import ROOT, load_script
from tpmpi.cli import make_parser

FAKE = f"""#!{sys.executable}
import json, os, sys
tool = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as fh:
    entry = {{"argv": [tool] + sys.argv[1:], "SWEEP": os.environ.get("SWEEP")}}
    fh.write(json.dumps(entry) + "\\n")
if "--version" in sys.argv:
    print("mpirun (Open MPI) 4.1.4" if tool == "mpirun" else "HYDRA build details:")
elif tool == "sbatch":
    refuse = os.environ.get("FAKE_REFUSE_TEST" if "--test-only" in sys.argv
                            else "FAKE_REFUSE_SUBMIT", "-")
    if refuse in sys.argv:
        sys.exit("sbatch: error: Batch job submission failed: Requested node configuration is "
                 "not available")
    if "--test-only" in sys.argv:
        print("sbatch: Job 99 to start at 2030-01-01T00:00:00 using 8 processors", file=sys.stderr)
    else:
        with open(os.environ["FAKE_LOG"]) as fh:
            job = 99 + sum(1 for line in fh if '"sbatch", "--parsable"' in line)
        print(job if "--parsable" in sys.argv else f"Submitted batch job {{job}}")
elif "info" in sys.argv:
    print(os.environ.get("FAKE_INFO", "ranks  " + os.environ.get("SLURM_NTASKS", "?")))
"""

OPEN_MPI = "Open MPI" in MPI.Get_library_version()
PLUGIN = "pmix" if OPEN_MPI else "pmi2"  # what env.sh must choose for the MPI mpi4py loads

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def fake_venv(path, python_args=""):
    """A venv directory whose bin/activate puts a ``python`` running this interpreter (with
    ``python_args``) first on PATH."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "activate").write_text(f'PATH="{path}/bin:$PATH"\n')
    (path / "bin" / "python").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" {python_args} "$@"\n')
    (path / "bin" / "python").chmod(0o755)
    return path


@pytest.fixture
def cluster(tmp_path):
    """A copy of the repository's slurm/ in ``repo`` (no results/), fake Slurm and MPI tools in
    ``bin``, a venv running this Python, an unrelated working directory ``elsewhere``; returns
    a runner giving the process, the calls (argument vectors) and the SWEEP each call saw."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "slurm", repo / "slurm")
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("sbatch", "srun", "scancel", "mpiexec", "mpirun"):
        (fake / tool).write_text(FAKE)
        (fake / tool).chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = tmp_path / "calls.jsonl"
    venv = fake_venv(tmp_path / "venv")

    def run(script, *args, cwd=elsewhere, **env):
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        base.update({"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
                     "VENV": str(venv), **env})
        if log.exists():
            log.unlink()
        proc = subprocess.run(["bash", str(repo / "slurm" / script), *args], cwd=cwd,
                              env=base, capture_output=True, text=True, timeout=60,
                              check=False)
        entries = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
        run.sweeps = [e["SWEEP"] for e in entries]
        return proc, [e["argv"] for e in entries]
    run.repo = repo
    run.tmp = tmp_path
    return run


def submission(repo, n, kind="cpu", sweep="strong", extra=()):
    """The sbatch arguments submit_scaling.sh gives one node count."""
    return [f"--chdir={repo}", f"--nodes={n}", f"--array={n}", f"--job-name=tpmpi-{kind}-{sweep}",
            "--output=results/%x-%A-%a.out", "--export=ALL", *extra,
            f"slurm/{kind}_scaling.sbatch"]


def test_submit_with_default_node_list_from_another_directory(cluster):
    proc, calls = cluster("submit_scaling.sh", "cpu", "strong")
    assert proc.returncode == 0, proc.stderr
    repo = cluster.repo
    nodes = (1, 2, 4, 8)
    assert calls == [["sbatch", "--test-only", *submission(repo, n)] for n in nodes] + \
        [["sbatch", "--parsable", *submission(repo, n)] for n in nodes]
    assert cluster.sweeps == ["strong"] * 8  # in the environment, never inside --export
    assert (cluster.repo / "results").is_dir()
    assert proc.stdout.splitlines() == [
        f"submit_scaling.sh: {n} node(s): job {100 + i} -> "
        f"results/tpmpi-cpu-strong-{100 + i}-{n}.jsonl (log .out)" for i, n in enumerate(nodes)]


def test_submit_passes_extra_sbatch_arguments(cluster):
    proc, calls = cluster("submit_scaling.sh", "gpu", "weak", "1 2", "--partition=gpu",
                          "--time=00:10:00")
    assert proc.returncode == 0, proc.stderr
    extra = ("--partition=gpu", "--time=00:10:00")
    assert [c[2:] for c in calls] == [submission(cluster.repo, n, "gpu", "weak", extra)
                                      for n in (1, 2)] * 2


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


def test_a_size_that_cannot_run_submits_nothing(cluster):
    proc, calls = cluster("submit_scaling.sh", "cpu", "strong", "1 2 4",
                          FAKE_REFUSE_TEST="--nodes=2")
    assert proc.returncode == 1
    assert [c[1] for c in calls] == ["--test-only"] * 3  # every size checked, none submitted
    assert proc.stderr.splitlines() == [
        ("submit_scaling.sh: cpu strong on 2 node(s) cannot run here: sbatch: error: Batch job "
         "submission failed: Requested node configuration is not available"),
        ("submit_scaling.sh: nothing submitted (sinfo shows the partitions; adapt --nodes, "
         "--ntasks-per-node, --cpus-per-task or the partition)")]


def test_a_failed_submission_cancels_the_jobs_before_it(cluster):
    proc, calls = cluster("submit_scaling.sh", "cpu", "weak", "1 2 4",
                          FAKE_REFUSE_SUBMIT="--nodes=4")
    assert proc.returncode == 1
    assert calls[-1] == ["scancel", "100", "101"]
    assert "submitting 4 node(s) failed" in proc.stderr
    assert "cancelling the jobs already submitted: 100 101" in proc.stderr


JOB = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "2",
       "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "4",
       "SWEEP": "strong"}


def _bench_argv(call):
    """The tpmpi arguments of a launch vector, parsed by tpmpi's own parser."""
    i = call.index("tpmpi")
    assert call[i - 2:i] == ["python", "-m"]
    return call[i + 1:], make_parser().parse_args(call[i + 1:])


def test_cpu_template_runs_info_then_bench(cluster):
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo,
                          SLURM_JOB_NAME="tpmpi-cpu-strong", **JOB)
    assert proc.returncode == 0, proc.stderr
    srun = ["srun", f"--mpi={PLUGIN}", "--cpus-per-task=4", "--cpu-bind=cores",
            "--kill-on-bad-exit=1"]
    assert [c[:5] for c in calls] == [srun, srun]
    assert calls[0][5:] == ["python", "-m", "tpmpi", "info"]
    argv, args = _bench_argv(calls[1])
    out = f"{cluster.repo}/results/tpmpi-cpu-strong-70-2.jsonl"
    assert argv == ["bench", "--sweep", "strong", "--ranks", "8", "--scheme", "column,row,tile2d",
                    "--m", "8192", "--k", "8192", "--n", "8192", "--dtype", "float32",
                    "--warmup", "3", "--iters", "20", "--json", out, "--backend", "numpy"]
    assert args.ranks == [8] and args.backend == "numpy"
    assert (cluster.repo / "results").is_dir()  # created when missing
    header = proc.stdout.splitlines()[0]
    assert header.startswith(f"tpmpi-cpu-strong: 2 nodes, 8 tasks, 4 threads/task, srun "
                             f"--mpi={PLUGIN}, {'Open MPI' if OPEN_MPI else 'MPICH'}")


def test_gpu_template_and_overrides(cluster):
    proc, calls = cluster("gpu_scaling.sbatch", cwd=cluster.repo, SLURM_JOB_NAME="tpmpi-gpu",
                          MPI_PLUGIN="cray_shasta", CALIBRATION="calib.json", M="4096",
                          BENCH_ARGS="--grid auto,2x4 --backward", **dict(JOB, SWEEP="weak"))
    assert proc.returncode == 0, proc.stderr
    bench = calls[1]
    assert bench[:7] == ["srun", "--mpi=cray_shasta", "--cpus-per-task=4", "--cpu-bind=cores",
                         "--kill-on-bad-exit=1", "--gpus-per-task=1", "--gpu-bind=closest"]
    argv, args = _bench_argv(bench)
    assert args.sweep == "weak" and args.m == [4096] and args.backend == "cupy"
    assert args.calibration == "calib.json" and args.grid == ["auto", "2x4"] and args.backward
    assert "--json" in argv and argv[argv.index("--json") + 1].endswith(
        "results/tpmpi-gpu-70-2.jsonl")


@pytest.mark.parametrize("given, threads", [
    ({"SLURM_CPUS_ON_NODE": "16", "SLURM_NTASKS_PER_NODE": "4"}, 4),
    ({"SLURM_CPUS_ON_NODE": "16", "SLURM_TASKS_PER_NODE": "2(x4)"}, 8),
    ({"SLURM_CPUS_ON_NODE": "2", "SLURM_NTASKS_PER_NODE": "4"}, 1),
])
def test_threads_without_cpus_per_task_share_the_node(cluster, given, threads):
    job = {k: v for k, v in JOB.items() if k != "SLURM_CPUS_PER_TASK"}
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, **job, **given)
    assert proc.returncode == 0, proc.stderr
    assert calls[1][2] == f"--cpus-per-task={threads}"


def test_mpiexec_launcher_of_the_mpi_mpi4py_loads(cluster):
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, LAUNCHER="mpiexec", **JOB)
    assert proc.returncode == 0, proc.stderr
    launch = (["mpirun", "-n", "8", "--map-by", "slot:PE=4", "--bind-to", "core"] if OPEN_MPI
              else ["mpiexec", "-n", "8"])
    assert calls[0] == [launch[0], "--version"]
    assert calls[1] == launch + ["python", "-m", "tpmpi", "info"]
    assert calls[2][:len(launch) + 3] == launch + ["python", "-m", "tpmpi"]


def test_mpiexec_of_another_mpi_is_refused(cluster):
    other = "mpiexec" if OPEN_MPI else "mpirun"  # fake mpirun is Open MPI's, mpiexec Hydra
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, LAUNCHER="mpiexec",
                          MPIEXEC=other, **JOB)
    assert proc.returncode == 2 and calls == [[other, "--version"]]
    assert f"error: MPIEXEC={other} (" in proc.stderr
    assert "is not the launcher of the MPI that mpi4py loads" in proc.stderr
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, LAUNCHER="mpiexec",
                          MPIEXEC="/no/mpiexec", **JOB)
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip() == "tpmpi: error: MPIEXEC=/no/mpiexec: not found"


@pytest.mark.parametrize("export, says", [
    ("ALL,SCHEMES=column,row",
     "sbatch split 'SCHEMES=column,row' at its comma, so SCHEMES got 'column' alone"),
    ("ALL,BENCH_ARGS=--ranks 8,16,32", "so BENCH_ARGS got '--ranks 8' alone"),
    ("NONE,M=1,K", "so M got '1' alone"),
])
def test_an_export_split_at_a_comma_stops_the_job(cluster, export, says):
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, SLURM_EXPORT_ENV=export,
                          **JOB)
    assert proc.returncode == 2 and calls == []
    assert says in proc.stderr and "sbatch --export=ALL" in proc.stderr


def test_an_export_of_names_that_exist_is_fine(cluster):
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, SLURM_EXPORT_ENV="ALL,HOME,M=64",
                          M="64", **JOB)
    assert proc.returncode == 0, proc.stderr
    assert _bench_argv(calls[1])[1].m == [64]


def test_no_venv_stops_the_job_before_any_rank(cluster):
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, **dict(JOB, VENV="/no/venv"))
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip() == "tpmpi: error: VENV=/no/venv: no /no/venv/bin/activate"


def test_a_python_without_tpmpi_stops_the_job_before_any_rank(cluster):
    bare = fake_venv(cluster.tmp / "bare", python_args="-S")  # no site-packages
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, **dict(JOB, VENV=str(bare)))
    assert proc.returncode == 2 and calls == []
    assert "cannot import mpi4py and tpmpi: set VENV=<venv with tpmpi>" in proc.stderr


def test_a_launch_of_singletons_stops_before_the_bench(cluster):
    proc, calls = cluster("cpu_scaling.sbatch", cwd=cluster.repo, MPI_PLUGIN="none",
                          FAKE_INFO="ranks  1", **JOB)
    assert proc.returncode == 2 and len(calls) == 1  # info only
    assert "srun --mpi=none did not start one MPI job of 8 ranks" in proc.stderr


def test_the_templates_name_plain_job_logs_by_job_id():
    for name in ("cpu_scaling", "gpu_scaling", "hybrid", "train_gpt"):
        text = (ROOT / "slurm" / f"{name}.sbatch").read_text()
        assert "#SBATCH --output=results/%x-%j.out" in text, name  # %a: 4294967294 off arrays


def test_the_batch_shell_waits_for_its_launcher_on_sigterm(cluster):
    """scancel signals every process of the job: the shell must not leave before its srun
    (whose ranks end the MPI job), or the job ends while they still run."""
    done = cluster.tmp / "srun-done"
    slow = cluster.tmp / "slow"
    slow.mkdir()
    (slow / "srun").write_text(f"""#!{sys.executable}
import os, signal, sys, time
if "info" in sys.argv:
    print("ranks  8")
    sys.exit(0)
open("{done}.started", "w").close()
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), open("{done}", "w").close(),
                                          os._exit(143)))
time.sleep(60)
""")
    (slow / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(JOB, PATH=f"{slow}{os.pathsep}{os.environ['PATH']}",
               VENV=str(fake_venv(cluster.tmp / "v2")))
    job = subprocess.Popen(["bash", "slurm/cpu_scaling.sbatch"], cwd=cluster.repo, env=env,
                           start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{done}.started") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGTERM)  # as slurmstepd: the shell and srun together
        job.wait(timeout=30)
        assert done.exists()  # the shell ended after its srun
        assert job.returncode == 143
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


# --------------------------------------------------------------------------- hybrid.sbatch


HYBRID_JOB = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "2",
              "SLURM_JOB_NAME": "tpmpi-hybrid"}


def run_hybrid(cluster, template="hybrid.sbatch", **env):
    """``template`` run as a job of 2 nodes x 4 ranks named after it."""
    job = dict(HYBRID_JOB, SLURM_JOB_NAME=f"tpmpi-{template.split('.')[0].replace('_', '-')}")
    return cluster(template, cwd=cluster.repo, **dict(job, **env))


def script_args(call, name="train_mlp"):
    """The parsed flags of ``scripts/<name>.py`` in a launcher's command line."""
    i = call.index(f"scripts/{name}.py")
    return load_script(name).build_parser().parse_args(call[i + 1:])


def test_hybrid_tp_inside_nodes_dp_across(cluster):
    proc, calls = run_hybrid(cluster)
    assert proc.returncode == 0, proc.stderr
    assert "dp 2 x tp 4" in proc.stdout
    assert len(calls) == 3 and all("--distribution=block:block" in c for c in calls)
    assert calls[0][-4:] == ["python", "-m", "tpmpi", "info"]
    train = script_args(calls[1])
    assert (train.dp, train.tp, train.sequence_parallel, train.measure_overlap) == \
        (2, "4", False, True)
    argv, args = _bench_argv(calls[2])
    assert args.dp == [1, 2] and args.mode == ["megatron", "sequence"]
    assert (args.k, args.n, args.hidden) == ([2048], [2048], [8192]) and args.backward
    assert argv[argv.index("--json") + 1].endswith("results/tpmpi-hybrid-7.jsonl")


def test_hybrid_sequence_parallel_smaller_tp_and_train_args(cluster):
    proc, calls = run_hybrid(cluster, TP="2", SP="1", TRAIN_ARGS="--steps 20 --print-every 5")
    assert proc.returncode == 0, proc.stderr
    train = script_args(calls[1])
    assert (train.dp, train.tp, train.sequence_parallel) == (4, "2", True)
    assert (train.steps, train.print_every) == (20, 5)
    assert _bench_argv(calls[2])[1].dp == [1, 4]


@pytest.mark.parametrize("tp, says", [("3", "TP=3 does not divide the 8 ranks"),
                                      ("16", "TP=16 does not divide the 8 ranks"),
                                      ("two", "TP=two: expected a positive integer")])
def test_hybrid_tp_must_divide_the_ranks(cluster, tp, says):
    proc, calls = run_hybrid(cluster, TP=tp)
    assert proc.returncode == 2 and proc.stderr.strip() == f"tpmpi-hybrid: error: {says}"
    assert calls == []  # refused before any srun


# --------------------------------------------------------------------------- train_gpt.sbatch


def test_train_gpt_tp_inside_nodes_dp_across(cluster):
    proc, calls = run_hybrid(cluster, "train_gpt.sbatch")
    assert proc.returncode == 0, proc.stderr
    assert "dp 2 x tp 4" in proc.stdout and "batch 32" in proc.stdout
    assert len(calls) == 2 and all("--distribution=block:block" in c for c in calls)
    args = script_args(calls[1], "train_gpt")
    assert (args.dp, args.tp, args.sequence_parallel, args.batch, args.steps) == \
        (2, 4, False, 32, 1000)
    assert (args.check, args.save, args.resume) == (False, None, None)
    assert args.json.endswith("results/tpmpi-train-gpt-7.jsonl")


def test_train_gpt_parameters_reach_the_script(cluster):
    proc, calls = run_hybrid(cluster, "train_gpt.sbatch", TP="1", SP="1", DROPOUT="0.1",
                             DTYPE="float64", STEPS="9", CHECK="1", SAVE="ck",
                             TRAIN_ARGS="--log-every 3")
    assert proc.returncode == 0, proc.stderr
    args = script_args(calls[1], "train_gpt")
    assert (args.dp, args.tp, args.sequence_parallel, args.dropout, args.dtype) == \
        (8, 1, True, 0.1, "float64")
    assert (args.batch, args.steps, args.check, args.save, args.log_every) == \
        (32, 9, True, "ck", 3)


@pytest.mark.parametrize("env, says", [({"TP": "3"}, "TP=3 does not divide the 8 ranks"),
                                       ({"TP": "1", "BATCH": "12"},
                                        "BATCH=12 is not a multiple of DP=8")])
def test_train_gpt_refuses_before_any_rank(cluster, env, says):
    proc, calls = run_hybrid(cluster, "train_gpt.sbatch", **env)
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip().startswith(f"tpmpi-train-gpt: error: {says}")
