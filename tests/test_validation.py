"""tpmpi/studies/validation.py: the training-step model against the published Megatron-LM
measurements, from the presets alone: mean absolute error <= 10 %, every point within 15 %;
the docs page shows the table the code computes now."""
import pytest

from conftest import ROOT
from tpmpi.studies.validation import load_published, markdown, summary, validate


@pytest.fixture(scope="module")
def checks():
    return validate()


def test_every_published_point_is_predicted(checks):
    data = load_published()
    assert len(checks) == len(data["runs"]) == 20
    assert sum(c.scored for c in checks) == 19  # the 1.2B baseline is 100 % by definition
    assert {c.prediction.cluster for c in checks} == {"dgx-a100-40gb", "dgx-2h"}


def test_mean_error_within_ten_percent(checks):
    mean, _ = summary(checks)
    assert mean <= 0.10


def test_every_point_within_fifteen_percent(checks):
    beyond = {c.label: f"{c.error:+.1%}" for c in checks if c.scored and abs(c.error) > 0.15}
    assert beyond == {}


def test_the_docs_page_shows_the_current_table(checks):
    page = (ROOT / "docs" / "planning.md").read_text()
    assert markdown(checks) in page


def test_a_run_that_does_not_fit_is_an_error():
    data = load_published()
    data = dict(data, runs=[dict(data["runs"][0], model="8.67B")])  # 8.67B on one A100
    with pytest.raises(ValueError, match=r"published run 8.67B tp=1 dp=1: needs"):
        validate(data)


def test_a_cpu_preset_prices_this_machine_s_runs_as_the_cost_model_does(tmp_path):
    """The CPU preset of a calibration file predicts a run record's layer as plan's cost model
    does with that calibration (the same schedule, the same machine), for a plain TP group and
    a dp x tp mesh; the error is against the record's measured median."""
    import json

    from tpmpi.studies.costmodel import load_calibration, predict
    from tpmpi.studies.machine import calibrated_cluster
    from tpmpi.studies.problem import Problem
    from tpmpi.studies.validation import against_runs, runs_markdown

    path = tmp_path / "calib.json"
    path.write_text(json.dumps({
        "machine": {"source": "calibrate", "ranks": 4, "backend": "numpy"},
        "alpha": {"allgather": {"2": 2e-5}, "allreduce": {"2": 1e-5}},
        "beta": {"allgather": {"2": 1e-9}, "allreduce": {"2": 2e-9}},
        "rates": {"numpy:float32": {"thin": 1e10, "small": 5e10, "medium": 1e11,
                                    "large": 1e11}}}))
    runs = [{"scheme": "column", "m": 256, "k": 128, "n": 96, "hidden": None,
             "dtype": "float32", "backward": True, "grid": "1x2", "time_s": {"median": 1e-3}},
            {"scheme": "mlp", "m": 64, "k": 32, "n": 32, "hidden": 128, "dtype": "float32",
             "backward": False, "grid": "1x2", "mesh": {"dp": 2}, "options": {},
             "time_s": {"median": 2e-3}}]
    checks = against_runs(calibrated_cluster(str(path)), runs)
    cal = load_calibration(str(path))
    for rec, check in zip(runs, checks):
        problem = Problem(scheme=rec["scheme"], m=rec["m"], k=rec["k"], n=rec["n"],
                          hidden=rec["hidden"], backward=rec["backward"])
        dp = (rec.get("mesh") or {}).get("dp", 1)
        expected = predict(problem, 2 * dp, (1, 2), cal, dp=dp).time_s
        assert check.predicted == pytest.approx(expected) and expected > 0
        assert check.error == pytest.approx(expected / rec["time_s"]["median"] - 1)
    assert checks[1].label.startswith("mlp 1x2 dp=2 64x32x32 hidden=128 fwd")
    assert "Mean absolute error" in runs_markdown(checks)
