"""The SLURM templates under a real Slurm (the cluster of slurm/local_cluster.sh: .ci/slurm.sh
starts one node, runs this module, then two nodes and runs it again). Every template is
submitted as a user submits it -- from a login shell with no venv active, parameters in the
environment -- under each launch of MODES (PyPI's MPICH: srun --mpi=pmi2 and the wheel's mpiexec;
the system's Open MPI: srun --mpi=pmix and mpirun), all at once; then each job's state, records
(fields, ranks, the MPI library named cleanly), log, and the report built from the records are
checked. Jobs that must stop before any rank starts (no venv, no tpmpi, an --export that sbatch
split, singletons), sweeps that cannot be submitted, and a sweep ended by scancel or by its
time limit (one line, every rank gone at once, the finished records kept) are checked too.

Skipped unless SLURM_CONF names a running cluster of slurm/local_cluster.sh (never a site's).
To add a template: one entry in TEMPLATES.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from tpmpi.studies.record import RunRecord


LOCAL = "# Written by tpmpi's slurm/local_cluster.sh"


def _cluster_nodes() -> int:
    """Nodes of the running cluster SLURM_CONF names; 0 without one, and for any cluster that
    slurm/local_cluster.sh did not make (never submit tests to a site's cluster)."""
    conf = Path(os.environ.get("SLURM_CONF", "/nonexistent"))
    if not conf.is_file() or not conf.read_text().startswith(LOCAL) \
            or shutil.which("sinfo") is None:
        return 0
    out = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True,
                         check=False)
    return sum(int(n) for n in out.stdout.split()) if out.returncode == 0 else 0


NODES = _cluster_nodes()
pytestmark = [pytest.mark.skipif(NODES == 0, reason="no cluster of slurm/local_cluster.sh "
                                 "named by SLURM_CONF (bash .ci/slurm.sh starts one)"),
              pytest.mark.timeout(1500)]

OPEN_MPI = {"MPI4PY_MPIABI": "openmpi",
            # the emulated nodes share one host, where Open MPI's shared-memory transport
            # between "nodes" crashes (vader segfault in MPI_Comm_split_type)
            "OMPI_MCA_btl": "self,tcp"}


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way to start the ranks: the MPI library the records must name, and the submitting
    environment that selects it."""
    library: str
    env: dict
    needs: str = ""  # an executable without which the mode is skipped


MODES = {
    "mpich-srun": Mode("MPICH", {}),
    "mpich-mpiexec": Mode("MPICH", {"LAUNCHER": "mpiexec"}),
    "openmpi-srun": Mode("Open MPI", OPEN_MPI, "mpirun.openmpi"),
    "openmpi-mpirun": Mode("Open MPI", {**OPEN_MPI, "LAUNCHER": "mpiexec",
                                        "MPIEXEC": "mpirun.openmpi",  # the venv's is MPICH's
                                        "OMPI_ALLOW_RUN_AS_ROOT": "1",
                                        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"},
                           "mpirun.openmpi"),
}


@dataclasses.dataclass(frozen=True)
class Job:
    """A job a submission must leave: ``stem`` names its log and records in results/
    (``{id}``: the job id sbatch printed), and what they must show."""
    stem: str
    nodes: int
    ranks: int
    records: int
    log_has: tuple = ()


@dataclasses.dataclass(frozen=True)
class Template:
    """A submission as a user types it in the repository root (``argv``, parameters ``env``
    in the environment), on a cluster of ``cluster`` nodes, and the jobs it submits."""
    name: str
    cluster: int
    argv: tuple
    env: dict
    jobs: tuple
    report: bool = True  # `tpmpi report` over the records
    modes: tuple = tuple(MODES)
    record: type = RunRecord  # the record class whose fields every record has


@dataclasses.dataclass
class TrainRecord:
    """The fields of every record of scripts/train_gpt.py --json."""
    kind: str
    step: int
    ranks: int
    mpi_library: str
    dp: int
    tp: int
    tokens_per_s: float
    OPTIONAL = ()


SMALL = {"M": "256", "K": "256", "N": "256", "ITERS": "3", "WARMUP": "1"}
TEMPLATES = [
    Template("cpu-weak", 1, ("slurm/submit_scaling.sh", "cpu", "weak", "1"), SMALL,
             (Job("tpmpi-cpu-weak-{id}-1", 1, 2, 3),)),
    # submitted by hand: the log is named by the job id alone; a comma list in the environment
    Template("cpu-by-hand", 1, ("sbatch", "slurm/cpu_scaling.sbatch"),
             {**SMALL, "SCHEMES": "column,row"}, (Job("tpmpi-cpu-{id}", 1, 2, 2),),
             modes=("mpich-srun", "openmpi-srun")),
    Template("cpu-strong", 2, ("slurm/submit_scaling.sh", "cpu", "strong", "1 2"), SMALL,
             (Job("tpmpi-cpu-strong-{id}-1", 1, 2, 3), Job("tpmpi-cpu-strong-{id}-2", 2, 4, 3))),
    Template("hybrid", 2, ("sbatch", "--nodes=2", "slurm/hybrid.sbatch"),
             {"M": "256", "K": "128", "ITERS": "3", "WARMUP": "1", "TRAIN_ARGS": "--steps 20"},
             (Job("tpmpi-hybrid-{id}", 2, 4, 4, ("= dp 2 x tp 2", "): agree;")),)),
    # records of steps 0, 2 (validation), 4, 5 (validation, the last) and the sample's
    Template("train-gpt", 2, ("sbatch", "--nodes=2", "slurm/train_gpt.sbatch"),
             {"STEPS": "6", "CHECK": "1", "DTYPE": "float64", "DROPOUT": "0.1",
              "TRAIN_ARGS": "--n-layer 1 --n-embd 16 --block-size 16 --log-every 2 "
                            "--eval-every 3 --eval-batches 1 --sample-chars 20"},
             (Job("tpmpi-train-gpt-{id}", 2, 4, 5, ("= dp 2 x tp 2", "float64): agree")),),
             record=TrainRecord),
]


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A job that must stop in its batch shell, before any rank, with exit code 2 and one line."""
    name: str
    argv: tuple
    env: dict
    says: str


