"""Every kind of bad input to tpmpi's public entry points, run under MPI: the message a user
sees (checked to be the same on every rank) and the time to fail (max over ranks).

    mpiexec -n 4 python scripts/bad_inputs.py        # markdown table on rank 0
    mpiexec -n 4 python scripts/bad_inputs.py calibration report   # the cases naming a word

Cases marked "on one rank" misbehave on the last rank only: the others must not hang.
Cases whose expected outcome is the correct result (an input layout, a refilled buffer, float16
partial sums) print "OK: ..." with what was checked against the float64 reference.
tests/test_bad_inputs.py runs the same cases at world sizes 1-4 and checks each message
against the case's expected pattern.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import tpmpi
from tpmpi import cli
from tpmpi.core import agreement, launch

Col, Row = tpmpi.ColumnParallelLinear, tpmpi.RowParallelLinear


class OtherLayer(Col):
    """A different layer class, for the class-mismatch case."""


class Context:
    """A grid, a column layer, inputs and a scratch directory shared by the ranks of ``comm``."""

    def __init__(self, comm: MPI.Comm, tmpdir: str):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.tmpdir = tmpdir
        self.last = self.size - 1  # the rank that misbehaves in one-rank cases
        self.odd = self.rank == self.last and self.size > 1
        self.grid = tpmpi.ProcessGrid(comm)
        rng = np.random.default_rng(0)
        self.X = rng.standard_normal((4, 5)).astype(np.float32)
        self.W = rng.standard_normal((5, 6)).astype(np.float32)
        self.b = rng.standard_normal(6).astype(np.float32)
        self.dY = rng.standard_normal((4, 6)).astype(np.float32)
        self.layer = Col.from_dense(self.W, self.b, grid=self.grid)

    def path(self, name: str) -> str:
        return os.path.join(self.tmpdir, name)

    def checkpoint(self, damage: Optional[Callable[[str], None]] = None,
                   edit: Optional[Callable[[dict], None]] = None, layer=None) -> str:
        """A fresh checkpoint of ``layer`` (default ``self.layer``); on rank 0
        ``damage(weight file)`` runs, and ``edit(manifest)`` rewrites the manifest."""
        path = self.path("ckpt")
        tpmpi.save_checkpoint(path, layer if layer is not None else self.layer)
        if self.rank == 0:
            where = os.path.join(path, "manifest.json")
            with open(where) as f:
                manifest = json.load(f)
            if damage is not None:
                damage(os.path.join(path, manifest["parameters"]["weight"]["file"]))
            if edit is not None:
                edit(manifest)
                with open(where, "w") as f:
                    json.dump(manifest, f)
        self.comm.Barrier()
        return path

    def load(self, **kwargs) -> Callable[[], object]:
        path = kwargs.pop("path", None) or self.checkpoint()
        return lambda: tpmpi.load_checkpoint(path, **{"grid": self.grid, **kwargs})


@dataclass
class Case:
    label: str
    min_ranks: int
    make: Callable[[Context], Callable[[], object]]  # setup -> the call that must fail
    expect: str  # a regular expression the message must match


CASES: list[Case] = []


def case(label: str, expect: str, min_ranks: int = 1):
    def register(make):
        CASES.append(Case(label, min_ranks, make, expect))
        return make
    return register


def _flip_last_byte(filename: str) -> None:
    with open(filename, "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)[0]
        f.seek(-1, 2)
        f.write(bytes([byte ^ 0xFF]))


CALL = "call differs across ranks: .* every rank must make the same tpmpi calls"

# ---- grid and communicators
case("ProcessGrid: pr*pc != ranks", "pr\\*pc must equal")(
    lambda c: lambda: tpmpi.ProcessGrid(c.comm, shape=(c.size + 1, 1)))
case("ProcessGrid: shape differs across ranks", "shape differs across ranks", 2)(
    lambda c: lambda: tpmpi.ProcessGrid(c.comm, shape=(1, c.size) if c.rank else (c.size, 1)))
case("configure_blas_threads: threads='abc' on one rank",
     r"threads='abc': expected .*\(ranks? [\d,]+\)", 2)(
    lambda c: lambda: tpmpi.configure_blas_threads(c.comm, "abc" if c.odd else None))


def _freed(c: Context):
    dup = c.comm.Dup()
    dup.Free()
    return lambda: tpmpi.ProcessGrid(dup)


case("ProcessGrid: a freed communicator", "comm is MPI.COMM_NULL")(_freed)


def _intercomm(c: Context):
    color = c.rank % 2
    local = c.comm.Split(color, c.rank)
    inter = local.Create_intercomm(0, c.comm, 1 - color, tag=7)

    def call():
        try:
            tpmpi.ProcessGrid(inter)
        finally:
            inter.Free()
            local.Free()
    return call


case("ProcessGrid: an intercommunicator", "comm is an intercommunicator", 2)(_intercomm)
case("ProcessGrid: a plain MPI.Comm handle", "comm is a plain MPI.Comm handle")(
    lambda c: lambda: tpmpi.ProcessGrid(MPI.Comm(c.comm)))


def _freed_grid(c: Context):
    grid = tpmpi.ProcessGrid(c.comm)
    layer = Col(5, 6, grid=grid)
    grid.free()
    return lambda: layer(c.X)


case("layer: forward after grid.free()", "communicator is MPI.COMM_NULL")(_freed_grid)
# ---- layer construction
case("layer: out_features < 0", "out_features=-1: expected a non-negative integer")(
    lambda c: lambda: Col(5, -1, grid=c.grid))
case("layer: unsupported dtype", "dtype='int8': expected one of")(
    lambda c: lambda: Col(5, 6, grid=c.grid, dtype="int8"))
case("layer: grid is not a ProcessGrid", "expected a tpmpi.ProcessGrid")(
    lambda c: lambda: Col(5, 6, grid=c.comm))
case("layer: out_features differs across ranks", "out_features differs across ranks", 2)(
    lambda c: lambda: Col(5, 6 + c.odd, grid=c.grid))
case("layer: dtype differs across ranks", "dtype differs across ranks", 2)(
    lambda c: lambda: Col(5, 6, grid=c.grid, dtype="float64" if c.odd else "float32"))
case("layer: option gather_output differs", "gather_output differs across ranks", 2)(
    lambda c: lambda: Col(5, 6, grid=c.grid, gather_output=not c.odd))
case("from_dense: b has the wrong shape on one rank", r"b.shape=\(5,\): expected \(6,\)", 2)(
    lambda c: lambda: Col.from_dense(c.W, c.b[: 6 - c.odd], grid=c.grid))
case("from_dense: W is a list on one rank", "W is a list: expected an array", 2)(
    lambda c: lambda: Col.from_dense(c.W.tolist() if c.odd else c.W, c.b, grid=c.grid))
case("from_dense: b is a list on one rank", "b is a list: expected an array", 2)(
    lambda c: lambda: Col.from_dense(c.W, c.b.tolist() if c.odd else c.b, grid=c.grid))
case("from_dense: W is a masked array", "W is a numpy.ma.*MaskedArray: .*ignore the mask")(
    lambda c: lambda: Col.from_dense(np.ma.masked_less(c.W, 0), c.b, grid=c.grid))


def _mlp_list(c: Context):
    W1, W2 = np.ones((5, 8), np.float32), np.ones((8, 5), np.float32)
    b1, b2 = np.ones(8, np.float32), np.ones(5, np.float32)
    return lambda: tpmpi.ParallelMLP.from_dense(W1.tolist() if c.odd else W1, b1, W2, b2,
                                                grid=c.grid)


case("ParallelMLP.from_dense: W1 is a list on one rank", "W1 is a list: expected an array",
     2)(_mlp_list)
# ---- forward / backward
case("forward: x has wrong columns on one rank", r"x.shape=\(4, 4\): expected 5 columns", 2)(
    lambda c: lambda: c.layer(c.X[:, : 5 - c.odd]))
case("forward: x rows differ across ranks", r"x.shape\[0\] differs across ranks", 2)(
    lambda c: lambda: c.layer(c.X[: 4 - c.odd]))
case("forward: x dtype float64 for a float32 layer", "x.dtype=float64: expected float32")(
    lambda c: lambda: c.layer(c.X.astype(np.float64)))
case("forward: x is big-endian", r"x.dtype=>f4 \(big-endian float32\): expected float32 in "
     "this machine's byte order")(lambda c: lambda: c.layer(c.X.astype(">f4")))
case("forward: x is a list", "x is a builtins.list: expected a numpy array")(
    lambda c: lambda: c.layer(c.X.tolist()))
case("forward: x is a masked array", "x is a numpy.ma.*MaskedArray: .*ignore the mask")(
    lambda c: lambda: c.layer(np.ma.masked_less(c.X, 0)))


def _nan_on_last(c: Context):
    layer = Col.from_dense(c.W, c.b, grid=c.grid, check_finite=True)
    x = c.X.copy()
    if c.rank == c.last:
        x[1, 2] = np.nan
        x[3, 0] = np.inf
    return lambda: layer(x)


case("forward: NaN/Inf in x on one rank (check_finite=True)",
     r"x has 2 non-finite value\(s\)")(_nan_on_last)
case("backward: called before forward", r"backward\(\) called before forward")(
    lambda c: lambda: Col.from_dense(c.W, c.b, grid=c.grid).backward(c.X[:, :1]))


def _dy_rows(c: Context):
    c.layer(c.X)
    return lambda: c.layer.backward(np.zeros((3, 6), np.float32))


case("backward: dy rows != forward input rows", "expected 4 rows")(_dy_rows)


def _matrix_dy(c: Context):
    c.layer(c.X)
    dy = np.asmatrix(c.dY) if c.odd else c.dY
    return lambda: c.layer.backward(dy)


case("backward: np.asmatrix(dy) on one rank (Iallreduce would be in flight)",
     "dy is a numpy.matrix: expected a plain numpy.ndarray", 2)(_matrix_dy)


# ---- call order
def _swapped(c: Context):
    a, b = Col(5, 6, grid=c.grid, seed=1), Col(5, 6, grid=c.grid, seed=2)
    first = b if c.odd else a
    return lambda: first(c.X)


case("call order: two same-shaped layers called in swapped order", CALL, 2)(_swapped)


def _fwd_bwd(c: Context):
    c.layer(c.X)
    return lambda: c.layer.backward(c.dY) if c.odd else c.layer(c.X)


case("call order: forward on one rank, backward on the others", CALL, 2)(_fwd_bwd)


def _tile_fwd_bwd(c: Context):
    layer = tpmpi.TileParallelLinear(5, 6, grid=c.grid, panel=2)
    x = tpmpi.scatter(c.X, c.grid, "tiles")
    y = layer(x)
    return lambda: layer.backward(y) if c.odd else layer(x)


case("call order: tile2d forward on one rank, backward on the others", CALL, 2)(_tile_fwd_bwd)


def _mlp_fwd_bwd(c: Context):
    mlp = tpmpi.ParallelMLP(5, 8, grid=c.grid)
    mlp(c.X)
    return lambda: mlp.backward(c.X) if c.odd else mlp(c.X)


case("call order: MLP forward on one rank, backward on the others", CALL, 2)(_mlp_fwd_bwd)


def _replicated_dy(c: Context):
    layer = Row.from_dense(c.W, c.b, grid=c.grid, check_replicated=True)
    layer(c.X)
    dy = c.dY + c.odd
    return lambda: layer.backward(dy)


case("check_replicated: dy differs on one rank (row layer)",
     r"dy differs across ranks: checksum \w+ on ranks? .* dy must be replicated", 2)(
    _replicated_dy)


def _replicated_nan(c: Context):
    layer = Col.from_dense(c.W, c.b, grid=c.grid, check_replicated=True)
    x = c.X.copy()
    x[0, 0] = np.nan if c.odd else x[0, 0]
    return lambda: layer(x)


case("check_replicated: NaN in x on one rank (column layer)",
     r"x differs across ranks: checksum .* x must be replicated", 2)(_replicated_nan)
# ---- layouts
case("gather: local block of the wrong shape on one rank", r"a_local.shape=\(2, 2\): expected",
     2)(lambda c: lambda: tpmpi.gather(np.zeros((2, 3 - c.odd)), c.grid, "cols",
                                       (2, 3 * c.size)))
case("gather: unknown layout", "layout='diag': expected one of")(
    lambda c: lambda: tpmpi.gather(c.X, c.grid, "diag", c.X.shape))
case("gather: a list instead of an array on one rank", "a_local is a list: expected an array",
     2)(lambda c: lambda: tpmpi.gather(c.X.tolist() if c.odd else c.X, c.grid, "replicated",
                                       c.X.shape))
case("gather: an object-dtype array", "a_local.dtype=object: expected a numeric dtype")(
    lambda c: lambda: tpmpi.gather(np.full((2, 3), None, dtype=object), c.grid, "cols",
                                   (2, 3 * c.size)))
case("scatter: unknown layout (local, no communication)", "layout='diag'")(
    lambda c: lambda: tpmpi.scatter(c.X, c.grid, "diag"))
case("init_weight: negative seed (local, no communication)", "seed=-1")(
    lambda c: lambda: tpmpi.init_weight((3, 4), -1))
# ---- environment
case("TPMPI_MAX_MESSAGE_BYTES differs across ranks",
     "TPMPI_MAX_MESSAGE_BYTES differs across ranks", 2)(
    lambda c: lambda: _with_limit(2**20 + c.rank, lambda: c.layer(c.X)))
case("TPMPI_THREADS='two' on one rank", r"TPMPI_THREADS='two': expected .*\(ranks? [\d,]+\)", 2)(
    lambda c: lambda: _with_env("TPMPI_THREADS", "two" if c.odd else None,
                                lambda: tpmpi.configure_blas_threads(c.comm)))


case("TPMPI_THREADS='²' on one rank (str.isdigit accepts it, int() does not)",
     r"TPMPI_THREADS='²': expected a positive integer \(digits 0-9\) \(ranks? [\d,]+\)", 2)(
    lambda c: lambda: _with_env("TPMPI_THREADS", "²" if c.odd else None,
                                lambda: tpmpi.configure_blas_threads(c.comm)))
case("TPMPI_MAX_MESSAGE_BYTES='1²' on one rank",
     r"TPMPI_MAX_MESSAGE_BYTES='1²': expected a positive integer \(digits 0-9\) \(ranks? "
     r"[\d,]+\)", 2)(
    lambda c: lambda: _with_env("TPMPI_MAX_MESSAGE_BYTES", "1²" if c.odd else None,
                                lambda: c.layer(c.X)))
case("Mesh(tp='²') on one rank", r"tp='²': expected T or RxC \(digits 0-9\), e.g. 2 or 2x2 "
     r"\(ranks? [\d,]+\)", 2)(
    lambda c: lambda: tpmpi.Mesh(c.comm, tp="²" if c.odd else None))


def _with_limit(limit: int, fn):
    old, agreement.MAX_MESSAGE_BYTES = agreement.MAX_MESSAGE_BYTES, limit
    try:
        return fn()
    finally:
        agreement.MAX_MESSAGE_BYTES = old


def _with_env(name: str, value: Optional[str], fn):
    old = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        return fn()
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


# ---- checkpoints: arguments
case("save_checkpoint: path differs across ranks", "path differs across ranks", 2)(
    lambda c: lambda: tpmpi.save_checkpoint(c.path(f"r{c.rank}"), c.layer))


def _other_object(c: Context):
    twin = Col.from_dense(c.W, c.b, grid=c.grid)
    return lambda: tpmpi.save_checkpoint(c.path("mixed"), twin if c.odd else c.layer)


case("save_checkpoint: a different layer object on one rank", "layer differs across ranks: "
     r"layer #\d+ \(ColumnParallelLinear 5x6\) on ranks? .*every rank must save the same", 2)(
    _other_object)


def _locked(c: Context):
    path = c.path("locked")
    if c.rank == 0:  # a live process on this host holds the lock: this very one
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, ".lock"), "w") as f:
            json.dump({"pid": os.getpid(), "host": os.uname().nodename, "since": "now"}, f)
    c.comm.Barrier()
    return lambda: tpmpi.save_checkpoint(path, c.layer)


case("save_checkpoint: another save holds the path's lock",
     "is being saved by another job .*concurrent saves to one path are refused")(_locked)


def _lock_dir(c: Context):
    path = c.path("lockdir")
    if c.rank == 0:  # a stale .lock that is a directory (not something tpmpi makes)
        os.makedirs(os.path.join(path, ".lock"), exist_ok=True)
    c.comm.Barrier()
    return lambda: tpmpi.save_checkpoint(path, c.layer)


case("save_checkpoint: a stale .lock that is a directory",
     r"lockdir/.lock is a directory, not a tpmpi save lock \(a regular file\): tpmpi does not "
     r"remove what it did not create")(_lock_dir)


def _full_disk(c: Context):
    """The last rank's data write fails with ENOSPC: its collective MPI-IO call completes and
    then raises, as MPICH's does (tests/test_checkpoint_faults.py fails the real pwrite under
    MPICH and Open MPI)."""
    from tpmpi.checkpoint import npyfile

    path = c.checkpoint()
    real = npyfile._write_block

    def full(fh, host, count, dtype):
        real(fh, host, count, dtype)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def call():
        npyfile._write_block = full if c.rank == c.last else real
        try:
            tpmpi.save_checkpoint(path, c.layer)
        finally:
            npyfile._write_block = real
    return call


case("save_checkpoint: a data write fails (ENOSPC) on one rank",
     r"save_checkpoint\('.*ckpt'\) failed: writing .*/v000002/weight.npy: No space left on "
     r"device( \(rank \d\))?; '.*ckpt' still holds v000001, unchanged")(_full_disk)


def _drifted(c: Context):
    mesh = tpmpi.Mesh(c.comm, dp=c.size)
    model = tpmpi.DataParallel(tpmpi.ParallelMLP(5, 8, grid=mesh.tp), mesh)
    model.module.fc1.weight[...] += c.odd  # one replica updated apart from the others
    return lambda: tpmpi.save_checkpoint(c.path("drifted"), model)


case("save_checkpoint: DP replicas whose parameters drifted apart (one replica updated)",
     r"the data-parallel replicas hold different values of fc1.weight .* save_checkpoint "
     r"writes replica 0's copy", 2)(_drifted)
case("load_checkpoint: state= without into=", "state= needs into=")(
    lambda c: c.load(state={"adam.m": {}}))
case("load_checkpoint: path differs across ranks", "path differs across ranks", 2)(
    lambda c: c.load(path=c.checkpoint() + ("-other" if c.odd else "")))
case("load_checkpoint: class differs across ranks", "cls differs across ranks", 2)(
    lambda c: c.load(cls=OtherLayer if c.odd else Col))
case("load_checkpoint: verify differs across ranks", "verify differs across ranks", 2)(
    lambda c: c.load(verify=not c.odd))
case("load_checkpoint: verify='yes'", "verify='yes': expected True or False")(
    lambda c: c.load(verify="yes"))
case("load_checkpoint: into= on one rank only", "into differs across ranks", 2)(
    lambda c: (lambda target: c.load(into=target if c.odd else None))(Col(5, 6, grid=c.grid)))
case("load_checkpoint: into= is not a layer on one rank", "into: dict is not a tpmpi layer or "
     "composite", 2)(lambda c: c.load(into={} if c.odd else None))
case("load_checkpoint: dtype option differs across ranks", "options differs across ranks", 2)(
    lambda c: c.load(dtype="float64" if c.odd else "float32"))
# ---- checkpoints: damage
case("load_checkpoint: no checkpoint at path", "manifest.json is missing")(
    lambda c: lambda: Col.load_checkpoint(c.path("none"), grid=c.grid))
case("load_checkpoint: weight file missing", r"file v\d+/weight.npy is missing")(
    lambda c: c.load(path=c.checkpoint(os.remove)))
case("load_checkpoint: truncated file", "weight.npy is truncated")(
    lambda c: c.load(path=c.checkpoint(lambda f: os.truncate(f, os.path.getsize(f) - 8))))
case("load_checkpoint: corrupted data byte", "weight.npy is corrupted")(
    lambda c: c.load(path=c.checkpoint(_flip_last_byte)))
case("load_checkpoint: class mismatch", "holds a ColumnParallelLinear, not a OtherLayer")(
    lambda c: (lambda p: lambda: OtherLayer.load_checkpoint(p, grid=c.grid))(c.checkpoint()))
case("load_checkpoint: shape mismatch", "do not match the layer's")(
    lambda c: c.load(into=Col(5, 4, grid=c.grid)))


def _edit(**changes):
    """A manifest edit: ``parameters.weight.KEY=value`` for dotted keys, else top-level."""
    def edit(manifest: dict) -> None:
        for key, value in changes.items():
            target = manifest["parameters"]["weight"] if key.startswith("w_") else manifest
            key = key[2:] if key.startswith("w_") else key
            if value is KeyError:
                target.pop(key)
            else:
                target[key] = value
    return edit


for _label, _edits, _expect in [
        ("'parameters': []", {"parameters": []}, "field 'parameters' is \\[\\]: expected"),
        ("'parameters': null", {"parameters": None}, "field 'parameters' is None: expected"),
        ("'parameters': {}", {"parameters": {}}, "field 'parameters' is \\{\\}: expected"),
        ("'class' missing", {"class": KeyError}, "field 'class' is missing: expected"),
        ("'checksum' missing", {"w_checksum": KeyError}, "field 'checksum' is missing"),
        ("'shape' is a string", {"w_shape": "5x6"}, "field 'shape' is '5x6': expected a list"),
        ("'format_version': 99", {"format_version": 99}, "format_version 99 is not one"),
        ("'header_bytes' edited", {"w_header_bytes": 64},
         "has a 128-byte .npy header, the manifest says header_bytes=64")]:
    case(f"load_checkpoint: manifest {_label}", _expect)(
        lambda c, e=_edits: c.load(path=c.checkpoint(edit=_edit(**e))))


def _overflow(c: Context):
    big = Col.from_dense(c.W * 1e5, c.b, grid=c.grid)
    return c.load(path=c.checkpoint(layer=big), dtype="float16")


case("load_checkpoint: a cast to float16 that overflows",
     "parameter weight holds values beyond the range of dtype=float16")(_overflow)
# ---- command line (exit code 2 on every rank; the line rank 0 prints)


def _cli(c: Context, argv: list, code: int = 2) -> Callable[[], object]:
    """The CLI's one line (rank 0's stderr) as a ValueError, when every rank exits ``code``
    (2: usage error, 3: an error of the work itself)."""
    def call():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            done = cli.main(argv, c.comm)
        codes = c.comm.allgather(done)
        line = c.comm.bcast(err.getvalue().strip(), root=0)
        if codes != [code] * c.size:
            raise RuntimeError(f"exit codes {codes}: {line}")
        raise ValueError(line)
    return call


def _file(c: Context, name: str, text: str) -> str:
    """A file written by rank 0 in the shared scratch directory."""
    path = c.path(name)
    if c.rank == 0:
        with open(path, "w") as f:
            f.write(text)
    c.comm.Barrier()
    return path


def _calibration(c: Context, name: str, edit: Callable[[dict], object]) -> str:
    """A calibration file of the model's defaults after ``edit``."""
    from tpmpi.studies.costmodel import Calibration

    data = Calibration().to_json()
    data["machine"] = {"source": "calibrate", "ranks": 2}
    data = edit(data) or data
    return _file(c, name, json.dumps(data))


