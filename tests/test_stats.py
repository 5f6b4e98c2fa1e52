"""tpmpi.studies.stats: the median (min-max) summary, the spread, the flags a record raises and
their thresholds, the load per CPU, and short numbers for tables."""
import pytest

from problems import clean_record
from tpmpi.studies import stats


def test_summary_and_spread():
    s = stats.summary([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert stats.spread(s) == pytest.approx(9 / 2.5)
    assert stats.summary([]) is None and stats.spread(None) is None


@pytest.mark.parametrize("change, flag", [
    ({"efficiency": 1.2}, "superlinear"),
    ({"time_s": {"median": 1.0, "min": 0.95, "max": 1.2}}, "noisy"),
    ({"spread": {"baseline_s": {"median": 1.0, "min": 0.9, "max": 1.11}}}, "noisy-baseline"),
    ({"load_per_cpu": 1.6}, "oversubscribed"),
    ({"oversubscription": 2.0}, "oversubscribed"),
    ({"ranks": 1, "grid": "1x1", "speedup": 4.05, "efficiency": 1.0}, "slow-baseline"),
    ({"overlap": {"forward": {"overall_s": 1.0, "compute_s": 1.2, "comm_only_s": 0.15,
                              "overlap_pct": 100.0, "saved_s": 0.15}}}, "overlap-implausible"),
])
def test_each_flag(change, flag):
    assert stats.flags(clean_record()) == []
    assert stats.flags(clean_record(**change)) == [flag]


HERE = {"source": "calibrate", "ranks": 4, "fitted": [2, 4], "mpi_library": "MPICH 5",
        "backend": "numpy", "blas": {"library": "openblas", "kernel": "Haswell"}}


@pytest.mark.parametrize("calibration, grid, dp, flag, mark", [
    (HERE, "1x2", 1, None, ""),
    (HERE, "2x2", 2, None, ""),  # the row and column communicators (2) and the replicas (2)
    ({"source": "defaults", "fitted": []}, "1x2", 1, "pred-defaults", "*"),
    ({**HERE, "mpi_library": "Open MPI v4.1"}, "1x2", 1, "pred-other-machine", "~"),
    ({**HERE, "blas": {"library": "openblas", "kernel": "Zen"}}, "1x2", 1,
     "pred-other-machine", "~"),
    ({**HERE, "fitted": [2]}, "1x4", 1, "pred-other-ranks", "~"),
    ({**HERE, "fitted": [4]}, "1x4", 2, "pred-other-ranks", "~"),  # the DP Allreduce over 2
])
def test_prediction_flags_compare_the_calibration_with_the_record(calibration, grid, dp,
                                                                   flag, mark):
    rec = clean_record(calibration=calibration, grid=grid, mesh={"dp": dp},
                       mpi_library="MPICH 5", blas={"library": "openblas", "kernel": "Haswell"})
    assert stats.flags(rec) == ([flag] if flag else [])
    assert stats.prediction_mark(rec) == mark
    assert stats.flags(dict(rec, predicted_s=None)) == []  # nothing predicted, nothing to mark
    assert stats.flags(clean_record()) == []  # a record from before the calibration field


def test_flags_at_the_thresholds_stay_clear():
    edge = clean_record(efficiency=stats.SUPERLINEAR, load_per_cpu=1.0,
                time_s={"median": 1.0, "min": 1.0, "max": 1.0 + 0.99 * stats.NOISY},
                ranks=1, grid="1x1", speedup=1 + stats.NOISY,
                overlap={"forward": {"overall_s": 1.0, "compute_s": 1.0 + 0.99 * stats.NOISY,
                                     "comm_only_s": 1.0}})
    assert stats.flags(edge) == []


def test_load_per_cpu(monkeypatch):
    monkeypatch.setattr(stats.os, "getloadavg", lambda: (6.0, 1.0, 1.0))
    monkeypatch.setattr(stats.os, "cpu_count", lambda: 4)
    assert stats.load_per_cpu() == 1.5

    def missing():
        raise OSError("no load average")
    monkeypatch.setattr(stats.os, "getloadavg", missing)
    assert stats.load_per_cpu() is None


def test_short_numbers_have_no_exponent():
    assert [stats.short(v) for v in (1440.4, 285.13, 0.011834, 3.0)] == \
        ["1440", "285", "0.0118", "3"]
