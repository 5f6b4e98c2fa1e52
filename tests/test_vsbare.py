"""The layer-vs-bare-products table of scripts/gpu_check.sh, run on CPUs first (NumPy, and the
CuPy code path on a NumPy-made CuPy with host staging)."""
from __future__ import annotations

import gc
import json
import warnings

import pytest
from mpi4py import MPI

import fake_cupy
from conftest import read_records
from tpmpi.studies import vsbare

SMALL = ["--m", "40", "--k", "24", "--n", "16", "--warmup", "0", "--iters", "2"]


def _run(world, shared_tmp, extra):
    path = str(shared_tmp / "vs.jsonl")
    assert vsbare.main(SMALL + ["--json", path] + extra, comm=world.comm) == 0
    world.comm.Barrier()
    return read_records(path)


@pytest.mark.mpi
def test_every_scheme_against_its_bare_products(world, shared_tmp, capsys):
    records = _run(world, shared_tmp, ["--backend", "numpy", "--dtypes", "float32,float64"])
    assert [(r["scheme"], r["dtype"]) for r in records] == [
        (s, d) for d in ("float32", "float64") for s in vsbare.LINEAR]
    for r in records:
        assert r["ranks"] == world.size and not r["staged"] and not r["gpu_aware"]
        assert r["grid"] == ("2x2" if r["scheme"] == "tile2d" and world.size == 4
                             else f"1x{world.size}")
        assert r["n"] == (r["k"] if r["scheme"] == "mlp" else 16)
        for phase in vsbare.PHASES:
            assert r[f"{phase}_s"] > 0 and r[f"bare_{phase}_s"] > 0 and r[f"pred_{phase}_s"] > 0
            assert r[f"ratio_{phase}"] == pytest.approx(r[f"bare_{phase}_s"] / r[f"{phase}_s"])
            assert 0 < r[f"{phase}_best_s"] <= r[f"{phase}_s"]
            assert r[f"ratio_{phase}_best"] == pytest.approx(
                r[f"bare_{phase}_best_s"] / r[f"{phase}_best_s"])
            assert r[f"err_{phase}"] == pytest.approx(r[f"pred_{phase}_s"] / r[f"{phase}_s"] - 1)
    if world.comm.Get_rank() == 0:
        out = capsys.readouterr().out
        assert "| scheme | dtype | P=" in out and out.count("fwd ") >= 8


@pytest.mark.mpi
def test_the_block_against_the_bare_block(world, shared_tmp):
    """The block (nanoGPT's in plain NumPy on one process) at every P, with a prediction."""
    (rec,) = _run(world, shared_tmp, ["--backend", "numpy", "--dtypes", "float32", "--schemes",
                                      "block", "--m", "12", "--seq", "6", "--k", "8",
                                      "--heads", "2"])
    assert rec["scheme"] == "block" and rec["ranks"] == world.size and rec["k"] == rec["n"] == 8
    for phase in vsbare.PHASES:
        assert rec[f"bare_{phase}_s"] > 0 and rec[f"pred_{phase}_s"] > 0
        assert rec[f"ratio_{phase}"] == pytest.approx(rec[f"bare_{phase}_s"] / rec[f"{phase}_s"])


@pytest.mark.mpi
def test_gpu_code_path_with_staging(world, shared_tmp, monkeypatch):
    """backend "cupy" on the fake CuPy (every rank on one device, no GPU-aware MPI): staged
    collectives and the ranks sharing the device go into the prediction."""
    fake_cupy.install(monkeypatch)
    monkeypatch.setenv("TPMPI_GPU_AWARE", "0")
    records = _run(world, shared_tmp, ["--backend", "cupy", "--dtypes", "float32,float16",
                                     "--schemes", "column,tile2d", "--clock", "cpu"])
    assert len(records) == 4
    for r in records:
        assert r["backend"] == "cupy" and r["device"] == "Fake GPU" and r["clock"] == "cpu"
        assert r["staged"] and r["oversubscription"] == world.size


def test_table_sets_ranks_side_by_side():
    def rec(p, scheme="column", dtype="float16", **more):
        return {"scheme": scheme, "dtype": dtype, "ranks": p, "ratio_fwd": 1.0 / p,
                "ratio_fwdbwd": 0.5 / p, "fwdbwd_s": 0.01 * p, "pred_fwdbwd_s": 0.012 * p,
                "bare_fwdbwd_s": 0.004, **more}
    table = vsbare.format_table([rec(1, torch_fwdbwd_s=0.003), rec(2), rec(1, "row")])
    lines = table.splitlines()
    assert lines[0] == ("| scheme | dtype | P=1 fwd | P=1 fwd+bwd | P=1 fwd+bwd ms (pred) | "
                        "P=2 fwd | P=2 fwd+bwd | P=2 fwd+bwd ms (pred) | torch/bare fwd+bwd |")
    assert lines[2] == ("| column | float16 | 1.00 | 0.50 | 10.0 (12.0) | 0.50 | 0.25 | "
                        "20.0 (24.0) | 0.75 |")
    assert lines[3] == "| row | float16 | 1.00 | 0.50 | 10.0 (12.0) | - | - | - | - |"
    best = vsbare.format_table([rec(1, ratio_fwd_best=0.9, ratio_fwdbwd_best=0.8,
                                    fwdbwd_best_s=0.005)], best=True)
    assert best.splitlines()[2] == "| column | float16 | 0.90 | 0.80 | 5.0 (12.0) | - |"
    error = {"scheme": "tile2d", "dtype": "bfloat16", "ranks": 2, "error": "boom"}
    assert "| tile2d | bfloat16 | error | error | error |" in vsbare.format_table([error])
    assert vsbare.format_line(error) == "tile2d  bfloat16  P=2: ERROR boom"


def test_table_reads_the_files_and_closes_them(tmp_path, capsys):
    """``--table FILE...``: every record of the JSON-lines files (blank lines skipped), no MPI
    job; each file is closed after reading (no ResourceWarning)."""
    recs = [{"scheme": s, "dtype": "float32", "ranks": 2, "ratio_fwd": 0.5, "ratio_fwdbwd": 0.4,
             "fwdbwd_s": 0.01, "pred_fwdbwd_s": 0.02, "bare_fwdbwd_s": 0.004}
            for s in ("column", "row")]
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    paths[0].write_text(json.dumps(recs[0]) + "\n\n")
    paths[1].write_text(json.dumps(recs[1]) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert vsbare.main(["--table"] + [str(p) for p in paths], MPI.COMM_SELF) == 0
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert capsys.readouterr().out == vsbare.format_table(recs) + "\n"