def _record(c: Context, name: str, edit: Callable[[dict], object]) -> str:
    """A JSON-lines file of one plausible run record after ``edit``."""
    rec = {"scheme": "column", "ranks": 2, "grid": "1x2", "m": 8, "k": 4, "n": 6,
           "dtype": "float32", "iters": 5, "time_s": {"median": 1e-3, "min": 9e-4,
                                                       "max": 2e-3},
           "gemm_s": 5e-4, "comm_s": 3e-4, "mem_peak_bytes": 1 << 20, "flags": []}
    edit(rec)
    return _file(c, name, json.dumps(rec) + "\n")


case("CLI: run --help on one rank only", "--help/--version differs across ranks", 2)(
    lambda c: _cli(c, ["run", "--help"] if c.odd else ["run", "--m", "4", "--iters", "1"]))
case("CLI: --version on one rank only", "--help/--version differs across ranks", 2)(
    lambda c: _cli(c, ["--version"] if c.odd else ["info"]))
case("CLI: flags differ across ranks", "--m differs across ranks", 2)(
    lambda c: _cli(c, ["run", "--m", str(4 + c.rank), "--iters", "1"]))
case("CLI: run --n 10**12 (does not fit)", r"needs at least \d+ bytes .* per rank")(
    lambda c: _cli(c, ["run", "--n", str(10**12)]))
