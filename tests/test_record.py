"""Typed records: read like their JSON objects, bench-only fields left out while unset, one
writer, the MPI library string and the timestamp made in one place."""
import dataclasses
import datetime
import io
import json

import pytest
from mpi4py import MPI

from tpmpi.studies.record import CollectiveRecord, RunRecord, first_line, mpi_library, \
    utc_timestamp, write_record


def collective(**change) -> CollectiveRecord:
    fields = dict(collective="allreduce", ranks=2, size=64, count=16, dtype="float32",
                  backend="numpy", gpu_aware=False, buffers="host", warmup=1, iters=5,
                  time_s=1e-5, algbw_gbs=0.0064, busbw_gbs=0.0064, wrong=0)
    return CollectiveRecord(**{**fields, **change})


def test_provenance_is_filled_in():
    rec = collective()
    assert rec["mpi_library"] == mpi_library()
    assert mpi_library() and "\x00" not in mpi_library() and "\n" not in mpi_library()
    assert MPI.Get_library_version().lstrip().startswith(mpi_library())
    stamp = datetime.datetime.fromisoformat(rec["timestamp"])
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds() < 60
    assert datetime.datetime.fromisoformat(utc_timestamp()).tzinfo is not None


OPEN_MPI_41 = ("Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, "
               "May 26, 2022")
MPICH_5 = "MPICH Version:      5.0.2\nMPICH Release date: Thu Oct  9 10:11:54 AM CDT 2025"


@pytest.mark.parametrize("version, line", [
    (OPEN_MPI_41 + "\x00", OPEN_MPI_41),           # Debian's Open MPI: the C terminator
    (OPEN_MPI_41 + "\x00\x00garbage", OPEN_MPI_41),  # nothing after the first NUL counts
    (MPICH_5 + "\n", "MPICH Version:      5.0.2"),
    ("  \n Intel(R) MPI Library 2021.10\n", "Intel(R) MPI Library 2021.10"),
    ("\x00", ""), ("", ""),
])
def test_first_line_of_a_library_version(version, line):
    assert first_line(version) == line


def test_a_record_reads_like_its_json_object():
    rec = collective()
    assert list(rec) == [f.name for f in dataclasses.fields(CollectiveRecord)]
    assert rec["size"] == rec.size == 64 and rec.get("nope") is None and len(rec) == 17
    with pytest.raises(KeyError):
        rec["nope"]
    assert rec == dict(rec)


def test_unset_bench_only_fields_are_left_out():
    names = [f.name for f in dataclasses.fields(RunRecord)]
    rec = RunRecord(**dict.fromkeys(names[:names.index("flags")]))
    assert "sweep" not in rec and "sweep" not in dict(rec)
    with pytest.raises(KeyError):
        rec["sweep"]
    rec.sweep = {"kind": "strong", "dim": "m"}
    assert rec["sweep"] == {"kind": "strong", "dim": "m"} and list(rec)[-1] == "sweep"


def test_one_writer_one_json_line_per_record():
    out = io.StringIO()
    write_record(collective(), out)
    write_record({"error": "x"}, out)
    write_record(collective(), None)  # ranks without a file write nothing
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == dict(collective(timestamp=first["timestamp"])) and second == {"error": "x"}


def test_calibration_facts_say_where_the_model_comes_from():
    from tpmpi.studies.costmodel import Calibration
    from tpmpi.studies.record import calibration_facts

    assert calibration_facts(Calibration()) == {
        "source": "defaults", "ranks": None, "fitted": [], "mpi_library": None, "backend": None,
        "blas": {"library": None, "kernel": None}}
    cal = Calibration(alpha={"allgather": {"2": 1e-6, "4": 2e-6}, "bcast": {"8": 1e-6}},
                      machine={"source": "calibrate", "ranks": 8, "backend": "numpy",
                               "mpi_library": "MPICH", "blas": {"library": "openblas",
                                                                "kernel": "Haswell",
                                                                "threads": 1}})
    assert calibration_facts(cal) == {
        "source": "calibrate", "ranks": 8, "fitted": [2, 4, 8], "mpi_library": "MPICH",
        "backend": "numpy", "blas": {"library": "openblas", "kernel": "Haswell"}}
