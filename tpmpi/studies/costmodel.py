"""Alpha-beta-gamma cost model: per-scheme predictions, calibration file, layout planning.

Collectives (``S`` = nccl-tests size in bytes: the full gathered / reduced array) cost
``T = lat(op, P) * alpha + bw(op, P) * S * beta``, with the ring formulas of algorithms.md §4.1
that the operation table :mod:`tpmpi.core.colltable` lists next to the collective's other facts.

``alpha`` (s) and ``beta`` (s/byte) are fitted per collective and communicator size by
:mod:`tpmpi.studies.collbench`; a size without a fit uses the nearest fitted size's values (the
formula carries the P dependence). Local GEMMs take ``2 m k n / rate`` with ``rate`` (flop/s,
"gamma") per backend:dtype and shape class (:func:`gemm_class`); "thin" GEMMs (a dimension
below 64, e.g. few tokens) are memory-bound and take ``(m k + k n + m n) b / rate`` with
``rate`` in bytes/s. Without a calibration file the documented defaults (:data:`DEFAULT_ALPHA`,
:data:`DEFAULT_BETA`, :data:`DEFAULT_RATES`, :data:`DEFAULT_STAGING`) apply. A dtype the
calibration lacks takes the same backend's float32 rates (never another backend's).

GPUs (:mod:`tpmpi.studies.collbench` calibrates CuPy per dtype on one rank per device, and the
pinned host<->device copy bandwidth): ``sharing`` ranks on one device time-slice it, so each local
product and each copy takes ``sharing`` times as long. Without GPU-aware MPI a collective is
staged (:func:`tpmpi.core.colltable.staged_bytes` down and up, MPI on host buffers in between)
through the staging pipeline of pieces of :data:`tpmpi.core.staging.STAGING_CHUNK_BYTES`:
``T = max(D, M, U) + (D + M + U - max) / n`` for copy-down time D, MPI time M and copy-up
time U over n pieces.

Per-scheme costs (algorithms.md §4.3; ``b`` = bytes per element, backward adds the dX and dW
GEMMs and the collectives listed):

* column: GEMM (M, K, N/P) + AG(M N b); ``chunks`` c pipelines c row blocks (the gather of
  block i overlaps the GEMM of block i+1). Backward: AR(M K b) of dX overlapped with the dW GEMM.
* row: GEMM (M, K/P, N) + AR(M N b); backward AG(M K b) of dX.
* mlp (megatron): column GEMM (M, K, H/P), row GEMM (M, H/P, N) + AR(M N b); backward
  AR(M K b) of dX overlapped with fc1's dW GEMM. ``mode="book"``: two column GEMMs with an AG
  after each (M H b, M N b) and two ARs backward (each overlapped with its dW GEMM).
  ``mode="sequence"``: AG(M K b) of the input rows before fc1 and RS(M N b) after fc2 (the AR's
  two halves); backward AG(M N b) of dY, the re-gather AG(M K b) of X overlapped with fc1's dX
  GEMM and RS(M K b) of dX overlapped with its dW GEMM; the block's input and output take
  M/P rows per rank. ``mode="tile2d"``: two tile2d layers (below) on the grid.
* data parallelism (``dp`` replicas of a TP group of P/dp ranks): every TP cost above with the
  replica's M/dp rows; backward adds the Allreduce over the ``dp`` replicas of each rank's
  gradient bytes, in buckets as :class:`tpmpi.DataParallel` forms them (``bucket_bytes``):
  a bucket starts when its last layer's gradients are final and the buckets run one after
  another, so a bucket of fc2's gradients hides behind fc1's backward; what runs past the end
  of backward is exposed (all of it with ``overlap=False``). This assumes the MPI library
  progresses the Iallreduce while the GEMMs run; without an asynchronous progress thread it
  moves mostly during the other MPI calls, which ``--measure-overlap`` shows.
* tile2d on pr x pc, gather form: AG_row(M/pr K b) + AG_col(K N/pc b) + GEMM (M/pr, K, N/pc);
  backward (forward panels cached) RS_row(M/pr K b) + RS_col(K N/pc b). ``panel`` kb: K/kb
  steps of Bcast_row(M/pr kb b) + Bcast_col(kb N/pc b), double-buffered, overlapped with the
  step GEMMs; panel memory 2 (M/pr + N/pc) kb instead of (M/pr + N/pc) K.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from ..core.colltable import bw_factor, lat_factor, sent_bytes, staged_bytes
from ..core.dtypes import resolve_dtype
from ..core.grid import factorisations
from ..core.partition import largest_block
from ..core.staging import STAGING_CHUNK_BYTES
from ..core.tiling import panel_workspace_bytes
from ..layers.column import chunk_bounds
from ..layers.data_parallel import BUCKET_BYTES
from .calfile import check_calibration
from .problem import Problem, options_label

CLASS_SHAPES = {"thin": (16, 2048, 2048), "small": (256, 256, 256),
                "medium": (1024, 1024, 1024), "large": (1536, 1536, 1536)}


def gemm_class(m: int, k: int, n: int) -> str:
    """Shape class of a local GEMM: "thin" (a dimension < 64), else by flops "small" (< 1e8),
    "medium" (< 4e9), "large"."""
    if min(m, k, n) < 64:
        return "thin"
    flops = 2.0 * m * k * n
    return "small" if flops < 1e8 else "medium" if flops < 4e9 else "large"


# Documented defaults: one core of a current x86 CPU with AVX2/FMA (OpenBLAS, measured on the
# team's machine), shared-memory MPI, and a datacenter GPU. NumPy float16/bfloat16 products run
# as float32 BLAS (tpmpi.core.gemm): they take the float32 rates.
DEFAULT_ALPHA = 5e-6          # s per message
DEFAULT_BETA = 1 / 5e9        # s per byte (5 GB/s)
DEFAULT_RATES = {             # per rank: "thin" bytes/s of operands, the others flop/s
    "numpy:float64": {"thin": 8e9, "small": 30e9, "medium": 55e9, "large": 60e9},
    "numpy:float32": {"thin": 10e9, "small": 60e9, "medium": 110e9, "large": 120e9},
    "cupy:float64": {"thin": 1.5e12, "small": 5e12, "medium": 30e12, "large": 50e12},
    "cupy:float32": {"thin": 1.5e12, "small": 10e12, "medium": 40e12, "large": 50e12},
    "cupy:float16": {"thin": 1.5e12, "small": 50e12, "medium": 300e12, "large": 500e12},
    "cupy:bfloat16": {"thin": 1.5e12, "small": 50e12, "medium": 300e12, "large": 500e12},
}
DEFAULT_STAGING = {"d2h": 20e9, "h2d": 20e9}  # bytes/s of pinned copies (a PCIe Gen4/5 link)
GPU_CLASS_SHAPES = {"thin": (16, 8192, 8192), "small": (256, 256, 256),
                    "medium": (1024, 1024, 1024), "large": (8192, 8192, 8192)}
"""Shapes at which a GPU's rates are measured: "large" at the size of real runs (a GPU reaches
its rate only on big products)."""


def gemm_work(m: int, k: int, n: int, itemsize: int) -> float:
    """What a GEMM's rate divides: operand bytes for "thin" shapes, else flops."""
    if gemm_class(m, k, n) == "thin":
        return float(m * k + k * n + m * n) * itemsize
    return 2.0 * m * k * n