case("CLI: TPMPI_CALIBRATION names a missing file on one rank",
     r"TPMPI_CALIBRATION: calibration '.*nope.json': .*No such file.*\(rank \d\)", 2)(
    lambda c: lambda: _with_env("TPMPI_CALIBRATION", c.path("nope.json") if c.odd else None,
                                _cli(c, ["run", "--m", "4", "--k", "4", "--n", "4"])))
case("CLI: TPMPI_CALIBRATION holds [] on one rank",
     r"TPMPI_CALIBRATION: calibration '.*list.json' holds a JSON list: expected an object with "
     r"machine, alpha, beta and rates .*\(rank \d\)", 2)(
    lambda c: (lambda path: lambda: _with_env(
        "TPMPI_CALIBRATION", path if c.odd else None,
        _cli(c, ["run", "--m", "4", "--k", "4", "--n", "4"])))(_file(c, "list.json", "[]")))
case("CLI: a calibration with a non-numeric field",
     r"--calibration: calibration '.*word.json': field 'alpha.allgather.2' is '0.1x': expected")(
    lambda c: _cli(c, ["run", "--m", "4", "--k", "4", "--n", "4", "--calibration",
                       _calibration(c, "word.json",
                                    lambda d: d.update(alpha={"allgather": {"2": "0.1x"}}))]))
