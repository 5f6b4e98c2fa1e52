"""scripts/torch_tp_block.py, the PyTorch DTensor block tpmpi's block is timed against: at TP 1
in this process and at TP 2 in jobs of its own (mpiexec and torchrun), the output, dX and every
gradient match the serial float64 torch block and tests/gpt_reference.py; the check fails on a
naive fused-QKV shard and on a wrong GELU; a fault on one rank ends the job; bad arguments are
refused. Skipped without torch (never a dependency of the package)."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("this torch has no torch.distributed", allow_module_level=True)

from conftest import ROOT, load_script  # noqa: E402
from jobs import job_env, launcher, serial_only  # noqa: E402

block = load_script("torch_tp_block")
SCRIPT = str(ROOT / "scripts" / "torch_tp_block.py")
# uneven everywhere: 3 heads of 8, T = 5, B = 3 (TP 2 needs an even head count: 4 heads of 6)
SMALL = ["--d-model", "24", "--heads", "3", "--seq", "5", "--batch", "3", "--threads", "1",
         "--warmup", "1", "--iters", "2", "--gemm-repeats", "1"]
SMALL_TP2 = ["--d-model", "24", "--heads", "4", "--seq", "5", "--batch", "3", "--warmup", "1",
             "--iters", "2", "--gemm-repeats", "1"]


def run_single(argv):
    return block.main(argv, block.World())


def test_qkv_rows_group_each_ranks_heads():
    assert block.qkv_rows(4, 2, 1).tolist() == list(range(12))
    # d = 4, two heads of 2 rows: rank 0 gets Q0 K0 V0, rank 1 Q1 K1 V1
    assert block.qkv_rows(4, 2, 2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    rows = block.qkv_rows(48, 8, 4)
    assert sorted(rows.tolist()) == list(range(144))


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_tp1_matches_both_references(dtype, tol, attention):
    rec = run_single(SMALL + ["--dtype", dtype, "--check", "--attention", attention])
    assert rec["attention"] == attention
    assert rec["check_ok"] and rec["impl"] == "torch" and rec["launcher"] == "single"
    assert rec["references_rel_err"] <= 1e-12  # torch float64 and NumPy agree with each other
    assert rec["max_rel_err"] <= tol and rec["max_rel_err_reference"] <= tol
    if dtype == "float64":  # TP 1 in float64 is the serial block itself
        assert rec["max_rel_err"] == 0.0


def test_record_flops_and_fractions():
    rec = run_single(SMALL + ["--iters", "3"])
    B, T, d = 3, 5, 24
    assert rec["model_flops"] == 3 * (24 * B * T * d * d + 4 * B * T * T * d)
    assert sum(2 * m * k * n for m, k, n in block.gemm_shapes(B * T, d)) == 72 * B * T * d * d
    t = rec["time_s"]
    assert t["min"] <= t["median"] <= t["max"] and rec["iters"] == 3
    assert rec["gflops"] == pytest.approx(rec["model_flops"] / t["median"] / 1e9)
    for lib in ("torch", "numpy"):
        assert rec["gemm_fraction"][lib] == pytest.approx(
            rec["gflops"] / rec["gemm_gflops"][lib])
    assert rec["max_rel_err"] is None and rec["check_ok"] is None
    assert rec["torch_version"] == torch.__version__ and rec["threads_per_rank"] == 1
    assert run_single(SMALL + ["--iters", "0", "--gemm-repeats", "0"])["time_s"] is None


def test_check_catches_a_wrong_gelu(monkeypatch):
    """The serial torch block shares the module code, so only the independent NumPy reference
    can see an architecture mistake: the tanh GELU passes against torch, fails against it."""
    def tanh_gelu_mlp(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x), approximate="tanh"))

    monkeypatch.setattr(block.MLP, "forward", tanh_gelu_mlp)
    rec = run_single(SMALL + ["--dtype", "float64", "--check", "--iters", "0"])
    assert rec["max_rel_err"] == 0.0 and rec["max_rel_err_reference"] > 1e-6
    assert rec["check_ok"] is False and rec["check_worst"].endswith("vs reference")


@pytest.mark.parametrize("argv, message", [
    (["--heads", "5"], r"--d-model=24: expected a multiple of --heads=5"),
    (["--tp", "2"], r"--tp=2: expected the launched world size 1 \(launcher single\)"),
    (["--seq", "0"], r"--seq=0: expected a positive number"),
    (["--iters", "-1"], r"--iters=-1: expected >= 0"),
])
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        run_single(SMALL + argv)


def test_heads_must_split_evenly_over_ranks():
    with pytest.raises(ValueError, match=r"--heads=3: expected a multiple of the TP size 2"):
        block.main(SMALL, block.World(rank=0, size=2, local_size=2, launcher="mpi"))


# a job of the script's own functions with one of them replaced (the naive shard, a fault)
PATCHED = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("torch_tp_block", {script!r})
m = importlib.util.module_from_spec(spec)
sys.modules["torch_tp_block"] = m
spec.loader.exec_module(m)
world = m.discover()
{patch}
sys.exit(m.cli())
"""
NAIVE = "m.qkv_rows = lambda d, heads, tp: torch.arange(3 * d)"
FAULT = """
good = m.step
def step(block, x, dy):
    if world.rank == 1:
        raise RuntimeError("fault injected on rank 1")
    return good(block, x, dy)
m.step = step
"""