@dataclasses.dataclass
class Calibration:
    """Fitted parameters: ``alpha[op][P]`` (s), ``beta[op][P]`` (s/byte),
    ``rates["backend:dtype"][class]`` (flop/s; bytes/s for "thin"), ``staging["d2h"|"h2d"]``
    (bytes/s of one device's pinned copies), and the facts of the machine they came from."""

    alpha: dict = dataclasses.field(default_factory=dict)
    beta: dict = dataclasses.field(default_factory=dict)
    rates: dict = dataclasses.field(default_factory=lambda: json.loads(json.dumps(DEFAULT_RATES)))
    machine: dict = dataclasses.field(default_factory=lambda: {"source": "defaults"})
    staging: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_STAGING))

    def _nearest(self, table: dict, op: str, p: int, default: float) -> float:
        """``table[op]`` at the fitted size nearest ``p`` (keys are str(P), as in JSON)."""
        sizes = sorted(int(q) for q in table.get(op, {}))
        if not sizes:
            return default
        i = bisect.bisect_left(sizes, p)
        near = min(sizes[max(0, i - 1):i + 1], key=lambda q: abs(q - p))
        return float(table[op][str(near)])

    def collective(self, op: str, p: int, nbytes: float) -> float:
        """Predicted seconds of ``op`` with nccl-tests size ``nbytes`` over ``p`` ranks."""
        if p <= 1:
            return 0.0
        a = self._nearest(self.alpha, op, p, DEFAULT_ALPHA)
        b = self._nearest(self.beta, op, p, DEFAULT_BETA)
        return lat_factor(op, p) * a + bw_factor(op, p) * nbytes * b

    def _rates(self, dtype: str, backend: str) -> dict:
        """Rates of ``backend:dtype``: calibrated, else the default, else the backend's
        float32 ones (calibrated or default)."""
        for key in (f"{backend}:{dtype}", f"{backend}:float32"):
            rates = self.rates.get(key) or DEFAULT_RATES.get(key)
            if rates:
                return rates
        return DEFAULT_RATES["numpy:float32"]

    def gemm(self, m: int, k: int, n: int, dtype: str, backend: str = "numpy") -> float:
        """Predicted seconds of one local (m, k) @ (k, n) product."""
        if min(m, k, n) <= 0:
            return 0.0
        rates = self._rates(dtype, backend)
        return gemm_work(m, k, n, resolve_dtype(dtype).itemsize) / rates[gemm_class(m, k, n)]

    def memory_time(self, nbytes: float, dtype: str, backend: str = "numpy") -> float:
        """Seconds to stream ``nbytes`` through memory (the "thin" GEMM rate, bytes/s)."""
        return nbytes / self._rates(dtype, backend)["thin"]

    def staged_collective(self, op: str, p: int, nbytes: float, sharing: float = 1.0) -> float:
        """Predicted seconds of ``op`` staged through host memory: copies down and up
        (:func:`tpmpi.core.colltable.staged_bytes`, at the calibrated pinned bandwidth divided by
        the ``sharing`` ranks of one device) and MPI on host buffers, pipelined over pieces of
        :data:`tpmpi.core.staging.STAGING_CHUNK_BYTES` (see the module docstring)."""
        if p <= 1:
            return 0.0
        down, up = staged_bytes(op, p, nbytes)
        d = down * sharing / self.staging.get("d2h", DEFAULT_STAGING["d2h"])
        u = up * sharing / self.staging.get("h2d", DEFAULT_STAGING["h2d"])
        m = self.collective(op, p, nbytes)
        pieces = max(1.0, math.ceil(max(down, up) / STAGING_CHUNK_BYTES))
        top = max(d, m, u)
        return top + (d + m + u - top) / pieces

    def to_json(self) -> dict:
        return {"machine": self.machine, "alpha": self.alpha, "beta": self.beta,
                "rates": self.rates, "staging": self.staging}

    @classmethod
    def from_json(cls, data: Any, where: str = "calibration") -> Calibration:
        """The calibration a ``calibrate`` file holds, checked field by field first
        (:func:`tpmpi.studies.calfile.check_calibration`: ValueError ``"<where>: field
        'alpha.allgather.2' is ...: expected ..."``)."""
        check_calibration(data, where, classes=tuple(CLASS_SHAPES),
                          staging=tuple(DEFAULT_STAGING))
        rates = json.loads(json.dumps(DEFAULT_RATES))
        rates.update(data["rates"])
        return cls(alpha=data["alpha"], beta=data["beta"], rates=rates, machine=data["machine"],
                   staging={**DEFAULT_STAGING, **data.get("staging", {})})