case("CLI: plan --calibration {}", r"calibration '.*empty.json': field 'machine' is missing")(
    lambda c: _cli(c, ["plan", "--m", "8", "--k", "8", "--n", "8", "--ranks", "2",
                       "--calibration", _file(c, "empty.json", "{}")]))
case("CLI: report of a record with a zero median (exit 3)",
     r"zero.jsonl:1: field 'time_s.median' is 0: expected a positive number")(
    lambda c: _cli(c, ["report", _record(c, "zero.jsonl", lambda r: r["time_s"].update(
        median=0)), "--out", c.path("report")], code=3))
case("CLI: report of a record with flags as a string (exit 3)",
     r"flags.jsonl:1: field 'flags' is 'noisy': expected a list of flag names")(
    lambda c: _cli(c, ["report", _record(c, "flags.jsonl", lambda r: r.update(flags="noisy")),
                       "--out", c.path("report")], code=3))
case("CLI: report of a record without scheme (exit 3)",
     r"noscheme.jsonl:1: neither 'scheme' nor 'collective'")(
    lambda c: _cli(c, ["report", _record(c, "noscheme.jsonl", lambda r: r.pop("scheme")),
                       "--out", c.path("report")], code=3))
case("CLI: report of a record with ranks 0 (exit 3)",
     r"ranks0.jsonl:1: field 'ranks' is 0: expected a positive integer")(
    lambda c: _cli(c, ["report", _record(c, "ranks0.jsonl", lambda r: r.update(ranks=0)),
                       "--out", c.path("report")], code=3))
