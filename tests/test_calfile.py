"""tpmpi.studies.calfile: a calibration file is checked field by field, the file and the field
named ([] on one rank used to end in AttributeError and MPI_Abort, a non-numeric field in "could
not convert string to float", {} was taken for a calibration)."""
import copy
import json

import pytest

from tpmpi.studies.costmodel import CLASS_SHAPES, Calibration, load_calibration

GOOD = {"machine": {"source": "calibrate", "ranks": 2, "backend": "numpy"},
        "alpha": {"allgather": {"2": 1.6e-5}, "allreduce": {"2": 9e-6, "4": 1.1e-5}},
        "beta": {"allgather": {"2": 2e-10}, "allreduce": {"2": 1e-10, "4": 1.2e-10}},
        "rates": {"numpy:float32": dict.fromkeys(CLASS_SHAPES, 1e10)},
        "staging": {"d2h": 2e10, "h2d": 2e10}}


def _edited(edit):
    """GOOD changed in place by ``edit``, or ``edit`` itself when it is no function."""
    if not callable(edit):
        return edit
    data = copy.deepcopy(GOOD)
    edit(data)
    return data


@pytest.mark.parametrize("edit, says", [
    ([], "holds a JSON list: expected an object with machine, alpha, beta and rates"),
    ({}, "field 'machine' is missing: expected an object"),
    (lambda d: d.pop("rates"), "field 'rates' is missing"),
    (lambda d: d["alpha"]["allgather"].update({"2": "0.1x"}),
     ("field 'alpha.allgather.2' is '0.1x': expected ranks P (a positive integer) mapped to "
      "seconds >= 0")),
    (lambda d: d["beta"]["allreduce"].update({"4": -1.0}), "field 'beta.allreduce.4' is -1.0"),
    (lambda d: d["alpha"]["allgather"].update({"²": 1e-6}), "field 'alpha.allgather.²' is"),
    (lambda d: d["alpha"].update(gather={"2": 1e-6}),
     "field 'alpha.gather': expected a collective, one of allgather"),
    (lambda d: d["alpha"].update(allgather=[1e-6]), "field 'alpha.allgather' is [1e-06]"),
    (lambda d: d["rates"]["numpy:float32"].update(large=0),
     "field 'rates.numpy:float32.large' is 0: expected one of thin, small, medium, large"),
    (lambda d: d["rates"].update(numpy={"large": 1e9}),
     "field 'rates.numpy': expected 'backend:dtype'"),
    (lambda d: d["rates"]["numpy:float32"].update(large=float("inf")), "is inf"),
    (lambda d: d["rates"]["numpy:float32"].update(large=True), "is True"),
    (lambda d: d.update(staging={"d2h": "fast"}), "field 'staging' is {'d2h': 'fast'}"),
])
def test_each_bad_field_is_named_with_the_file(tmp_path, edit, says):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_edited(edit)))
    with pytest.raises(ValueError) as info:
        load_calibration(str(path))
    assert str(info.value).startswith(f"calibration {str(path)!r}") and says in str(info.value)


def test_a_good_file_loads_and_unreadable_ones_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(GOOD))
    cal = load_calibration(str(path))
    assert cal.alpha == GOOD["alpha"] and cal.rates["numpy:float32"]["thin"] == 1e10
    assert cal.rates["numpy:float64"]  # the defaults fill in what was not measured
    path.write_text('{"alpha": ')
    with pytest.raises(ValueError, match=r"c.json': not JSON \(Expecting value: line 1 column"):
        load_calibration(str(path))
    with pytest.raises(ValueError, match=r"nope.json': No such file or directory$"):
        load_calibration(str(tmp_path / "nope.json"))
    assert Calibration.from_json(_edited(lambda d: d.pop("staging"))).staging["d2h"] > 0
