"""tpmpi.studies.localcurves: the measured curves of local work -- products interpolated on the
grid of shapes (exact at its points, the rate log-linear between them, the nearest grid rate
outside), element-wise steps at the seconds per byte of their size, one overhead per step; the
calibration file's ``local`` field checked field by field; old files without it still read."""
import json
import math
import re

import pytest

from tpmpi.studies.costmodel import CalibratedMachine, Calibration
from tpmpi.studies.localcurves import LocalCurves, curves_from_json
from tpmpi.core.schedule import Pointwise, Product

DIMS = (16, 64, 256)


def rate_of(m, k, n):
    """A made-up rate that grows with every dimension (flop/s)."""
    return 1e9 * math.log2(m) * math.log2(k) * math.log2(n)


def curves(overhead=2e-6):
    grid = [[[2.0 * m * k * n / rate_of(m, k, n) for n in DIMS] for k in DIMS] for m in DIMS]
    return LocalCurves(overhead, DIMS, tuple(grid), (1e4, 1e6, 1e8), (1e-10, 2e-10, 5e-10))


def test_products_are_exact_on_the_grid_and_log_linear_between():
    c = curves(overhead=0.0)
    for m in DIMS:
        for n in DIMS:
            assert c.rate(m, 64, n) == pytest.approx(rate_of(m, 64, n))
    # halfway in log space between 16 and 64 on m: the geometric mean of the two rates
    mid = c.rate(32, 64, 64)
    assert mid == pytest.approx(math.sqrt(rate_of(16, 64, 64) * rate_of(64, 64, 64)))
    assert c.product_s(32, 64, 64, batch=3) == pytest.approx(3 * 2 * 32 * 64 * 64 / mid)


def test_outside_the_grid_the_nearest_rate_applies():
    c = curves(overhead=0.0)
    assert c.rate(4096, 256, 256) == pytest.approx(rate_of(256, 256, 256))
    assert c.rate(2, 16, 16) == pytest.approx(rate_of(16, 16, 16))
    assert c.product_s(4096, 256, 256) == pytest.approx(2 * 4096 * 256**2 / rate_of(256, 256,
                                                                                     256))


def test_each_step_pays_the_overhead_and_empty_steps_nothing():
    c = curves(overhead=5e-6)
    assert c.product_s(16, 16, 16) == pytest.approx(5e-6 + 2 * 16**3 / rate_of(16, 16, 16))
    assert c.product_s(0, 16, 16) == 0.0 and c.product_s(16, 16, 16, batch=0) == 0.0
    assert c.pointwise_s(1e6) == pytest.approx(5e-6 + 1e6 * 2e-10)
    assert c.pointwise_s(0) == 0.0


def test_element_wise_seconds_per_byte_interpolate_in_log_size_and_clamp():
    c = curves(overhead=0.0)
    assert c.seconds_per_byte(1e5) == pytest.approx(1.5e-10)
    assert c.seconds_per_byte(10) == pytest.approx(1e-10)
    assert c.seconds_per_byte(1e12) == pytest.approx(5e-10)
    sizes = [2**i for i in range(10, 30)]
    times = [c.pointwise_s(s) for s in sizes]
    assert times == sorted(times)  # more bytes never take less time


def test_the_json_round_trips_and_the_machine_prices_with_it():
    c = curves()
    again = LocalCurves.from_json(json.loads(json.dumps(c.to_json())), "cal")
    assert again == c
    cal = Calibration(machine={"source": "calibrate"}, local={"numpy:float32": c})
    read = Calibration.from_json(json.loads(json.dumps(cal.to_json())), "cal")
    assert read.local == {"numpy:float32": c}
    machine = CalibratedMachine(read, "numpy", oversubscription=2.0)
    step = Product("y", 64, 64, 64, "float32", 3)
    assert machine.product_s(step) == pytest.approx(2 * c.product_s(64, 64, 64, 3))
    assert machine.pointwise_s(Pointwise("ln", 4096, "float64")) == pytest.approx(
        2 * c.pointwise_s(4096))  # another dtype of the backend: its float32 curves


def test_a_calibration_without_curves_prices_at_its_class_rates():
    cal = Calibration.from_json({"machine": {"source": "calibrate"}, "alpha": {}, "beta": {},
                                 "rates": {}}, "old")
    assert cal.local == {} and cal.curves("float32") is None
    machine = CalibratedMachine(cal)
    step = Product("y", 256, 256, 256, "float32")
    assert machine.product_s(step) == pytest.approx(cal.gemm(256, 256, 256, "float32"))


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("overhead_s"), "overhead_s"),
    (lambda d: d.__setitem__("overhead_s", -1), "overhead_s"),
    (lambda d: d["gemm"].__setitem__("dims", [64, 16, 256]), "gemm.dims"),
    (lambda d: d["gemm"]["seconds"].pop(), "gemm.seconds"),
    (lambda d: d["gemm"]["seconds"][0][0].__setitem__(0, 0.0), "gemm.seconds"),
    (lambda d: d["pointwise"].__setitem__("bytes", []), "pointwise.bytes"),
    (lambda d: d["pointwise"]["seconds_per_byte"].pop(), "pointwise.seconds_per_byte"),
])
def test_a_bad_field_is_named(edit, field):
    data = json.loads(json.dumps(curves().to_json()))
    edit(data)
    where = re.escape(f"cal: local.numpy:float32: field '{field}'")
    with pytest.raises(ValueError, match=where):
        curves_from_json({"numpy:float32": data}, "cal")


def test_a_bad_local_table_is_named():
    with pytest.raises(ValueError, match="field 'local' is 3: expected an object"):
        curves_from_json(3, "cal")
    with pytest.raises(ValueError, match=r"field 'local\.numpy': expected 'backend:dtype'"):
        curves_from_json({"numpy": {}}, "cal")
    assert curves_from_json(None, "cal") == {}


def test_fits_made_oversubscribed_give_way_to_fits_with_a_core_per_rank():
    cal = Calibration(alpha={"allreduce": {"2": 1e-5, "4": 1e-3}},
                      beta={"allreduce": {"2": 1e-10, "4": 1e-10}},
                      machine={"source": "calibrate", "cores_per_node": 2,
                               "ranks_per_node": 4})
    assert cal.oversubscribed_fit(4) and not cal.oversubscribed_fit(2)
    # the P = 4 fit timed ranks waiting for a core: the P = 2 fit prices 4 ranks
    assert cal.collective("allreduce", 4, 0) == pytest.approx(
        Calibration(alpha={"allreduce": {"2": 1e-5}}, beta={"allreduce": {"2": 1e-10}})
        .collective("allreduce", 4, 0))
    quiet = Calibration(alpha=cal.alpha, beta=cal.beta,
                        machine={"source": "calibrate", "cores_per_node": 4,
                                 "ranks_per_node": 4})
    assert quiet.collective("allreduce", 4, 0) > 10 * cal.collective("allreduce", 4, 0)