case("CLI: run --json into a missing directory", "--json .*: directory .* does not exist")(
    lambda c: _cli(c, ["run", "--m", "4", "--json", c.path("missing/r.jsonl")]))


# ---- the GPT (tpmpi.models): one rank's bad input must fail every rank before a collective
GPT_CFG = dict(vocab_size=13, block_size=8, n_layer=1, n_head=4, n_embd=8, n_kv_head=2)


def _gpt(c: Context):
    """A small GPT on the context's grid and a batch of token ids and targets."""
    model = tpmpi.models.GPT(tpmpi.models.GPTConfig(**GPT_CFG), grid=c.grid)
    idx = np.arange(12, dtype=np.int64).reshape(2, 6) % 13
    return model, idx, (idx + 1) % 13


def _gpt_call(c: Context, change: Callable[[np.ndarray, np.ndarray], tuple]):
    model, idx, targets = _gpt(c)
    if c.odd or c.size == 1:
        idx, targets = change(idx.copy(), targets.copy())
    return lambda: model(idx, targets)


def _set(a: np.ndarray, value: int) -> np.ndarray:
    a[0, 0] = value
    return a


case("GPT: n_kv_head does not divide n_head", "n_kv_head=3: expected a divisor of n_head=4")(
    lambda c: lambda: tpmpi.models.GPTConfig(13, 8, 1, 4, 8, n_kv_head=3))
