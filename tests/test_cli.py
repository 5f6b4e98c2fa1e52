"""The CLI in-process on sub-communicators: records, --check, usage errors on every rank."""
import json

import pytest

from tpmpi.cli import main

CONTRACT = {"scheme", "ranks", "grid", "m", "k", "n", "hidden", "dtype", "backend", "gpu_aware",
            "threads_per_rank", "warmup", "iters", "time_s", "gemm_s", "comm_s", "gflops",
            "algbw_gbs", "busbw_gbs", "mem_peak_bytes", "max_rel_err", "predicted_s",
            "mpi_library", "blas", "version", "timestamp"}


@pytest.mark.mpi
def test_run_writes_contract_record(world, tmp_path_factory):
    if not world.member:
        return
    comm = world.comm
    path = comm.bcast(str(tmp_path_factory.mktemp("cli") / "r.jsonl") if comm.Get_rank() == 0
                      else None)
    argv = ["run", "--m", "7", "--k", "5", "--n", "6", "--dtype", "float64", "--backward",
            "--iters", "2", "--warmup", "1", "--check", "--json", path, "--baseline"]
    assert main(argv, comm) == 0
    comm.Barrier()
    if comm.Get_rank() == 0:
        (line,) = open(path).read().splitlines()
        rec = json.loads(line)
        assert CONTRACT <= rec.keys()
        assert rec["ranks"] == world.size and rec["grid"] == f"1x{world.size}"
        assert rec["max_rel_err"] <= 1e-10 and rec["gflops"] > 0
        assert set(rec["time_s"]) == {"median", "min", "max"}
        assert rec["blas"]["library"] and rec["baseline_s"] > 0 and rec["speedup"] > 0
        if world.size > 1:
            assert rec["collectives"] == {"allgather": 1, "allreduce": 1}
            assert rec["comm_bytes"] == 8 * (7 * 6 + 7 * 5)


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [["run", "--m", "-1"], ["run", "--grid", "5x7"],
                                  ["run", "--dtype", "int8"], ["run", "--scheme", "diag"],
                                  ["bogus"], ["run", "--iters", "0"]])
def test_usage_errors_exit_2_on_every_rank(world, argv, capsys):
    if not world.member:
        return
    codes = world.comm.allgather(main(argv, world.comm))
    assert codes == [2] * world.size


@pytest.mark.mpi
def test_inconsistent_flags_across_ranks_exit_2(world):
    if not world.member or world.size == 1:
        return
    rank = world.comm.Get_rank()
    argv = ["run", "--m", str(4 + rank), "--k", "3", "--n", "3", "--iters", "1"]
    assert world.comm.allgather(main(argv, world.comm)) == [2] * world.size


@pytest.mark.mpi
def test_info(world, capsys):
    if not world.member:
        return
    assert main(["info"], world.comm) == 0


def _replace_work(monkeypatch, error: Exception) -> None:
    """The CLI's work (run_case, run_sweep) raises ``error`` instead."""
    from tpmpi import cli

    def work(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "run_case", work)
    monkeypatch.setattr(cli, "run_sweep", work)


def _one_line_everywhere(comm, capsys, code, argv, match):
    """main(argv) returns ``code`` on every rank; rank 0 alone prints one matching line."""
    assert comm.allgather(main(argv, comm)) == [code] * comm.Get_size(), argv
    err = capsys.readouterr().err
    if comm.Get_rank() == 0:
        assert len(err.splitlines()) == 1 and match in err, err
    else:
        assert err == ""


@pytest.mark.mpi
def test_runtime_errors_exit_3_on_every_rank(world, monkeypatch, capsys, tmp_path_factory):
    """An error of the work itself (tpmpi raises it on every rank together) is not a usage
    error: exit 3, one line."""
    if not world.member:
        return
    _replace_work(monkeypatch, ValueError("the verification failed on every rank\nsecond line"))
    small = ["--m", "4", "--k", "4", "--n", "4", "--iters", "1"]
    for argv in (["run"] + small, ["bench"] + small + ["--no-baseline"]):
        _one_line_everywhere(world.comm, capsys, 3, argv,
                             "tpmpi: error: the verification failed on every rank")
    comm = world.comm
    folder = comm.bcast(str(tmp_path_factory.mktemp("rep")) if comm.Get_rank() == 0 else None)
    if comm.Get_rank() == 0:
        with open(f"{folder}/bad.jsonl", "w") as f:
            f.write("not json\n")
    comm.Barrier()
    _one_line_everywhere(comm, capsys, 3, ["report", f"{folder}/bad.jsonl", "--out", folder],
                         "bad.jsonl:1: not JSON")
    _one_line_everywhere(comm, capsys, 2, ["report", f"{folder}/missing.jsonl", "--out",
                                           folder], "missing.jsonl")


@pytest.mark.mpi
@pytest.mark.parametrize("argv,env,match", [
    (["run", "--scheme", "mlp", "--k", "4", "--n", "5"], {}, "--n 5: scheme mlp maps d_model"),
    (["bench", "--scheme", "mlp", "--k", "4", "--n", "4,5"], {}, "--n 5: scheme mlp"),
    (["run"], {"TPMPI_MAX_MESSAGE_BYTES": "abc"}, "TPMPI_MAX_MESSAGE_BYTES='abc'"),
    (["run"], {"TPMPI_THREADS": "two"}, "TPMPI_THREADS='two'"),
    (["info"], {"TPMPI_BACKEND": "foo"}, "TPMPI_BACKEND='foo'"),
    (["plan", "--m", "4", "--k", "4", "--n", "4", "--ranks", "2", "--calibration",
      "/nonexistent/cal.json"], {}, "cal.json")])
def test_setup_errors_are_usage_errors_before_the_work(world, monkeypatch, capsys, argv, env,
                                                       match):
    """What the flags (or environment settings) ask for and this job cannot do exits 2 before
    any work, even when the library finds it (a ValueError in the set-up)."""
    if not world.member:
        return
    _replace_work(monkeypatch, AssertionError("the work started before the set-up was checked"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _one_line_everywhere(world.comm, capsys, 2, argv, match)
