"""tpmpi.core.args: the local argument checks behind every entry point's error messages
(integers, integers written in strings, dtype labels, array subclasses tpmpi would misread)."""
import argparse
import re

import numpy as np
import pytest

from tpmpi.core.args import check_int, check_plain_array, dtype_label, int_flag, parse_int


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


def test_parse_int_reads_ascii_digits_only_and_names_the_source():
    assert parse_int("n", "42") == 42 and parse_int("n", " 7\n", 1) == 7
    assert parse_int("n", "0") == 0
    # str.isdigit accepts the superscript, int() the Arabic-Indic digits and the underscore
    for bad in ("²", "1²", "١٢", "1_000", "+3", "-1", "1.0", "0x10", "", " ", "٣"):
        with pytest.raises(ValueError, match=rf"^TPMPI_THREADS={re.escape(repr(bad))}: expected "
                                             r"a non-negative integer \(digits 0-9\)$"):
            parse_int("TPMPI_THREADS", bad)
    with pytest.raises(ValueError, match=r"^tp='0': expected a positive integer \(digits 0-9\)$"):
        parse_int("tp", "0", 1)
    with pytest.raises(ValueError, match=r"^n=3: expected an integer >= 4 \(digits 0-9\)$"):
        parse_int("n", 3, 4)  # not a string at all


def test_int_flag_gives_argparse_the_message():
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--m", type=int_flag())
    parser.add_argument("--p", type=int_flag(1, "a positive count"))
    assert parser.parse_args(["--m", "12", "--p", "3"]).m == 12
    with pytest.raises(argparse.ArgumentError, match=r"argument --m: '١٢': expected a "
                                                     r"non-negative integer \(digits 0-9\)"):
        parser.parse_args(["--m", "١٢"])
    with pytest.raises(argparse.ArgumentError, match=r"argument --p: '0': expected a positive "
                                                     r"count$"):
        parser.parse_args(["--p", "0"])
