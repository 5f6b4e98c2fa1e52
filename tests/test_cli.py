"""The CLI in-process on sub-communicators: run's record and --check, bench's sweeps and
collective mode, calibrate, plan, info, usage errors (exit 2) and runtime errors (exit 3) on
every rank."""
import json
import re

import pytest

from conftest import read_records
from tpmpi.cli import main

CONTRACT = {"scheme", "ranks", "grid", "m", "k", "n", "hidden", "dtype", "backend", "gpu_aware",
            "threads_per_rank", "warmup", "iters", "time_s", "gemm_s", "comm_s", "gflops",
            "algbw_gbs", "busbw_gbs", "mem_peak_bytes", "max_rel_err", "predicted_s",
            "mpi_library", "blas", "version", "timestamp"}


@pytest.mark.mpi
def test_run_writes_contract_record(world, shared_tmp):
    comm = world.comm
    path = str(shared_tmp / "r.jsonl")
    argv = ["run", "--m", "7", "--k", "5", "--n", "6", "--dtype", "float64", "--backward",
            "--iters", "2", "--warmup", "1", "--check", "--json", path, "--baseline"]
    assert main(argv, comm) == 0
    comm.Barrier()
    if comm.Get_rank() == 0:
        (rec,) = read_records(path)
        assert rec.keys() >= CONTRACT
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
    codes = world.comm.allgather(main(argv, world.comm))
    assert codes == [2] * world.size


@pytest.mark.mpi
@pytest.mark.world_sizes(2, 3, 4)
def test_inconsistent_flags_across_ranks_exit_2(world):
    rank = world.comm.Get_rank()
    argv = ["run", "--m", str(4 + rank), "--k", "3", "--n", "3", "--iters", "1"]
    assert world.comm.allgather(main(argv, world.comm)) == [2] * world.size


@pytest.mark.mpi
def test_info(world, capsys):
    assert main(["info"], world.comm) == 0


def _replace_work(monkeypatch, error: Exception) -> None:
    """The CLI's work (run_case, run_sweep) raises ``error`` instead."""
    from tpmpi.cli import commands

    def work(*args, **kwargs):
        raise error

    monkeypatch.setattr(commands, "run_case", work)
    monkeypatch.setattr(commands, "run_sweep", work)


def _one_line_everywhere(comm, capsys, code, argv, match):
    """main(argv) returns ``code`` on every rank; rank 0 alone prints one matching line."""
    assert comm.allgather(main(argv, comm)) == [code] * comm.Get_size(), argv
    err = capsys.readouterr().err
    if comm.Get_rank() == 0:
        assert len(err.splitlines()) == 1 and match in err, err
    else:
        assert err == ""


