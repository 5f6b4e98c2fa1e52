"""The operation table: its documented formulas, complete rows, and that the profiler, the cost
model and the staged-bytes model all read the same row."""
import math
import re

import pytest

from tpmpi.core import colltable
from tpmpi.core.colltable import (OPS, TABLE, bus_factor, bw_factor, lat_factor, sent_bytes,
                                  staged_bytes)
from tpmpi.studies.costmodel import Calibration
from tpmpi.core.profiler import Profiler

COLUMNS = ("bus", "latency", "bandwidth", "sent", "staged")


def _documented() -> dict:
    """{op: {fact: formula text}} from the table in colltable's docstring."""
    rows = {}
    for line in colltable.__doc__.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in TABLE and len(cells) == 1 + len(COLUMNS):
            rows[cells[0]] = dict(zip(COLUMNS, cells[1:]))
    return rows


def _evaluate(text: str, p: int):
    """A formula of the docstring table at P = ``p`` (None for "-")."""
    if text == "-":
        return None
    expr = re.sub(r"(?<![a-z])(\d)\s*\(", r"\1*(", text.replace("ceil(lg P)", "ceil(log2(P))"))
    return eval(expr, {"ceil": math.ceil, "log2": math.log2, "P": p})


def test_docstring_table_is_the_table():
    docs = _documented()
    assert set(docs) == set(TABLE)
    for op, row in TABLE.items():
        for p in (2, 3, 4, 7, 8):
            for fact in COLUMNS:
                fn = getattr(row, fact)
                want = _evaluate(docs[op][fact], p)
                assert (fn is None) == (want is None), (op, fact)
                if fn is not None:
                    assert fn(p) == pytest.approx(want), (op, fact, p)


def test_factors_of_design_md_and_nothing_on_one_rank():
    assert bus_factor("allgather", 4) == bus_factor("reduce_scatter", 4) == 0.75
    assert bus_factor("allreduce", 4) == 1.5 and bus_factor("bcast", 4) == 1.0
    for op in OPS:
        assert bus_factor(op, 1) == lat_factor(op, 1) == bw_factor(op, 1) == 0.0
        assert sent_bytes(op, 1, 1e6) == 0.0 and staged_bytes(op, 1, 1e6) == (0.0, 0.0)
    assert staged_bytes("allgather", 4, 400.0) == (100.0, 300.0)


def test_ops_are_the_modelled_and_benchmarked_rows():
    assert OPS == ("allgather", "reduce_scatter", "allreduce", "bcast", "reduce")
    assert bus_factor("reduce", 2) == 1.0 and lat_factor("reduce", 8) == 3


@pytest.mark.parametrize("fact", [lambda: lat_factor("gather", 2),
                                  lambda: bus_factor("alltoall", 2),
                                  lambda: staged_bytes("nope", 2, 8)])
def test_missing_rows_name_the_op(fact):
    with pytest.raises(ValueError, match=r"collective='(gather|alltoall|nope)': expected one of "
                                         "allgather, reduce_scatter, allreduce, bcast, reduce"):
        fact()


def test_profiler_model_and_benchmark_read_one_row(monkeypatch):
    """Changing a row changes the profiler's bus bytes, the model's cost and the staged bytes
    together: there is no other copy of the facts."""
    row = TABLE["allgather"]
    monkeypatch.setitem(TABLE, "allgather", colltable.Collective(
        "allgather", bus=lambda p: 10.0, latency=lambda p: 100.0, bandwidth=lambda p: 0.0,
        sent=lambda p: 0.5, staged=lambda p: (2.0, 3.0), splits=row.splits))
    prof = Profiler(timed=False)
    prof.count("allgather", 8, 4)
    assert prof.bus_bytes == 80.0
    cal = Calibration(alpha={"allgather": {"4": 1e-6}}, beta={"allgather": {"4": 1.0}})
    assert cal.collective("allgather", 4, 1e9) == pytest.approx(100e-6)
    assert staged_bytes("allgather", 4, 8.0) == (16.0, 24.0)
    assert sent_bytes("allgather", 4, 8.0) == 4.0
