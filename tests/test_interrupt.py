"""Ctrl-C and SIGTERM end a running ``python -m tpmpi run`` job promptly with one line (serial
tests that launch their own 2-rank job and signal ONE rank of it, as an impatient user would;
the other rank must not be left spinning in a collective), and a signal that a SLURM job sends
to every task (scancel, a time limit) leaves rank 0 alone to print it."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from jobs import job_env, launcher, serial_only

ARGV = ["-m", "tpmpi", "run", "--m", "192", "--k", "192", "--n", "192", "--backward",
        "--warmup", "0", "--iters", "1000000"]


def _children(pid: int) -> list:
    """All descendants of ``pid`` (from /proc), depth first."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                kids += [int(entry)] + _children(int(entry))
    return kids


def _ranks(pid: int) -> list:
    """The pids of the job's Python ranks (their command line runs tpmpi)."""
    out = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"tpmpi" in cmd and b"run" in cmd and os.path.basename(cmd[0]).startswith(b"python"):
            out.append(child)
    return sorted(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig,rank", [(signal.SIGINT, 1), (signal.SIGTERM, 0)],
                         ids=["SIGINT-rank1", "SIGTERM-rank0"])
def test_a_signal_to_one_rank_ends_the_job_with_one_line(sig, rank):
    serial_only()
    job = subprocess.Popen(launcher() + [sys.executable] + ARGV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=job_env(),
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(_ranks(job.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = _ranks(job.pid)
        assert len(pids) == 2, pids
        time.sleep(3)  # imports done: the job is in its timing loop
        assert job.poll() is None, job.communicate()
        start = time.monotonic()
        os.kill(pids[rank], sig)
        _, err = job.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    ours = [line for line in re.split(r"[\r\n]", err) if line.startswith("tpmpi: interrupt")]
    assert ours == [f"tpmpi: interrupted by {sig.name} (rank {rank}): aborting the MPI job"], err
    assert "Traceback" not in err, err
    assert job.returncode != 0
    assert elapsed < 5, elapsed


WATCHED = """
import os, signal, sys, time
from tpmpi.core.launch import watch_signals

class Comm:  # the rank given on the command line; Abort reports instead of ending a job
    def Get_rank(self):
        return int(sys.argv[1])

    def Abort(self, code):
        print(f"Abort({code})", flush=True)
        os._exit(code)

watch_signals(Comm(), "tpmpi", delay=0.05)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
"""


@pytest.mark.parametrize("rank, in_slurm, says", [
    (0, False, True), (1, False, True),   # mpiexec: whichever rank got the signal says so
    (0, True, True), (1, True, False),    # a SLURM job: every task got it, rank 0 says so
], ids=["rank0", "rank1", "slurm-rank0", "slurm-rank1-quiet"])
def test_who_reports_a_sigterm(rank, in_slurm, says):
    serial_only()
    env = job_env()
    if in_slurm:
        env["SLURM_JOB_ID"] = "42"
    proc = subprocess.run([sys.executable, "-c", WATCHED, str(rank)], env=env, timeout=60,
                          capture_output=True, text=True, check=False)
    line = f"tpmpi: interrupted by SIGTERM (rank {rank}): aborting the MPI job"
    assert proc.stdout == "Abort(143)\n" and proc.returncode == 143, proc
    assert [x for x in proc.stderr.splitlines() if x] == ([line] if says else []), proc.stderr