REFUSALS = [
    Refusal("no-venv", ("sbatch", "slurm/cpu_scaling.sbatch"), {"VENV": "/no/venv"},
            "tpmpi-cpu: error: VENV=/no/venv: no /no/venv/bin/activate"),
    Refusal("no-tpmpi", ("sbatch", "slurm/cpu_scaling.sbatch"), {"VENV": "", "BARE": "1"},
            "cannot import mpi4py and tpmpi: set VENV=<venv with tpmpi> or create"),
    Refusal("export-split", ("sbatch", "--export=ALL,SCHEMES=column,row",
                             "slurm/cpu_scaling.sbatch"), {},
            "sbatch split 'SCHEMES=column,row' at its comma, so SCHEMES got 'column' alone"),
    Refusal("singletons", ("sbatch", "slurm/cpu_scaling.sbatch"), {"MPI_PLUGIN": "none"},
            "srun --mpi=none did not start one MPI job of 2 ranks"),
    Refusal("hybrid-tp", ("sbatch", "slurm/hybrid.sbatch"), {"TP": "3"},
            "tpmpi-hybrid: error: TP=3 does not divide the 2 ranks"),
]


@dataclasses.dataclass(frozen=True)
class Stop:
    """A sweep ended from outside after its first record: ``scancel`` (``time`` None) or a time
    limit of ``time`` minutes. Its second configuration runs far longer than the limit."""
    mode: str
    time: int | None = None


LONG = {"SCHEMES": "column", "M": "64,8192", "K": "2048", "N": "2048", "ITERS": "100",
        "WARMUP": "1"}
STOPS = [Stop(mode) for mode in MODES] + [Stop("mpich-srun", time=1)]


def _cases() -> list:
    return [(t, m) for t in TEMPLATES for m in t.modes]