@pytest.mark.mpi
def test_runtime_errors_exit_3_on_every_rank(world, monkeypatch, capsys, shared_tmp):
    """An error of the work itself (tpmpi raises it on every rank together) is not a usage
    error: exit 3, one line."""
    _replace_work(monkeypatch, ValueError("the verification failed on every rank\nsecond line"))
    small = ["--m", "4", "--k", "4", "--n", "4", "--iters", "1"]
    for argv in (["run"] + small, ["bench"] + small + ["--no-baseline"]):
        _one_line_everywhere(world.comm, capsys, 3, argv,
                             "tpmpi: error: the verification failed on every rank")
    comm = world.comm
    folder = str(shared_tmp)
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
    _replace_work(monkeypatch, AssertionError("the work started before the set-up was checked"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _one_line_everywhere(world.comm, capsys, 2, argv, match)


# --------------------------------------------------------------------------- bench, calibrate, plan


@pytest.mark.mpi
def test_bench_strong_sweep_records(world, shared_tmp):
    path = str(shared_tmp / "s.jsonl")
    ranks = ",".join(str(p) for p in sorted({1, world.size}))
    code = main(["bench", "--m", "8", "--k", "16", "--n", "12", "--iters", "2", "--warmup", "1",
                 "--ranks", ranks, "--json", path], comm=world.comm)
    assert code == 0
    if world.comm.Get_rank() == 0:
        recs = read_records(path)
        assert sorted(r["ranks"] for r in recs) == sorted({1, world.size})
        for r in recs:
            assert r["max_rel_err"] <= r["tolerance"]
            assert r["predicted_s"] > 0 and r["baseline_s"] > 0 and r["efficiency"] > 0
            assert r["sweep"] == {"kind": "strong", "dim": "m"}
    world.comm.Barrier()


@pytest.mark.mpi
def test_bench_collective_mode_verifies(world, shared_tmp, capsys):
    path = str(shared_tmp / "c.jsonl")
    code = main(["bench", "--collective", "allgather,allreduce,reduce_scatter,bcast",
                 "-b", "8", "-e", "4K", "-f", "8", "--iters", "2", "--json", path],
                comm=world.comm)
    assert code == 0
    if world.comm.Get_rank() == 0:
        recs = read_records(path)
        assert len(recs) == 4 * 4  # 8, 64, 512, 4096 bytes
        assert all(r["wrong"] == 0 and r["ranks"] == world.size for r in recs)
        out = capsys.readouterr().out
        assert "algbw" in out and "busbw" in out and "#wrong" in out
    world.comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [
    ["bench", "--ranks", "99"],
    ["bench", "--sweep", "sizes"],
    ["bench", "--collective", "allgather"],
    ["bench", "--scheme", "bogus"],
    ["bench", "--grid", "7x7", "--ranks", "1"],
    ["bench", "-b", "8"],
])
def test_bench_usage_errors_exit_2_everywhere(world, argv):
    codes = world.comm.allgather(main(argv, comm=world.comm))
    assert codes == [2] * world.size


@pytest.mark.mpi
def test_calibrate_writes_fits(world, shared_tmp, monkeypatch):
    from tpmpi.studies import localbench

    monkeypatch.setattr(localbench, "GRID_DIMS", {"cpu": (16, 64), "gpu": (16, 64)})
    monkeypatch.setattr(localbench, "POINTWISE_SIZES", (4096, 65536))
    path = str(shared_tmp / "c.json")
    assert main(["calibrate", "--json", path, "-b", "64", "-e", "4K", "--iters", "2",
                 "--dtype", "float32"], comm=world.comm) == 0
    if world.comm.Get_rank() == 0:
        with open(path) as fh:
            data = json.load(fh)
        assert data["machine"]["ranks"] == world.size and "blas" in data["machine"]
        assert set(data["rates"]["numpy:float32"]) == {"thin", "small", "medium", "large"}
        assert data["local"]["numpy:float32"]["gemm"]["dims"] == [16, 64]
        assert data["machine"]["ranks_per_node"] == world.size
        if world.size > 1:
            assert str(world.size) in data["alpha"]["allgather"]
            assert data["beta"]["allreduce"][str(world.size)] >= 0
    world.comm.Barrier()
    # what calibrate writes, the cost model reads (every fitted name, the exchange paths too)
    assert main(["plan", "--m", "64", "--k", "256", "--n", "256", "--ranks", "4",
                 "--calibration", path], comm=world.comm) == 0


def test_every_fitted_name_passes_the_calibration_check():
    from tpmpi.studies.costmodel import CLASS_SHAPES, DEFAULT_STAGING, fitted_names

    from tpmpi.studies.calfile import check_calibration
    names = fitted_names()
    assert "allreduce.exchange" in names and "allgather" in names
    data = {"machine": {}, "alpha": {n: {"2": 1e-6} for n in names},
            "beta": {n: {"2": 1e-9} for n in names}, "rates": {}}
    check_calibration(data, "c.json", classes=tuple(CLASS_SHAPES),
                      staging=tuple(DEFAULT_STAGING), collectives=names)


def test_plan_prints_ranked_layouts(capsys):
    from mpi4py import MPI

    assert main(["plan", "--m", "64", "--k", "256", "--n", "256", "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.Get_rank():
        return  # printed on rank 0
    assert out.splitlines()[0].split()[:2] == ["order", "layout"]
    assert "tile2d 2x2" in out and "column 1x4" in out


GPT = ["plan", "--cluster", "dgx-a100", "--model",
       "layers=42,hidden=4096,heads=32,seq=1024,vocab=51200", "--micro-batch", "8",
       "--global-batch", "512", "--recompute", "selective"]


def test_plan_cluster_ranks_configurations_and_explains_the_first(tmp_path, capsys):
    """The ranking over --tp 1,2,4,8 --dp 1-64 at 64 GPUs: the table, why the first
    wins and the runner-up, the refused ones with their reason, the first term by term, and one
    JSON record per configuration with the contract fields."""
    from mpi4py import MPI

    path = tmp_path / "plan.jsonl"
    argv = GPT + ["--tp", "1,2,4,8", "--dp", "1-64", "--gpus", "64", "--json", str(path)]
    assert main(argv, MPI.COMM_SELF) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["order", "config", "gpus"]
    assert re.search(r"why tp=\d dp=\d+ recompute=selective first: .* runner-up tp=\d dp=\d+ ",
                     out)
    assert "refused, e.g. tp=1 dp=64 recompute=selective: needs" in out
    assert "DP gradient all-reduce" in out and "memory per GPU" in out
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 4 and [r["order"] for r in recs] == [1, 2, 3, 4]
    for key in ("layer_fwd_s", "layer_bwd_s", "iteration_s", "tflops_per_gpu", "mfu",
                "mem_per_gpu_bytes"):
        assert key in recs[0] and recs[0][key] > 0
    assert all(r["tp"] * r["dp"] == 64 for r in recs)
    assert recs[-1]["refused"].startswith("needs ")


def test_plan_cluster_one_configuration_and_a_refusal(capsys):
    """One tp x dp prints its breakdown alone; when nothing fits, the reason and exit 1."""
    from mpi4py import MPI

    assert main(GPT + ["--tp", "8", "--dp", "8"], MPI.COMM_SELF) == 0
    out = capsys.readouterr().out
    assert out.startswith("dgx-a100: GPT layers=42") and "order" not in out
    assert main(GPT + ["--tp", "1", "--dp", "1", "--global-batch", "8"], MPI.COMM_SELF) == 1
    assert "refused: needs" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "says"), [
    (["--tp", "8"], r"plan --cluster: --dp required"),
    (["--tp", "8", "--dp", "2", "--m", "4"], r"--m belongs to the other form of plan"),
    (["--tp", "0-2", "--dp", "1"], r"tp='0-2': '0-2': expected 1 <= N <= M"),
    (["--tp", "8", "--dp", "1", "--cluster", "dgx-9"], r"--cluster: cluster='dgx-9': expected"),
    (["--tp", "8", "--dp", "1", "--dtype", "bfloat16", "--cluster", "dgx-2h"],
     r"dtype='bfloat16': the V100-SXM3-32GB has no bfloat16 rate"),
])
def test_plan_cluster_usage_errors_name_the_flag(extra, says, capsys):
    from mpi4py import MPI

    assert main(GPT + extra, MPI.COMM_SELF) == 2
    err = capsys.readouterr().err
    assert re.search(says, err) and len(err.strip().splitlines()) == 1, err


def test_plan_cluster_takes_a_calibration_file(tmp_path, capsys):
    """A calibrate file is a CPU cluster: the plan runs on its rates (float32 by default)."""
    from mpi4py import MPI

    cal = tmp_path / "calib.json"
    cal.write_text(json.dumps({
        "machine": {"source": "calibrate", "ranks": 4, "backend": "numpy"},
        "alpha": {"allreduce": {"2": 1e-5}}, "beta": {"allreduce": {"2": 1e-9}},
        "rates": {"numpy:float32": {"thin": 1e10, "small": 5e10, "medium": 1e11,
                                    "large": 1e11}}}))
    argv = ["plan", "--cluster", str(cal), "--model",
            "layers=2,hidden=64,heads=4,seq=32,vocab=100", "--micro-batch", "2",
            "--global-batch", "8", "--tp", "1,2,4", "--dp", "1-4", "--gpus", "4"]
    assert main(argv, MPI.COMM_SELF) == 0
    out = capsys.readouterr().out
    assert f"calibrated:{cal}: GPT layers=2" in out and "float32" in out