case("GPT: n_embd not a multiple of n_head", "n_embd=10: expected a multiple of n_head=4")(
    lambda c: lambda: tpmpi.models.GPTConfig(13, 8, 1, 4, 10))
case("GPT: T above block_size on one rank", r"idx.shape=\(2, 9\): expected .*block_size=8")(
    lambda c: _gpt_call(c, lambda i, t: (np.zeros((2, 9), np.int64),
                                         np.zeros((2, 9), np.int64))))
case("GPT: a token id outside the vocabulary on one rank", r"idx contains 13: expected token ids")(
    lambda c: _gpt_call(c, lambda i, t: (_set(i, 13), t)))
case("GPT: targets of another shape on one rank", r"targets.shape=\(2, 5\): expected \(2, 6\)")(
    lambda c: _gpt_call(c, lambda i, t: (i, t[:, :5])))
case("GPT: idx differs across the TP group", "idx differs across the ranks of the TP group", 2)(
    lambda c: _gpt_call(c, lambda i, t: (_set(i, 5), t)))
case("GPT: a state dict without a key on one rank", r"sd is missing 'transformer.ln_f.bias'")(
    lambda c: (lambda sd: lambda: tpmpi.models.GPT.from_state_dict(
        sd, tpmpi.models.GPTConfig(**GPT_CFG), grid=c.grid))(
        {k: v for k, v in _gpt(c)[0].state_dict().items()
         if not (k == "transformer.ln_f.bias" and (c.odd or c.size == 1))}))
case("GPT: backward before forward", r"backward\(\) called before forward")(
    lambda c: _gpt(c)[0].backward)


# ---- hybrid dp x tp: a fault on one replica (mesh dp=2, TP the rest; dp=P on odd P)
def _mesh(c: Context) -> tpmpi.Mesh:
    """dp=2 replicas of P/2 TP ranks (P odd: P replicas of one rank)."""
    return tpmpi.Mesh(c.comm, dp=2 if c.size % 2 == 0 else c.size)


def _dp_model(c: Context, **options) -> tpmpi.DataParallel:
    """A DataParallel MLP on :func:`_mesh` after one step."""
    mesh = _mesh(c)
    model = tpmpi.DataParallel(tpmpi.ParallelMLP(5, 8, grid=mesh.tp, **options), mesh,
                               bucket_bytes=1)
    model.backward(np.ones_like(model(c.X)))
    return model


def _dp_nan(c: Context):
    model = _dp_model(c, check_finite=True)
    dy = np.ones_like(model(c.X))
    dy[0, 0] = np.nan if c.odd else 1.0
    return lambda: model.backward(dy)


case("DataParallel: NaN in dy on one replica (check_finite=True)",
     r"in the TP group of DP replica \d: dy has 1 non-finite value", 2)(_dp_nan)


def _dp_fault(fault: str) -> Callable[[Context], Callable[[], object]]:
    """A DataParallel backward with ``fault`` on the last rank: "replicated" (check_replicated,
    dy differs there) or "reassigned" (its fc1.grad_weight replaced by a new array)."""
    def make(c: Context):
        model = _dp_model(c, check_replicated=fault == "replicated")
        dy = np.ones_like(model(c.X)) + (c.odd if fault == "replicated" else 0)
        if fault == "reassigned" and c.odd:
            model.module.fc1.grad_weight = np.zeros_like(model.module.fc1.grad_weight)
        return lambda: model.backward(dy)
    return make


case("DataParallel: replicated dy differs inside one TP group (check_replicated=True)",
     r"in the TP group of DP replica 1: dy differs across ranks: .*dy must be replicated", 4)(
    _dp_fault("replicated"))
case("DataParallel: .grad_weight re-assigned on one rank",
     r"ColumnParallelLinear.grad_weight was re-assigned: DataParallel averages", 2)(
    _dp_fault("reassigned"))


def _dp_backward_twice(c: Context):
    model = _dp_model(c)
    dy = np.ones_like(model(c.X))
    model.backward(dy)
    return lambda: model.backward(dy) if c.odd else model(c.X)


