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
