"""tpmpi.studies.collbench: the nccl-tests size sweep, the benchmark bodies (the layers'
operators) and their results at world sizes 1-4, in float and half precision, one benchmark
row per collective (its record: bytes, count, bandwidths, the #wrong check) and the table's
lines."""
import numpy as np
import pytest

from tpmpi.core.backend import get_backend
from tpmpi.core.colltable import OPS, TABLE, bus_factor
from tpmpi.studies.collbench import COLUMNS, body, format_row, sizes_sweep, time_collective


def test_sizes_sweep():
    assert sizes_sweep(8, 64, 2) == [8, 16, 32, 64]
    assert sizes_sweep(8, 100, 4) == [8, 32]
    assert sizes_sweep(5, 5, 2) == [5]
    for begin, end, factor in ((64, 8, 2), (0, 8, 2), (8, 64, 1), (8, 64, float("nan")),
                               (8, 64, float("inf"))):
        with pytest.raises(ValueError, match=rf"sizes -b {begin} -e {end} -f {factor}: need "
                                             r"1 <= b <= e and a finite f > 1"):
            sizes_sweep(begin, end, factor)


@pytest.mark.mpi
@pytest.mark.parametrize("op", OPS)
def test_time_collective_record(world, op):
    p = world.size
    rec = time_collective(op, 10, "float64", world.comm, get_backend("numpy"), warmup=0, iters=2)
    count = 10 - 10 % p if TABLE[op].splits else 10
    assert (rec["collective"], rec["ranks"], rec["count"]) == (op, p, count)
    assert rec["size"] == count * 8 and rec["dtype"] == "float64" and rec["buffers"] == "host"
    assert rec["wrong"] == 0 and rec["time_s"] > 0 and (rec["warmup"], rec["iters"]) == (0, 2)
    assert rec["algbw_gbs"] == pytest.approx(rec["size"] / rec["time_s"] / 1e9)
    assert rec["busbw_gbs"] == pytest.approx(rec["algbw_gbs"] * bus_factor(op, p))
    # the slowest rank's time: the same record on every rank
    assert len(set(world.comm.allgather(rec["time_s"]))) == 1
    unchecked = time_collective(op, 10, "float64", world.comm, get_backend("numpy"), warmup=0,
                                iters=1, check=False)
    assert unchecked["wrong"] is None


def test_table_rows_line_up_with_the_header():
    head, units = format_row({}, header=True).splitlines()
    assert head.split() == list(COLUMNS) and "(us)" in units and "(GB/s)" in units
    row = format_row({"size": 4096, "count": 1024, "dtype": "float32", "time_s": 1.5e-6,
                      "algbw_gbs": 2.7306, "busbw_gbs": None, "wrong": 0})
    assert row.split() == ["4096", "1024", "float32", "1.50", "2.731", "-", "0"]
    assert len(row) == len(head)


@pytest.mark.mpi
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("count", [0, 1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_bodies_give_the_expected_result(world, op, count, dtype):
    run = body(op, count, dtype, world.comm, np)
    p = world.size
    if op == "allgather" and count >= 64 * p:  # 8 rows of column blocks
        assert run.count == (count - count % p) // 8 * 8
    else:
        assert run.count == (count - count % p if TABLE[op].splits else count)
    assert run.wrong(world.comm) == 0
    for _ in range(2):  # repeated calls (as timed) leave a fresh call right
        run.call()
    assert run.wrong(world.comm) == 0
    if op == "allreduce" and run.count:
        assert run.out[0][0] == sum((q + 1) % 32 for q in range(p))


def test_an_unknown_collective_is_named():
    from mpi4py import MPI

    with pytest.raises(ValueError, match="collective='gather': expected one of allgather"):
        body("gather", 8, "float32", MPI.COMM_SELF, np)