def _submit(root: Path, argv: tuple, env: dict) -> tuple[list, subprocess.CompletedProcess]:
    """Run a submission in ``root`` from a clean login environment plus ``env``; the job ids
    it printed."""
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8", "SLURM_CONF": os.environ["SLURM_CONF"],
            "SBATCH_TIMELIMIT": "5"}  # minutes: a job that hangs cannot hold the run for long
    base.update({k: v for k, v in env.items() if k != "BARE"})
    if env.get("BARE"):  # a `python` on PATH without site-packages: no mpi4py, no tpmpi
        bare = root / "bare-bin"
        bare.mkdir(exist_ok=True)
        (bare / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
        (bare / "python").chmod(0o755)
        base["PATH"] = f"{bare}:{base['PATH']}"
    argv = ("bash", *argv) if argv[0].endswith(".sh") else argv
    proc = subprocess.run(argv, cwd=root, env=base, capture_output=True, text=True,
                          timeout=120, check=False)
    return re.findall(r"\bjob (\d+)", proc.stdout), proc


def _job_root(base: Path, name: str) -> Path:
    """A copy of the repository's slurm/ and scripts/ (the templates' root) with results/."""
    root = base / name
    shutil.copytree(ROOT / "slurm", root / "slurm")
    shutil.copytree(ROOT / "scripts", root / "scripts")
    (root / "results").mkdir()
    return root


def show(job: str) -> dict:
    """``scontrol show job`` of one job (kept MinJobAge seconds after it ends) as a dict."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                         text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))


def _running(ids: list) -> set:
    out = subprocess.run(["squeue", "-h", "-o", "%A", "-j", ",".join(ids)],
                         capture_output=True, text=True, check=False).stdout
    return set(out.split()) & set(ids)


def _tasks_left(marker: str) -> list:
    """Processes whose command line contains ``marker`` (a job's records file)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    left.append(int(pid))
        except OSError:
            continue
    return left


def _wait(ids: dict, stops: dict) -> None:
    """Wait for the jobs of ``ids`` (15 min at most), cancelling each scancel stop case once
    its first record is written and noting when each stop case left the queue."""
    every = [j for key in ids for j in ids[key]]
    deadline = time.monotonic() + 900
    while True:
        left = _running(every)
        for key, stop in stops.items():
            job = ids[key][0] if ids[key] else None
            records = stop["root"] / "results" / f"tpmpi-stop-{job}.jsonl"
            if job in left and key[2] is None and "cancelled" not in stop \
                    and records.exists() and records.read_text().count("\n") >= 1:
                subprocess.run(["scancel", job], check=True)
                stop["cancelled"] = time.monotonic()
            if job and job not in left and "ended" not in stop:
                stop["ended"] = time.monotonic()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if left:
        subprocess.run(["scancel", *left], check=False)
        pytest.fail(f"jobs {sorted(left)} still queued or running after 15 min")


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """Every case for this cluster's size submitted at once (one job root per mode), the
    stop cases cancelled after their first record, all waited for. Returns the roots, job ids
    per case and what the stop cases measured."""
    if not (Path(sys.prefix) / "bin" / "activate").exists():
        pytest.fail(f"run this module from a venv with tpmpi installed ({sys.prefix} is none)")
    venv = str(Path(sys.prefix))
    base = tmp_path_factory.mktemp("slurm-jobs")
    modes = {m: mode for m, mode in MODES.items() if not mode.needs or shutil.which(mode.needs)}
    roots = {m: _job_root(base, m) for m in modes}
    cases = {}  # key: (job root, argv, submitting environment)
    for template, m in _cases():
        if template.cluster == NODES and m in modes:
            cases[(template.name, m)] = (roots[m], template.argv,
                                         {"VENV": venv, **modes[m].env, **template.env})
    if NODES == 1:
        roots["refusals"] = _job_root(base, "refusals")
        for r in REFUSALS:
            cases[("refusal", r.name)] = (roots["refusals"], r.argv,
                                          {"VENV": venv, **SMALL, **r.env})
    for stop in STOPS:
        if stop.mode in modes and (stop.time is None) == (NODES == 1):
            argv = ("sbatch", "--job-name=tpmpi-stop") + \
                (() if stop.time is None else (f"--time={stop.time}",)) + \
                ("slurm/cpu_scaling.sbatch",)
            cases[("stop", stop.mode, stop.time)] = (roots[stop.mode], argv,
                                                      {"VENV": venv, **modes[stop.mode].env,
                                                       **LONG})
    ids, procs, stops = {}, {}, {}
    for key, (root, argv, env) in cases.items():
        ids[key], procs[key] = _submit(root, argv, env)
        if key[0] == "stop":
            stops[key] = {"root": root}
    _wait(ids, stops)
    return {"roots": roots, "ids": ids, "procs": procs, "stops": stops}


def _log(root: Path, stem: str) -> str:
    data = (root / "results" / f"{stem}.out").read_bytes()
    assert b"\0" not in data, f"{stem}.out holds a NUL byte"
    return data.decode()


@pytest.mark.parametrize("template, mode", _cases(), ids=[f"{t.name}-{m}" for t, m in _cases()])
def test_template(submitted, template, mode):
    if template.cluster != NODES:
        pytest.skip(f"runs on a cluster of {template.cluster} node(s), this one has {NODES}")
    if mode not in submitted["roots"]:
        pytest.skip(f"{MODES[mode].needs} not installed")
    root = submitted["roots"][mode]
    proc = submitted["procs"][(template.name, mode)]
    ids = submitted["ids"][(template.name, mode)]
    assert proc.returncode == 0 and len(ids) == len(template.jobs), (proc.stdout, proc.stderr)
    files = []
    for job_id, job in zip(ids, template.jobs):
        stem = job.stem.format(id=job_id)
        state = show(job_id)
        log = _log(root, stem)
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log
        assert (state["NumNodes"], state["NumTasks"]) == (str(job.nodes), str(job.ranks))
        info = dict(re.findall(r"^(ranks|nodes|mpi_library) +(.+)$", log, re.M))
        assert info["ranks"] == str(job.ranks) and info["nodes"] == str(job.nodes), log
        assert info["mpi_library"].startswith(MODES[mode].library), log
        assert not re.search(r"error|Traceback|Warning: Mesh", log), log
        for phrase in job.log_has:
            assert phrase in log, (phrase, log)
        records = [json.loads(line) for line in (root / "results" / f"{stem}.jsonl").open()]
        assert len(records) == job.records, records
        kind = template.record
        required = {f.name for f in dataclasses.fields(kind)} - set(kind.OPTIONAL)
        for rec in records:
            assert required <= set(rec), required - set(rec)
            assert rec["ranks"] == job.ranks and rec["mpi_library"] == info["mpi_library"]
            assert "\0" not in rec["mpi_library"] and "\n" not in rec["mpi_library"]
            if "max_rel_err" in rec:  # checked against the float64 reference
                assert rec["max_rel_err"] <= rec["tolerance"], rec
        files.append(root / "results" / f"{stem}.jsonl")
    if template.report:
        out = root / f"report-{template.name}"
        run = subprocess.run([sys.executable, "-m", "tpmpi", "report", *map(str, files),
                              "--out", str(out)], capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr
        table = (out / "report.md").read_text()
        for job in template.jobs:
            assert re.search(rf"^\| [^|]+ \| {job.ranks} \|", table, re.M), table


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.name for r in REFUSALS])
def test_a_job_that_cannot_work_stops_before_any_rank(submitted, refusal):
    if NODES != 1:
        pytest.skip("runs on the one-node cluster")
    (job,) = submitted["ids"][("refusal", refusal.name)]
    state = show(job)
    stem = f"{state['JobName']}-{job}"
    log = _log(submitted["roots"]["refusals"], stem)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), log
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and refusal.says in errors[0], log
    if refusal.name != "singletons":  # the one refusal that has to launch to find out
        assert "mpi_library" not in log and "srun:" not in log, log  # no rank ran
    assert not (submitted["roots"]["refusals"] / "results" / f"{stem}.jsonl").exists()