case("DataParallel: backward twice on one rank while the others go on to forward",
     r"call differs across ranks: DataParallel forward on ranks? [\d,]+ and DataParallel "
     r"backward on rank \d", 2)(_dp_backward_twice)


def _dp_seeds(c: Context):
    mesh = _mesh(c)
    mlp = tpmpi.ParallelMLP(5, 8, grid=mesh.tp, seed=mesh.dp_rank)
    return lambda: tpmpi.DataParallel(mlp, mesh)


case("DataParallel: replicas built with different seeds",
     r"the replicas' parameters differ from DP rank 0's \(fc1.weight differs on DP rank\(s\) "
     r"1[\d, ]*; .*build them with the same seed", 2)(_dp_seeds)


def _dp_dense(c: Context):
    mesh = _mesh(c)
    mlp = tpmpi.ParallelMLP.from_dense(np.ones((5, 8), np.float32), None,
                                       np.ones((8, 5), np.float32) + np.float32(c.odd), None,
                                       grid=mesh.tp)
    return lambda: tpmpi.DataParallel(mlp, mesh)


case("DataParallel: from_dense with W2 differing on one replica",
     r"the replicas' parameters differ from DP rank 0's \(fc2.weight differs on DP rank", 2)(
    _dp_dense)


# ---- input layouts and buffers: the correct result (checked against float64 on every rank)
def _close(got, want, what: str, tol: float = 1e-5) -> str:
    """"OK: ..." when ``got`` matches ``want`` (float64) on this rank; AssertionError else."""
    err = float(np.abs(np.asarray(got, np.float64) - want).max(initial=0.0)) / max(
        1.0, float(np.abs(want).max(initial=0.0)))
    if not err <= tol:
        raise AssertionError(f"{what}: wrong result, relative error {err:.2e}")
    return f"{what} match the float64 reference"


