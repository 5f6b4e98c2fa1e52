"""Cost model: formulas, fitting, calibration files, plan (serial)."""
import json

import pytest

from tpmpi.costmodel import (Calibration, bw_factor, fit_alpha_beta, gemm_class, lat_factor,
                             load_calibration, plan, predict, square_grid)
from tpmpi.schemes import Problem


def test_ring_factors_match_algorithms_md():
    assert lat_factor("allgather", 4) == 3 and bw_factor("allgather", 4) == 0.75
    assert lat_factor("allreduce", 4) == 6 and bw_factor("allreduce", 4) == 1.5
    assert lat_factor("bcast", 8) == 3
    assert lat_factor("allreduce", 1) == 0 == bw_factor("allreduce", 1)


def test_fit_recovers_alpha_beta():
    alpha, beta = 3e-6, 2e-10
    sizes = [2 ** i for i in range(3, 24, 2)]
    times = [lat_factor("allgather", 4) * alpha + bw_factor("allgather", 4) * s * beta
             for s in sizes]
    a, b = fit_alpha_beta("allgather", 4, sizes, times)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)


def test_fit_is_non_negative():
    a, b = fit_alpha_beta("allreduce", 2, [8, 16, 32], [3e-6, 2e-6, 1e-6])
    assert a >= 0 and b >= 0


def test_collective_uses_nearest_fitted_size():
    cal = Calibration(alpha={"allgather": {"2": 1e-6, "8": 9e-6}},
                      beta={"allgather": {"2": 0.0, "8": 0.0}})
    assert cal.collective("allgather", 3, 100) == pytest.approx(2 * 1e-6)
    assert cal.collective("allgather", 7, 100) == pytest.approx(6 * 9e-6)
    assert cal.collective("allgather", 1, 1e9) == 0.0


@pytest.mark.parametrize("scheme", ["column", "row", "mlp", "tile2d"])
@pytest.mark.parametrize("backward", [False, True])
def test_predict_every_scheme(scheme, backward):
    prob = Problem(scheme=scheme, m=512, k=1024, n=1024, hidden=2048, backward=backward)
    pred = predict(prob, 4)
    assert pred.time_s == pytest.approx(pred.compute_s + pred.comm_s)
    assert pred.compute_s > 0 and pred.comm_s > 0 and pred.bytes_per_rank > 0
    assert pred.mem_bytes > 0
    one = predict(prob, 1)
    assert one.comm_s == 0 and one.bytes_per_rank == 0
    assert one.compute_s > pred.compute_s


def test_predict_unknown_scheme_is_none():
    assert predict(Problem(scheme="nope"), 2) is None


def test_tile2d_panel_bounds_memory_and_column_bytes():
    base = Problem(scheme="tile2d", m=1024, k=4096, n=1024)
    gather = predict(base, 4, (2, 2))
    panel = predict(Problem(scheme="tile2d", m=1024, k=4096, n=1024,
                            options=(("panel", 256),)), 4, (2, 2))
    assert panel.mem_bytes < gather.mem_bytes
    col = predict(Problem(scheme="column", m=1024, k=4096, n=1024), 4)
    assert col.bytes_per_rank == pytest.approx(0.75 * 1024 * 1024 * 4)  # (P-1)/P M N b


def test_chunks_hide_communication():
    cal = Calibration(alpha={"allgather": {"4": 0.0}}, beta={"allgather": {"4": 1e-9}})
    one = predict(Problem(scheme="column", m=4096, k=4096, n=4096), 4, calibration=cal)
    four = predict(Problem(scheme="column", m=4096, k=4096, n=4096,
                           options=(("chunks", 4),)), 4, calibration=cal)
    assert four.comm_s < one.comm_s


def test_plan_ranks_by_time_and_covers_layouts():
    preds = plan(256, 1024, 1024, 4)
    times = [p.time_s for p in preds]
    assert times == sorted(times)
    labels = {p.label for p in preds}
    assert {"column 1x4", "row 1x4", "tile2d 2x2"} <= labels
    assert any("panel=" in lbl for lbl in labels) and any("chunks=" in lbl for lbl in labels)
    ffn = plan(256, 1024, 1024, 4, hidden=4096)
    assert {p.scheme for p in ffn} == {"mlp"}


def test_calibration_roundtrip_and_env(tmp_path, monkeypatch):
    cal = Calibration(alpha={"allreduce": {"2": 1e-6}}, beta={"allreduce": {"2": 1e-10}},
                      machine={"ranks": 2})
    cal.rates["numpy:float32"]["large"] = 1e11
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cal.to_json()))
    back = load_calibration(str(path))
    assert back.collective("allreduce", 2, 1e6) == cal.collective("allreduce", 2, 1e6)
    assert back.gemm(2048, 2048, 2048, "float32") == pytest.approx(2 * 2048 ** 3 / 1e11)
    monkeypatch.setenv("TPMPI_CALIBRATION", str(path))
    assert load_calibration().machine == {"ranks": 2}
    monkeypatch.delenv("TPMPI_CALIBRATION")
    assert load_calibration().machine["source"] == "defaults"
    with pytest.raises(ValueError, match="calibration"):
        load_calibration(str(tmp_path / "missing.json"))


def test_helpers():
    assert gemm_class(8, 4096, 4096) == "thin"
    assert gemm_class(2048, 2048, 2048) == "large"
    assert square_grid(8) == (2, 4) and square_grid(7) == (1, 7)