def load_calibration(path: Optional[str] = None) -> Calibration:
    """The calibration in ``path``, else in env ``TPMPI_CALIBRATION``, else the defaults.
    ValueError naming the file and the problem (unreadable, not JSON with its line, or the
    first bad field: :meth:`Calibration.from_json`)."""
    path = path or os.environ.get("TPMPI_CALIBRATION")
    if not path:
        return Calibration()
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ValueError(f"calibration {path!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # json's own message names the line and column
        raise ValueError(f"calibration {path!r}: not JSON ({exc})") from None
    return Calibration.from_json(data, f"calibration {path!r}")


def fit_alpha_beta(op: str, p: int, sizes: Sequence[float], times: Sequence[float]
                   ) -> tuple[float, float]:
    """Least-squares ``(alpha, beta) >= 0`` of ``t = lat * alpha + bw * S * beta`` over the
    measured ``(S, t)`` pairs, weighted by 1/t so small and large messages count alike."""
    s = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    w = 1.0 / np.maximum(t, 1e-9)
    design = np.stack([np.full_like(s, lat_factor(op, p)), bw_factor(op, p) * s], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design * w[:, None], t * w, rcond=None)
    if alpha < 0 or beta < 0:  # refit the other term alone
        col = 1 if alpha < 0 else 0
        x = design[:, col] * w
        val = max(float(x @ (t * w) / (x @ x)), 0.0) if x @ x > 0 else 0.0
        alpha, beta = (0.0, val) if col == 1 else (val, 0.0)
    return float(alpha), float(beta)


# --------------------------------------------------------------------------- predictions


@dataclasses.dataclass
class Prediction:
    """One layout's predicted cost per rank (seconds, bytes)."""

    scheme: str
    grid: tuple
    options: dict
    compute_s: float
    comm_s: float          # exposed (not overlapped) communication
    time_s: float
    bytes_per_rank: float  # bytes sent per rank
    mem_bytes: float       # operands and buffers held per rank
    dp: int = 1            # data-parallel replicas (grid is one replica's TP grid)
    dp_comm_s: float = 0.0       # exposed part of the DP gradient Allreduce (in comm_s)
    dp_allreduce_s: float = 0.0  # the DP Allreduce of all buckets, hidden or not

    @property
    def label(self) -> str:
        """The layout predicted, as :func:`layout_label` prints it."""
        return layout_label(self.scheme, self.grid, self.dp, self.options)

    @property
    def tp_comm_s(self) -> float:
        """Exposed tensor-parallel communication."""
        return self.comm_s - self.dp_comm_s


def layout_label(scheme: str, grid: Sequence, dp: int = 1,
                 options: Optional[Mapping] = None) -> str:
    """``"scheme RxC[ dp=D][ options]"`` (:func:`tpmpi.studies.problem.options_label`), as plan and
    report print layouts."""
    opts = options_label(options or {})
    return f"{scheme} {grid[0]}x{grid[1]}" + (f" dp={dp}" if dp > 1 else "") \
        + (f" {opts}" if opts else "")


class _Tally:
    """Accumulates GEMMs, collectives and overlap for one prediction; collectives are staged
    through the host when ``staged`` (``sharing`` ranks per device share its copy link)."""

    def __init__(self, cal: Calibration, dtype: str, backend: str, staged: bool = False,
                 sharing: float = 1.0):
        self.cal, self.dtype, self.backend = cal, dtype, backend
        self.staged, self.sharing = staged, sharing
        self.b = resolve_dtype(dtype).itemsize
        self.compute = self.comm = self.sent = 0.0
        self.ready: list[tuple[list[float], float, float]] = []

    def grads_final(self, *elements: float) -> None:
        """A layer's gradients (element counts, bias then weight) are final now: recorded
        with the compute and communication time so far, for the DP model."""
        self.ready.append(([e * self.b for e in elements], self.compute, self.comm))

    def gemm(self, m: int, k: int, n: int) -> float:
        t = self.cal.gemm(m, k, n, self.dtype, self.backend)
        self.compute += t
        return t

    def ctime(self, op: str, p: int, nbytes: float) -> float:
        """Seconds of one collective of ``nbytes`` (nccl-tests S), staged or not."""
        if self.staged:
            return self.cal.staged_collective(op, p, nbytes, self.sharing)
        return self.cal.collective(op, p, nbytes)

    def coll(self, op: str, p: int, elements: float, hidden_behind: float = 0.0) -> float:
        """Collective of ``elements`` (nccl-tests S in elements); ``hidden_behind`` seconds of
        concurrent local work hide that much of it."""
        t = self.ctime(op, p, elements * self.b)
        self.sent += sent_bytes(op, p, elements * self.b)
        self.comm += max(0.0, t - hidden_behind)
        return t


def _column(t: _Tally, m: int, k: int, n: int, p: int, backward: bool,
            chunks: Optional[int]) -> float:
    np_ = largest_block(n, p)
    c = len(chunk_bounds(m, int(chunks or 1)))  # the layer's chunking (whole BLAS blocks)
    mc = largest_block(m, c)
    g = t.cal.gemm(mc, k, np_, t.dtype, t.backend)
    a = t.ctime("allgather", p, mc * n * t.b)
    t.compute += c * g
    t.sent += c * sent_bytes("allgather", p, mc * n * t.b)
    # pipeline: first GEMM, then c-1 stages of max(gemm, gather), then the last gather
    exposed = (c - 1) * max(0.0, a - g) + a if c > 1 else a
    t.comm += exposed
    if backward:
        t.gemm(m, np_, k)
        dw = t.gemm(k, m, np_)
        t.coll("allreduce", p, m * k, hidden_behind=dw)
        t.grads_final(np_, k * np_)
    return (m * k + k * np_ + m * n + (m * np_ if c == 1 else 2 * mc * np_)) * t.b


def _row(t: _Tally, m: int, k: int, n: int, p: int, backward: bool) -> float:
    kp = largest_block(k, p)
    t.gemm(m, kp, n)
    t.coll("allreduce", p, m * n)
    if backward:
        t.gemm(m, n, kp)
        t.gemm(kp, m, n)
        t.coll("allgather", p, m * k)
        t.grads_final(n, kp * n)
    return (m * k + kp * n + m * n) * t.b


def _mlp_tile2d(t: _Tally, m: int, k: int, n: int, h: int, pr: int, pc: int, backward: bool
                ) -> float:
    """The tile2d FFN: two tile2d layers on the pr x pc grid; gradients are final for fc2,
    then fc1."""
    mem = _tile2d(t, m, k, h, pr, pc, False, None) + _tile2d(t, m, h, n, pr, pc, False, None)
    if backward:
        for kk, nn in ((h, n), (k, h)):  # fc2, then fc1
            mem = max(mem, _tile2d_backward(t, m, kk, nn, pr, pc))
            t.grads_final(largest_block(nn, pc), largest_block(kk, pr) * largest_block(nn, pc))
    return mem


def _mlp(t: _Tally, m: int, k: int, n: int, h: int, p: int, backward: bool, mode: str,
         overlap: bool = True) -> float:
    """The FFN in a 1D ``mode`` (megatron, book, sequence) on ``p`` ranks; gradients are final
    for fc2, then fc1."""
    hp, np_ = largest_block(h, p), largest_block(n, p)
    mr = largest_block(m, p)  # rows per rank of the block's input and output (sequence)

    def during(op: str, elements: float, gemm: tuple) -> None:
        """``op`` overlapped with a GEMM (when ``overlap``)."""
        g = t.gemm(*gemm)
        t.coll(op, p, elements, hidden_behind=g if overlap else 0.0)

    if mode == "sequence":
        t.coll("allgather", p, m * k)
    t.gemm(m, k, hp)
    if mode == "book":
        t.coll("allgather", p, m * h)
        t.gemm(m, h, np_)
        t.coll("allgather", p, m * n)
    else:
        t.gemm(m, hp, n)
        t.coll("reduce_scatter" if mode == "sequence" else "allreduce", p, m * n)
    if backward:
        if mode == "book":  # fc2 column-parallel: dH partial sums all-reduced during dW
            t.gemm(m, np_, h)
            during("allreduce", m * h, (h, m, np_))
            t.grads_final(np_, h * np_)
        else:  # fc2 row-parallel: local once dY is whole
            if mode == "sequence":
                t.coll("allgather", p, m * n)
            t.gemm(m, n, hp)
            t.gemm(hp, m, n)
            t.grads_final(n, hp * n)
        if mode == "sequence":  # X's rows gathered again during fc1's dX GEMM
            during("allgather", m * k, (m, hp, k))
        else:
            t.gemm(m, hp, k)
        during("reduce_scatter" if mode == "sequence" else "allreduce", m * k, (k, m, hp))
        t.grads_final(hp, k * hp)
    w = (k * hp + (h * np_ if mode == "book" else hp * n)) * t.b
    if mode == "book":
        act = m * k + m * h + m * n
    elif mode == "sequence":
        act = mr * k + 2 * m * hp + mr * n
    else:
        act = m * k + 2 * m * hp + m * n
    return w + act * t.b


def _tile2d_backward(t: _Tally, m: int, k: int, n: int, pr: int, pc: int) -> float:
    """tile2d backward (forward panels cached): the dX and dW GEMMs and their reduce-scatters;
    returns the panel workspace."""
    mr, nc = largest_block(m, pr), largest_block(n, pc)
    t.gemm(mr, nc, k)
    t.gemm(k, mr, nc)
    t.coll("reduce_scatter", pc, mr * k)
    t.coll("reduce_scatter", pr, k * nc)
    return 2 * (mr + nc) * k * t.b


def _tile2d(t: _Tally, m: int, k: int, n: int, pr: int, pc: int, backward: bool,
            panel: Optional[int]) -> float:
    mr, nc = largest_block(m, pr), largest_block(n, pc)
    kr, kc = largest_block(k, pr), largest_block(k, pc)
    own = (mr * kc + kr * nc + mr * nc) * t.b
    if panel:
        kb = max(1, min(int(panel), max(k, 1)))
        steps = -(-k // kb)
        g = t.cal.gemm(mr, kb, nc, t.dtype, t.backend)
        bc = t.ctime("bcast", pc, mr * kb * t.b) + t.ctime("bcast", pr, kb * nc * t.b)
        # each panel after the first adds its (mr, nc) product into Y: one more read and
        # write of Y and of the temporary, at the memory rate ("thin" class)
        t.compute += steps * g + (steps - 1) * t.cal.memory_time(3 * mr * nc * t.b, t.dtype,
                                                                   t.backend)
        t.sent += steps * (sent_bytes("bcast", pc, mr * kb * t.b)
                           + sent_bytes("bcast", pr, kb * nc * t.b))
        t.comm += bc + (steps - 1) * max(0.0, bc - g)  # first panel exposed, rest overlapped
        panels: float = panel_workspace_bytes(mr, nc, kb, t.b)
    else:
        t.coll("allgather", pc, mr * k)
        t.coll("allgather", pr, k * nc)
        t.gemm(mr, k, nc)
        panels = (mr + nc) * k * t.b
    if backward:
        panels = max(panels, _tile2d_backward(t, m, k, n, pr, pc))
        t.grads_final(nc, kr * nc)
    return own + panels


MODELLED = ("column", "row", "mlp", "tile2d")


def square_grid(p: int) -> tuple[int, int]:
    """The most nearly square ``(pr, pc)`` with ``pr <= pc`` and ``pr * pc == p``."""
    pr = max(r for r in range(1, math.isqrt(p) + 1) if p % r == 0)
    return pr, p // pr


def _dp_allreduce(t: _Tally, dp: int, bucket_bytes: int, overlap: bool,
                  slowdown: float) -> tuple[float, float]:
    """``(exposed, total)`` seconds of the DP gradient Allreduce over ``dp`` replicas: the
    gradients recorded by :meth:`_Tally.grads_final` in buckets of at least ``bucket_bytes``
    (as :class:`tpmpi.DataParallel` forms them), each started when its gradients are final
    (after backward without ``overlap``), one after another. ``slowdown`` scales the recorded
    compute times (oversubscription)."""
    end = t.compute * slowdown + t.comm
    buckets: list[list[float]] = []  # [bytes, time its gradients are final]
    for sizes, compute, comm in t.ready:
        for size in sizes:
            if not buckets or buckets[-1][0] >= bucket_bytes:
                buckets.append([0.0, 0.0])
            buckets[-1][0] += size
            buckets[-1][1] = compute * slowdown + comm
    clock = total = 0.0
    for size, ready in buckets:
        took = t.ctime("allreduce", dp, size)
        clock = max(clock, ready if overlap else end) + took
        total += took
        t.sent += sent_bytes("allreduce", dp, size)
    return max(0.0, clock - end), total


def predict(problem: Problem, ranks: int, grid: Optional[Sequence[int]] = None,
            calibration: Optional[Calibration] = None, backend: str = "numpy",
            oversubscription: float = 1.0, staged: bool = False, *, dp: int = 1,
            bucket_bytes: int = BUCKET_BYTES) -> Optional[Prediction]:
    """Predicted time of ``problem`` (its scheme, m, k, n, hidden, dtype, backward, options)
    on ``ranks`` ranks: ``dp`` data-parallel replicas (each taking M/dp rows;
    :func:`_dp_allreduce` in backward) of a TP group arranged as ``grid``
    (default 1 x ranks/dp, or the most square grid for tile2d and the tile2d FFN).
    ``oversubscription`` (BLAS threads of a node's ranks per core, or ranks per GPU, when above
    1) slows every local product by that factor, and on a GPU every staging copy: the rates
    are calibrated with the cores, or one rank per device, to themselves. ``staged``:
    collectives go through host memory (a GPU without GPU-aware MPI). None for a scheme the
    model does not know."""
    cal = calibration or Calibration()
    dp = int(dp)
    p = int(ranks) // dp
    scheme, opts = problem.scheme, dict(problem.options)
    if scheme not in MODELLED:
        return None
    mode = opts.get("mode", "megatron")
    if grid is None:
        two_d = scheme == "tile2d" or (scheme == "mlp" and mode == "tile2d")
        grid = square_grid(p) if two_d else (1, p)
    pr, pc = (int(g) for g in grid)
    slowdown = max(1.0, float(oversubscription))
    t = _Tally(cal, problem.dtype, backend, staged, slowdown)
    m, k, n, bwd = largest_block(problem.m, dp), problem.k, problem.n, problem.backward
    overlap = opts.get("overlap", True) is not False
    if scheme == "column":
        mem = _column(t, m, k, n, p, bwd, opts.get("chunks"))
    elif scheme == "row":
        mem = _row(t, m, k, n, p, bwd)
    elif scheme == "mlp" and mode == "tile2d":
        mem = _mlp_tile2d(t, m, k, n, problem.d_hidden, pr, pc, bwd)
    elif scheme == "mlp":
        mem = _mlp(t, m, k, n, problem.d_hidden, p, bwd, mode, overlap)
    else:
        mem = _tile2d(t, m, k, n, pr, pc, bwd, opts.get("panel"))
    dp_exposed, dp_total = _dp_allreduce(t, dp, bucket_bytes, overlap, slowdown) \
        if bwd and dp > 1 else (0.0, 0.0)
    compute, comm = t.compute * slowdown, t.comm + dp_exposed
    return Prediction(scheme=scheme, grid=(pr, pc), options=opts, compute_s=compute,
                      comm_s=comm, time_s=compute + comm, bytes_per_rank=t.sent,
                      mem_bytes=mem, dp=dp, dp_comm_s=dp_exposed, dp_allreduce_s=dp_total)


def candidates(m: int, k: int, n: int, ranks: int, hidden: Optional[int] = None
               ) -> Iterable[tuple[str, tuple[int, int], dict, int]]:
    """Every layout :func:`plan` considers: (scheme, TP grid, options, dp) for every ``dp``
    dividing ``ranks``. FFN (``hidden``): modes megatron, book, sequence on 1 x ranks/dp and
    tile2d on every grid; otherwise the single-GEMM schemes and their options. A TP group of
    one rank has one layout (no communication to choose)."""
    for dp in (d for d in range(1, ranks + 1) if ranks % d == 0):
        p = ranks // dp
        if hidden is not None:
            yield "mlp", (1, p), {}, dp
            if p > 1:
                for mode in ("book", "sequence"):
                    yield "mlp", (1, p), {"mode": mode}, dp
                for grid in factorisations(p):
                    yield "mlp", grid, {"mode": "tile2d"}, dp
            continue
        yield "column", (1, p), {}, dp
        if p == 1 and dp > 1:
            continue
        for c in (2, 4, 8):
            if c <= m:
                yield "column", (1, p), {"chunks": c}, dp
        yield "row", (1, p), {}, dp
        for pr in range(1, p + 1):
            if p % pr == 0:
                yield "tile2d", (pr, p // pr), {}, dp
                for kb in (k // 4, k // 16):
                    if kb >= 1 and kb < k:
                        yield "tile2d", (pr, p // pr), {"panel": kb}, dp


def plan(m: int, k: int, n: int, ranks: int, *, hidden: Optional[int] = None,
         dtype: str = "float32", backward: bool = False, backend: str = "numpy",
         calibration: Optional[Calibration] = None,
         bucket_bytes: int = BUCKET_BYTES) -> list[Prediction]:
    """All candidate layouts (every dp x TP factorisation of ``ranks``, see
    :func:`candidates`) ranked by predicted time (fastest first)."""
    preds = []
    for scheme, grid, opts, dp in candidates(m, k, n, ranks, hidden):
        prob = Problem(scheme=scheme, m=m, k=k, n=n, hidden=hidden, dtype=dtype,
                       backward=backward, options=tuple(sorted(opts.items())))
        pred = predict(prob, ranks, grid, calibration, backend, dp=dp, bucket_bytes=bucket_bytes)
        assert pred is not None, f"the model knows every candidate scheme ({scheme})"
        preds.append(pred)
    return sorted(preds, key=lambda pr: pr.time_s)


def format_plan(preds: Sequence[Prediction]) -> str:
    """A ranked text table of predictions (ms, MiB): exposed TP and DP communication apart."""
    heads = ["order", "layout", "time_ms", "compute_ms", "tp_comm_ms", "dp_comm_ms",
             "sent_MiB/rank", "mem_MiB/rank"]
    rows = [[str(i + 1), p.label, f"{p.time_s * 1e3:.3f}", f"{p.compute_s * 1e3:.3f}",
             f"{p.tp_comm_s * 1e3:.3f}", f"{p.dp_comm_s * 1e3:.3f}",
             f"{p.bytes_per_rank / 2**20:.2f}", f"{p.mem_bytes / 2**20:.2f}"]
            for i, p in enumerate(preds)]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) if i == 1 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(heads, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def _parts(p: Prediction) -> dict[str, float]:
    return {"compute": p.compute_s, "TP communication": p.tp_comm_s,
            "DP communication": p.dp_comm_s}


def _versus(first: Prediction, other: Prediction) -> str:
    """``other`` against ``first``: its time and the component it loses most on."""
    diff = {name: v - _parts(first)[name] for name, v in _parts(other).items()}
    worst = max(diff, key=lambda name: diff[name])
    lost = (other.time_s - first.time_s) * 1e3
    return (f"{other.label} ({other.time_s * 1e3:.3f} ms) loses {lost:.3f} ms, most on {worst} "
            f"(+{diff[worst] * 1e3:.3f} ms)")


def explain(preds: Sequence[Prediction]) -> str:
    """Why the first of ``preds`` (ranked by :func:`plan`) wins: its time split into compute,
    exposed TP and DP communication (and how much of the DP Allreduce backward hides), then the
    runner-up and the best layout with a different number of replicas, each with the component
    it loses most on."""
    if not preds:
        return ""
    first = preds[0]
    text = (f"why {first.label} first: {first.time_s * 1e3:.3f} ms = compute "
            f"{first.compute_s * 1e3:.3f} + TP communication {first.tp_comm_s * 1e3:.3f} + DP "
            f"communication {first.dp_comm_s * 1e3:.3f} ms")
    if first.dp > 1 and first.dp_allreduce_s > 0:
        hidden = first.dp_allreduce_s - first.dp_comm_s
        text += (f" ({hidden * 1e3:.3f} of the {first.dp_allreduce_s * 1e3:.3f} ms gradient "
                 f"Allreduce hidden under backward)")
    if len(preds) > 1:
        text += "; runner-up " + _versus(first, preds[1])
    other = next((p for p in preds[2:] if (p.dp > 1) != (first.dp > 1)), None)
    if other is not None and (preds[1].dp > 1) == (first.dp > 1):
        text += f"; best with {'dp=1' if first.dp > 1 else 'dp>1'} " + _versus(first, other)
    return text + "."