def _sequence_mlp(c: Context, mesh=None):
    """A sequence-parallel MLP (on ``mesh``'s TP grid, DataParallel, when given), its rows
    X (8, 5) and dY, and the float64 reference of y, dx and dW1 of this rank's rows."""
    rng = np.random.default_rng(3)
    X, dY = (rng.standard_normal((8, 5)) for _ in range(2))
    W1, W2 = rng.standard_normal((5, 8)), rng.standard_normal((8, 5))
    grid = mesh.tp if mesh is not None else c.grid
    mlp = tpmpi.ParallelMLP.from_dense(W1, None, W2, None, grid=grid, mode="sequence",
                                       dtype="float64", activation="relu")
    dp, replica = (mesh.dp, mesh.dp_rank) if mesh is not None else (1, 0)
    rows = [slice(r * 8 // dp, (r + 1) * 8 // dp) for r in range(dp)]
    h = [np.maximum(X[r] @ W1, 0) for r in rows]
    dh = [(dY[r] @ W2.T) * (h[i] > 0) for i, r in enumerate(rows)]
    dW1 = sum(X[r].T @ dh[i] for i, r in enumerate(rows)) / dp
    mine = rows[replica]
    ref = [tpmpi.scatter(a, grid, "rows") for a in (h[replica] @ W2, dh[replica] @ W1.T)]
    x, dy = (tpmpi.scatter(a[mine], grid, "rows") for a in (X, dY))
    model = tpmpi.DataParallel(mlp, mesh) if mesh is not None else mlp
    return model, mlp, x, dy, ref, dW1


def _fortran_sequence(c: Context, dp: bool):
    model, mlp, x, dy, (y_ref, dx_ref), dW1 = _sequence_mlp(c, _mesh(c) if dp else None)

    def call():
        y = model(np.asfortranarray(x))
        dx = model.backward(np.asfortranarray(dy))
        return "; ".join([_close(y, y_ref, "y"), _close(dx, dx_ref, "dx"),
                          _close(mlp.fc1.grad_weight, dW1[mlp.fc1.shard], "dW1")])
    return call


case("sequence MLP: Fortran-ordered x and dy", "^OK: y match .* dW1 match")(
    lambda c: _fortran_sequence(c, False))
case("DataParallel of a sequence MLP: Fortran-ordered x and dy", "^OK: y match .* dW1 match",
     2)(lambda c: _fortran_sequence(c, True))


def _strided_rows(c: Context):
    model, _, x, _, (y_ref, _), _ = _sequence_mlp(c)
    big = np.zeros((2 * x.shape[0], x.shape[1]))
    big[::2] = x
    return lambda: _close(model(big[::2] if c.odd else x), y_ref, "y")


case("sequence MLP: a strided (non-contiguous) row block on one rank", "^OK: y match", 2)(
    _strided_rows)


def _fortran_column_sp(c: Context):
    X = np.random.default_rng(4).standard_normal((7, 5))
    layer = Col.from_dense(c.W.astype(np.float64), None, grid=c.grid, sequence_parallel=True)
    x = tpmpi.scatter(X, c.grid, "rows")
    return lambda: _close(layer(np.asfortranarray(x)), X @ c.W.astype(np.float64), "y")


case("ColumnParallelLinear(sequence_parallel=True): Fortran-ordered x", "^OK: y match")(
    _fortran_column_sp)


def _refilled(c: Context):
    X, dY = c.X.astype(np.float64), c.dY.astype(np.float64)
    layer = Col.from_dense(c.W.astype(np.float64), None, grid=c.grid)
    buffer = X.copy()

    def call():
        layer(buffer)
        buffer[...] = 1e3  # a data loader's next batch, written into the same buffer
        layer.backward(dY)
        return _close(layer.grad_weight, (X.T @ dY)[layer.shard], "dW (the forward input's)")
    return call


case("input buffer refilled between forward and backward (a data loader's)",
     r"^OK: dW \(the forward input's\) match")(_refilled)


def _half_partials(c: Context):
    """Every rank's partial sum of X W beyond float16's range (the second half of K cancels
    the first), the sum within it: the serial float16 product is finite."""
    u = np.random.default_rng(5).uniform(0.5, 1.0, (4, 6))
    W = np.concatenate([2000 * u, -1800 * u]).astype(np.float16)
    X = (40 * np.tile(np.random.default_rng(6).uniform(0.5, 1.0, (3, 4)), 2)).astype(np.float16)
    layer = Row.from_dense(W, None, grid=c.grid)
    want = X.astype(np.float64) @ W.astype(np.float64)
    return lambda: _close(layer(X), want, "y (finite)", tol=2e-3)


case("float16 row-parallel: partial sums beyond 65504, the sum within", r"^OK: y \(finite\)")(
    _half_partials)
# ---- studies
case("TPMPI_THREADS differs across ranks",
     r"TPMPI_THREADS differs across ranks: 1 on ranks? [\d,]+ and 2 on rank \d; every rank "
     r"must run the same BLAS threads", 2)(
    lambda c: lambda: _with_env("TPMPI_THREADS", "2" if c.odd else "1",
                                lambda: tpmpi.configure_blas_threads(c.comm)))
case("CLI: run --json to a file that fills up during the run (/dev/full; exit 3)",
     r"--json /dev/full: No space left on device: the records from then on are printed on "
     r"stdout")(
    lambda c: _cli(c, ["run", "--m", "4", "--k", "4", "--n", "4", "--iters", "1", "--json",
                       "/dev/full"], code=3))
case("CLI: bench --collective -f nan", r"-f nan: need 1 <= b <= e and a finite f > 1")(
    lambda c: _cli(c, ["bench", "--collective", "allreduce", "-b", "8", "-e", "64", "-f",
                       "nan"]))
case("CLI: report of a record with a string median (exit 3)",
     r"str.jsonl:1: field 'time_s.median' is '1ms': expected a positive number")(
    lambda c: _cli(c, ["report", _record(c, "str.jsonl", lambda r: r["time_s"].update(
        median="1ms")), "--out", c.path("report")], code=3))
case("CLI: report of a record with a negative median (exit 3)",
     r"neg.jsonl:1: field 'time_s.median' is -0.001: expected a positive number")(
    lambda c: _cli(c, ["report", _record(c, "neg.jsonl", lambda r: r["time_s"].update(
        median=-1e-3)), "--out", c.path("report")], code=3))


def _table_width(c: Context):
    def call():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            cli.main(["run", "--scheme", "mlp", "--m", "8", "--k", "8", "--n", "8", "--iters",
                      "1"], c.comm)
        widest = c.comm.bcast(max(map(len, out.getvalue().splitlines()), default=0), root=0)
        if widest > 120:
            raise AssertionError(f"run's table is {widest} columns wide")
        return f"run's table is {widest} columns wide"
    return call


case("CLI: run's table fits 120 columns", r"^OK: run's table is \d+ columns wide")(
    _table_width)


@dataclass
class Result:
    label: str
    message: Optional[str]  # "Type: text" as rank 0 saw it; None if nothing was raised
    seconds: float  # max over ranks
    same_everywhere: bool
    as_expected: bool  # a ValueError on every rank, or a result case's "OK: ..." on every rank


def run_case(c: Context, item: Case) -> Result:
    """Set up ``item``, time the failing call on every rank, compare the messages."""
    fn = item.make(c)
    c.comm.Barrier()
    start = time.perf_counter()
    ok = False
    try:
        out = fn()
        ok = isinstance(out, str)  # a result case's "what matched"
        message = f"OK: {out}" if ok else None
    except Exception as exc:  # noqa: BLE001 - we report whatever the user would see
        message = f"{type(exc).__name__}: {exc}"
        ok = isinstance(exc, ValueError)
    seconds = c.comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
    messages = c.comm.allgather(message)
    return Result(item.label, messages[0], seconds, len(set(messages)) == 1,
                  c.comm.allreduce(ok, op=MPI.LAND))


def run_all(comm: MPI.Comm, tmpdir: str) -> list[Result]:
    """Every case that applies at ``comm``'s size. Collective."""
    c = Context(comm, tmpdir)
    try:
        return [run_case(c, item) for item in applicable(comm.Get_size())]
    finally:
        c.grid.free()


def applicable(size: int) -> list[Case]:
    """The cases that run at world size ``size``."""
    return [item for item in CASES if size >= item.min_ranks]


def main(argv: Optional[list] = None) -> int:
    """``bad_inputs.py [WORDS]``: every case, or those whose label contains one of WORDS."""
    words = sys.argv[1:] if argv is None else argv
    comm = MPI.COMM_WORLD
    tmpdir = comm.bcast(tempfile.mkdtemp(prefix="tpmpi-bad-") if comm.Get_rank() == 0 else None)
    if words:
        CASES[:] = [item for item in CASES if any(w in item.label for w in words)]
    try:
        results = run_all(comm, tmpdir)
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if comm.Get_rank() == 0:
        print(f"{comm.Get_size()} ranks\n")
        print("| input | message or result (every rank) | time (s) |")
        print("|---|---|---|")
        for r in results:
            msg = (r.message or "NOT RAISED").replace("|", "\\|")
            flag = "" if r.same_everywhere else " **(differs across ranks)**"
            print(f"| {r.label} | {msg}{flag} | {r.seconds:.3f} |")
    ok = all(r.message and r.same_everywhere and r.as_expected for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    launch.run(main, "bad_inputs.py")
