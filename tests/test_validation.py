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