@pytest.mark.parametrize("stop", STOPS, ids=[f"{'scancel' if s.time is None else 'timelimit'}-"
                                             f"{s.mode}" for s in STOPS])
def test_a_stopped_sweep_ends_every_rank_and_keeps_its_records(submitted, stop):
    if (stop.time is None) != (NODES == 1):
        pytest.skip("scancel on the one-node cluster, the time limit on the two-node one")
    key = ("stop", stop.mode, stop.time)
    if key not in submitted["ids"]:
        pytest.skip(f"{MODES[stop.mode].needs} not installed")
    (job,) = submitted["ids"][key]
    measured = submitted["stops"][key]
    root = measured["root"]
    state = show(job)
    log = _log(root, f"tpmpi-stop-{job}")
    assert state["JobState"] == ("CANCELLED" if stop.time is None else "TIMEOUT"), log
    assert re.search(rf"\*\*\* JOB {job} ON \S+ CANCELLED AT \S+"
                     f"{'' if stop.time is None else ' DUE TO TIME LIMIT'} \\*\\*\\*", log), log
    ours = re.findall(r"^tpmpi: interrupted.*$", log, re.M)
    if stop.mode == "openmpi-mpirun":  # mpirun ends its ranks itself, before they report
        assert ours == [], log
    else:
        assert ours == ["tpmpi: interrupted by SIGTERM (rank 0): aborting the MPI job"], log
    assert "Traceback" not in log, log
    if stop.time is None:  # ended by the ranks, well before Slurm's SIGKILL (KillWait=30 s)
        assert measured["ended"] - measured["cancelled"] < 20, measured
    records = root / "results" / f"tpmpi-stop-{job}.jsonl"
    assert [json.loads(line)["m"] for line in records.open()] == [64]  # the finished one
    assert _tasks_left(str(records)) == []


def test_a_sweep_that_cannot_run_here_submits_nothing(tmp_path):
    root = _job_root(tmp_path, "refused")
    too_many = NODES + 1
    ids, proc = _submit(root, ("slurm/submit_scaling.sh", "cpu", "strong", f"1 {too_many}"),
                        {"VENV": sys.prefix})
    assert proc.returncode == 1 and ids == [], proc.stdout
    assert f"cpu strong on {too_many} node(s) cannot run here:" in proc.stderr
    assert proc.stderr.rstrip().endswith("or the partition)")
    queued = subprocess.run(["squeue", "-h", "-n", "tpmpi-cpu-strong"], capture_output=True,
                            text=True, check=True).stdout
    assert queued == ""


def test_a_gpu_sweep_on_a_cluster_without_gpus_submits_nothing(tmp_path):
    root = _job_root(tmp_path, "gpu")
    ids, proc = _submit(root, ("slurm/submit_scaling.sh", "gpu", "weak", "1"),
                        {"VENV": sys.prefix})
    assert proc.returncode == 1 and ids == []
    assert "gpu weak on 1 node(s) cannot run here: sbatch: error: Invalid generic resource" \
        in proc.stderr
