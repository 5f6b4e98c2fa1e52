"""slurm/hybrid.sbatch run by bash with a fake ``srun`` that logs its command lines: the mesh
it derives from the allocation (TP = ranks per node, DP = nodes), block distribution, and
the refusal of a TP size that does not divide the ranks."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_template(tmp_path, **env):
    log = tmp_path / "srun.log"
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    slurm = {"SLURM_SUBMIT_DIR": str(ROOT), "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "tpmpi-hybrid",
             "RESULTS": str(tmp_path / "results"), "VENV": str(tmp_path / "no-venv")}
    full = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", **slurm, **env)
    done = subprocess.run(["bash", str(ROOT / "slurm" / "hybrid.sbatch")], env=full,
                          capture_output=True, text=True, timeout=60)
    return done, (log.read_text().splitlines() if log.exists() else [])


def test_tp_inside_nodes_dp_across(tmp_path):
    done, lines = run_template(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dp 2 x tp 4" in done.stdout
    assert len(lines) == 3 and all("--distribution=block:block" in line for line in lines)
    assert "scripts/train_mlp.py --dp 2 --tp 4 --backend numpy --measure-overlap" in lines[1]
    assert "--dp 1,2" in lines[2] and "--mode megatron,sequence" in lines[2]
    assert "--k 2048 --n 2048 --hidden 8192" in lines[2]


def test_sequence_parallel_and_smaller_tp(tmp_path):
    done, lines = run_template(tmp_path, TP="2", SP="1")
    assert done.returncode == 0, done.stderr
    assert "--dp 4 --tp 2 --sequence-parallel" in lines[1] and "--dp 1,4" in lines[2]


@pytest.mark.parametrize("tp", ["3", "16"])
def test_tp_must_divide_the_ranks(tmp_path, tp):
    done, lines = run_template(tmp_path, TP=tp)
    assert done.returncode == 2 and f"TP={tp} does not divide the 8 ranks" in done.stderr
    assert lines == []  # refused before any srun
