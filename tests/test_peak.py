"""tpmpi.studies.peak: the measured GEMM peak, a record's local GEMM throughput as a fraction of
it, and the command line that prints both as JSON lines."""
import json

import pytest

from tpmpi.core.backend import get_backend
from tpmpi.studies import peak
from tpmpi.studies.peak import gemm_fraction, gemm_peak


def test_gemm_peak_and_fraction():
    rate = gemm_peak(get_backend("numpy"), 64, "float32", warmup=1, iters=2)
    assert rate > 0
    rec = {"gflops": 8.0, "time_s": {"median": 0.5}, "ranks": 4, "gemm_s": 0.25}
    # 4 GFLOP in all, 1 GFLOP per rank in 0.25 s of GEMM = 4 GFLOP/s = 40 % of 10 GFLOP/s
    assert gemm_fraction(rec, 10.0) == pytest.approx(0.4)
    assert gemm_fraction({**rec, "gemm_s": 0.0}, 10.0) is None
    assert gemm_fraction({**rec, "gflops": None}, 10.0) is None
    assert gemm_fraction(rec, 0.0) is None


def test_gemm_peak_is_the_best_product(monkeypatch):
    """2 n^3 flops over the fastest of the timed products."""
    import numpy as np

    monkeypatch.setattr(peak, "time_calls", lambda calls, **kw: np.array([[0.5, 0.25, 1.0]]))
    assert gemm_peak(get_backend("numpy"), 100, "float64") == pytest.approx(2e6 / 0.25 / 1e9)


def test_command_line_rates_the_matching_records(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(peak, "gemm_peak", lambda backend, n, dtype, iters: 10.0)
    base = {"scheme": "column", "ranks": 4, "grid": "1x4", "m": 8, "k": 8, "n": 8,
            "backend": "numpy", "gflops": 8.0, "time_s": {"median": 0.5}, "gemm_s": 0.25}
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {**base, "dtype": "float32"}, {**base, "dtype": "float64"},
        {**base, "dtype": "float32", "backend": "cupy"})) + "\n\n")
    assert peak.main(["--backend", "numpy", "--n", "64", "--records", str(path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["peak_gflops"] == 10.0 and lines[0]["n"] == 64
    assert (lines[0]["dtype"], lines[0]["backend"]) == ("float32", "numpy")
    assert len(lines) == 2  # only the float32 NumPy record is rated
    assert lines[1]["gemm_fraction_of_peak"] == pytest.approx(0.4)
    assert lines[1]["scheme"] == "column" and lines[1]["gemm_s"] == 0.25