def job(command, timeout=180):
    env = {k: v for k, v in job_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT), check=False)


def mpi_job(*argv, patch=None, timeout=180):
    code = [sys.executable, SCRIPT] if patch is None else [
        sys.executable, "-c", PATCHED.format(script=SCRIPT, patch=patch)]
    return job(launcher() + code + list(argv), timeout)


def record_of(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 only
    return json.loads(lines[0])


def test_tp2_under_mpiexec_matches_both_references(tmp_path):
    serial_only()
    path = tmp_path / "torch.jsonl"
    rec = record_of(mpi_job(*SMALL_TP2, "--dtype", "float64", "--check", "--json", str(path)))
    assert (rec["impl"], rec["tp"], rec["ranks"], rec["launcher"]) == ("dtensor", 2, 2, "mpi")
    assert rec["check_ok"] and rec["max_rel_err"] <= 1e-12
    assert rec["max_rel_err_reference"] <= 1e-12
    assert rec["threads_per_rank"] == max(1, os.cpu_count() // 2)
    assert rec["gemm_threads"] == 2 * rec["threads_per_rank"]
    assert json.loads(path.read_text()) == rec


def test_tp2_check_fails_on_a_naive_fused_qkv_shard():
    """Sharding nanoGPT's blocked [Q | K | V] rows contiguously hands rank 0 only queries: the
    check says so and the script exits 1."""
    serial_only()
    proc = mpi_job(*SMALL_TP2, "--dtype", "float64", "--check", "--iters", "0", patch=NAIVE)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("check failed: ") == 1
    rec = json.loads(proc.stdout.splitlines()[-1])
    assert rec["check_ok"] is False and rec["max_rel_err"] > 0.1


def test_tp2_bad_arguments_exit_2_with_one_message():
    serial_only()
    proc = mpi_job(*SMALL_TP2, "--heads", "3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("--heads=3: expected a multiple of the TP size 2") == 1


def test_a_fault_on_one_rank_ends_the_job():
    serial_only()
    proc = mpi_job(*SMALL_TP2, patch=FAULT, timeout=60)
    assert proc.returncode != 0 and "fault injected on rank 1" in proc.stderr


def test_tp2_under_torchrun_float32():
    serial_only()
    proc = job([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                SCRIPT, *SMALL_TP2, "--check", "--threads", "1", "--attention", "explicit"])
    rec = record_of(proc)
    assert (rec["impl"], rec["tp"], rec["launcher"], rec["dtype"], rec["attention"]) == (
        "dtensor", 2, "torchrun", "float32", "explicit")
    assert rec["check_ok"] and rec["max_rel_err"] <= 1e-5
