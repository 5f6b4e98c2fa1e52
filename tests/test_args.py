"""tpmpi.core.args: the local argument checks behind every entry point's error messages
(integers, dtype labels, array subclasses tpmpi would misread)."""
import numpy as np
import pytest

from tpmpi.core.args import check_int, check_plain_array, dtype_label


def test_check_int_accepts_integers_only():
    assert check_int("n", 3) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("n", 0) == 0 and check_int("n", None, allow_none=True) is None
    for bad, minimum, want in [(-1, 0, "a non-negative integer"), (0, 1, "a positive integer"),
                               (2, 3, "an integer >= 3"), (True, 0, "a non-negative integer"),
                               (2.0, 0, "a non-negative integer"), ("4", 1, "a positive integer"),
                               (None, 1, "a positive integer")]:
        with pytest.raises(ValueError, match=rf"^n={bad!r}: expected {want}$"):
            check_int("n", bad, minimum)
    with pytest.raises(ValueError, match=r"^panel=0: expected None or a positive integer$"):
        check_int("panel", 0, 1, allow_none=True)


def test_dtype_label_names_a_foreign_byte_order():
    assert dtype_label("float32") == "float32" and dtype_label(np.dtype("<f8")) == "float64"
    foreign = ">f4" if np.little_endian else "<f4"
    order = "big" if np.little_endian else "little"
    assert dtype_label(foreign) == f"{foreign} ({order}-endian float32)"
    assert dtype_label("u1") == "uint8"  # one byte: no order


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_subclasses_are_refused_with_the_fix():
    check_plain_array("x", np.zeros(2))
    check_plain_array("x", [1.0, 2.0])  # not an array at all: another check's business
    with pytest.raises(ValueError, match=r"^x is a numpy.ma.MaskedArray: expected a plain "
                                         r"numpy.ndarray \(tpmpi would ignore the mask; pass "
                                         r"x.filled\(value\)\)$"):
        check_plain_array("x", np.ma.masked_array(np.zeros(2), mask=[True, False]))
    with pytest.raises(ValueError, match=r"^W is a numpy.matrix: .*pass np.asarray\(W\)\)$"):
        check_plain_array("W", np.matrix(np.zeros((2, 2))))
