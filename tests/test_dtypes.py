"""tpmpi.core.dtypes: the tolerance formula (unit roundoff of the dtype and of its
accumulation type), dtype names and the supported-dtype check."""
import numpy as np
import pytest

from tpmpi.core.dtypes import DEFAULT_K, SUPPORTED, UNIT_ROUNDOFF, dtype_name, resolve_dtype, \
    tolerance


def test_tolerance_follows_unit_roundoff_and_k():
    for dtype, acc in [("float64", "float64"), ("float32", "float32"),
                       ("float16", "float32"), ("bfloat16", "float32")]:
        u, ua = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[acc]
        assert tolerance(dtype, 1000) == pytest.approx(8 * u + 2000 * ua)
        assert tolerance(dtype, 4096) > tolerance(dtype, 1024)
    assert UNIT_ROUNDOFF["bfloat16"] == 2.0**-8 and UNIT_ROUNDOFF["float16"] == 2.0**-11


def test_tolerance_defaults_and_the_documented_table():
    """K defaults to the default problem's 1024; K = 0 counts as one term; the module
    docstring's table at K = 1024."""
    assert tolerance("float32") == tolerance(np.float32, DEFAULT_K) == tolerance("float32", 1024)
    assert tolerance("float64", 0) == tolerance("float64", 1)
    table = {"float64": 2.3e-13, "float32": 1.2e-4, "float16": 4.0e-3, "bfloat16": 3.1e-2}
    for dtype, value in table.items():
        assert tolerance(dtype, 1024) == pytest.approx(value, rel=0.05), dtype


def test_names_and_supported_dtypes():
    assert dtype_name(np.float32) == dtype_name("f4") == "float32"
    assert dtype_name("not a dtype") == "not a dtype"
    assert SUPPORTED == ("float64", "float32", "float16", "bfloat16")
    assert resolve_dtype("float16") == np.dtype(np.float16)
    with pytest.raises(ValueError, match=r"dtype='int8': expected one of float64, float32, "
                                         r"float16, bfloat16"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match=r"^x.dtype='float16': expected one of float32$"):
        resolve_dtype(np.float16, argument="x.dtype", supported=("float32",))


def test_bfloat16_needs_ml_dtypes(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes raises ImportError
    with pytest.raises(ValueError, match="dtype='bfloat16' needs the ml_dtypes package"):
        resolve_dtype("bfloat16")
