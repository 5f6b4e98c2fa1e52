"""A write that fails on one rank never hangs a save, never commits a bad version and never costs
the previous one: every case of tests/failwrite.py (ENOSPC or EIO from write, pwrite, fsync or
ftruncate of one checkpoint file, on one rank), run for real through the LD_PRELOAD shim in jobs
of 2 and 4 ranks, under the MPICH wheel and, when installed, Debian's Open MPI (serial tests
that launch their own MPI jobs)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import failwrite  # noqa: E402
from jobs import job_env, serial_only  # noqa: E402


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    try:
        return failwrite.build(str(tmp_path_factory.mktemp("shim")))
    except RuntimeError as exc:
        pytest.skip(f"the fault-injection shim needs gcc: {exc}")


def launcher(mpi: str, ranks: int) -> tuple[list, dict]:
    """The command prefix and the environment of a job of ``ranks`` under ``mpi``."""
    env = job_env()
    if mpi == "openmpi":
        exe = shutil.which("mpiexec.openmpi")
        if exe is None:
            pytest.skip("Debian's Open MPI is not installed (apt-get install openmpi-bin)")
        env["MPI4PY_MPIABI"] = "openmpi"
        return [exe, "--oversubscribe", "-n", str(ranks)], env
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return [local if os.path.exists(local) else shutil.which("mpiexec"), "-n", str(ranks)], env


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("mpi", ["mpich", "openmpi"])
def test_a_failed_write_on_one_rank_is_reported_everywhere_and_keeps_the_previous_version(
        tmp_path, shim, mpi, ranks):
    serial_only()
    prefix, env = launcher(mpi, ranks)
    env["LD_PRELOAD"] = shim
    job = subprocess.run(prefix + [sys.executable, os.path.join(HERE, "failwrite.py"),
                                   str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert job.returncode == 0, job.stdout + job.stderr
    results = [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in results] == [c[0] for c in failwrite.CASES], job.stdout
    fired = []
    for r, (label, _, _, pattern, _, _, err) in zip(results, failwrite.CASES):
        messages = r["messages"]
        assert len(set(messages)) == 1, (label, messages)  # every rank, alike
        if not r["fired"]:  # another rank did this rank's I/O: the save must have worked
            assert messages == [None] * ranks and r["loads"] == 2, (label, r)
            print(f"{mpi} P={ranks} {label}: not fired (collective buffering), saved")
            continue
        fired.append(label)
        message = messages[0]
        name = re.escape(pattern.split("*")[-1])
        assert message and re.search(rf"^save_checkpoint\('.*case\d'\) failed: .*{name}.*: ",
                                     message), (label, message)
        # the errno text; Open MPI reports a failed pwrite as a short byte count or not at all
        # (an aggregator's: the read-back finds it), a failed ftruncate as MPI_ERR_OTHER
        other = (r"(only \d+ of \d+ bytes were transferred|read back differs from what it "
                 r"wrote), without an error from the MPI library|MPI_ERR_OTHER")
        reason = os.strerror(err) if mpi == "mpich" else f"({os.strerror(err)}|{other})"
        assert re.search(reason, message), (label, message)
        assert re.search(r"(still holds v000001, unchanged|is unchanged)$", message), \
            (label, message)
        assert r["loads"] == 1, label  # the previous version, intact
        assert r["listing"] == ["manifest.json", "v000001", "v000001/bias.npy",
                                "v000001/weight.npy"], (label, r["listing"])
        print(f"{mpi} P={ranks} {label}: {message}\n  on disk: {r['listing']}")
    assert len(fired) >= len(failwrite.CASES) - 2, fired  # only the last rank's may not fire
