"""Alpha-beta-gamma cost model of this machine: the calibration file, the machine it describes,
predictions and layout planning.

A prediction prices the schedule a layer lists for a problem (``schedule_for`` of the scheme's
layer class, :data:`tpmpi.studies.footprint.SCHEME_LAYERS`; :meth:`tpmpi.DataParallel.
schedule_for` adds the gradient buckets) with :func:`tpmpi.studies.pricing.price`: there is no
formula per scheme here, so the model describes what the layers run (their operators, their
overlap setting, their chunks and panels) and a new layer or composite is priced as soon as it
lists its schedule. This module supplies the machine (:class:`CalibratedMachine`):

* collectives (``S`` = nccl-tests size in bytes: the full gathered / reduced array) cost
  ``T = lat(op, P) * alpha + bw(op, P) * S * beta``, with the ring formulas of algorithms.md
  §4.1 that the operation table :mod:`tpmpi.core.colltable` lists next to the collective's
  other facts. ``alpha`` (s) and ``beta`` (s/byte) are fitted per collective and communicator
  size by :mod:`tpmpi.studies.collbench`, timing the operators the layers run (the
  ``Alltoallw`` gather into place, MPI's reductions, and for 2-byte floats the exchange of
  slices, fitted apart under :func:`calibration_key`); a size without a fit uses the nearest
  fitted size's values (the formula carries the P dependence);
  A fit made with more ranks on a node than it has cores (``machine.cores_per_node`` and
  ``ranks_per_node`` of the file) timed ranks waiting for a core, not the collective: it is
  used only when no fit at a size without oversubscription exists;
* local work, when the calibration has measured curves for the backend:dtype (its ``local``
  field, :class:`tpmpi.studies.localcurves.LocalCurves`): a product or an element-wise step
  costs one per-step overhead plus the product grid's interpolated time, or its bytes at the
  element-wise curve's seconds per byte at that size;
* otherwise (a calibration from before the curves, or none) local products take
  ``2 m k n / rate`` with ``rate`` (flop/s, "gamma") per backend:dtype
  and shape class (:func:`gemm_class`); "thin" products (a dimension below 64, e.g. few
  tokens) are memory-bound and take ``(m k + k n + m n) b / rate`` with ``rate`` in bytes/s,
  the rate element-wise work streams its bytes at. Without a calibration file the documented
  defaults (:data:`DEFAULT_ALPHA`, :data:`DEFAULT_BETA`, :data:`DEFAULT_RATES`,
  :data:`DEFAULT_STAGING`) apply. A dtype the calibration lacks takes the same backend's
  float32 rates and curves (never another backend's);
* GPUs (:mod:`tpmpi.studies.collbench` calibrates CuPy per dtype on one rank per device, and
  the pinned host<->device copy bandwidth): ``sharing`` ranks on one device time-slice it, so
  each local product and each copy takes ``sharing`` times as long. Without GPU-aware MPI a
  collective is staged (:func:`tpmpi.core.colltable.staged_bytes` down and up, MPI on host
  buffers in between) through the staging pipeline of pieces of
  :data:`tpmpi.core.staging.STAGING_CHUNK_BYTES`: ``T = max(D, M, U) + (D + M + U - max) / n``
  for copy-down time D, MPI time M and copy-up time U over n pieces; nothing overlaps then (the
  layers run their collectives blocking), which the schedule states.

Data parallelism (``dp`` replicas of a TP group of P/dp ranks): the replica's schedule with M/dp
rows plus the Allreduce of each bucket of gradients, started when its gradients are final and
run one after another; what runs past the end of backward is exposed (all of it with
``overlap=False``). This assumes the MPI library progresses the Iallreduce while the GEMMs
run; without an asynchronous progress thread it moves mostly during the other MPI calls,
which ``--measure-overlap`` shows.
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

from ..core.colltable import OPS, bw_factor, lat_factor, staged_bytes
from ..core.comm import HALF
from ..core.dtypes import resolve_dtype
from ..core.grid import factorisations
from ..core.partition import largest_block
from ..core.schedule import Collective, Pointwise, Product, Schedule
from ..core.staging import STAGING_CHUNK_BYTES
from ..layers.data_parallel import BUCKET_BYTES, DataParallel
from .calfile import check_calibration
from .footprint import SCHEME_LAYERS, bytes_per_rank
from .localcurves import LocalCurves, curves_from_json
from . import transformer
from .pricing import price
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
    (bytes/s of one device's pinned copies), ``local["backend:dtype"]`` (measured curves of
    local work, :class:`~tpmpi.studies.localcurves.LocalCurves`; empty in an older file), and
    the facts of the machine they came from."""

    alpha: dict = dataclasses.field(default_factory=dict)
    beta: dict = dataclasses.field(default_factory=dict)
    rates: dict = dataclasses.field(default_factory=lambda: json.loads(json.dumps(DEFAULT_RATES)))
    machine: dict = dataclasses.field(default_factory=lambda: {"source": "defaults"})
    staging: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_STAGING))
    local: dict[str, LocalCurves] = dataclasses.field(default_factory=dict)

    def oversubscribed_fit(self, p: int) -> bool:
        """Whether the fits at ``p`` ranks ran more ranks on a node than it has cores."""
        cores = self.machine.get("cores_per_node")
        per_node = int(self.machine.get("ranks_per_node") or p)
        return cores is not None and min(p, per_node) > int(cores)

    def _nearest(self, table: dict, op: str, p: int, default: float) -> float:
        """``table[op]`` at the fitted size nearest ``p`` (keys are str(P), as in JSON), among
        the sizes fitted without oversubscription when there are any."""
        sizes = sorted(int(q) for q in table.get(op, {}))
        sizes = [q for q in sizes if not self.oversubscribed_fit(q)] or sizes
        if not sizes:
            return default
        i = bisect.bisect_left(sizes, p)
        near = min(sizes[max(0, i - 1):i + 1], key=lambda q: abs(q - p))
        return float(table[op][str(near)])

    def collective(self, op: str, p: int, nbytes: float, key: Optional[str] = None) -> float:
        """Predicted seconds of ``op`` with nccl-tests size ``nbytes`` over ``p`` ranks, with the
        alpha and beta fitted under ``key`` (default ``op``; :func:`calibration_key`), else
        under ``op``."""
        if p <= 1:
            return 0.0
        key = key if key is not None and key in self.alpha and key in self.beta else op
        a = self._nearest(self.alpha, key, p, DEFAULT_ALPHA)
        b = self._nearest(self.beta, key, p, DEFAULT_BETA)
        return lat_factor(op, p) * a + bw_factor(op, p) * nbytes * b

    def _rates(self, dtype: str, backend: str) -> dict:
        """Rates of ``backend:dtype``: calibrated, else the default, else the backend's
        float32 ones (calibrated or default)."""
        for key in (f"{backend}:{dtype}", f"{backend}:float32"):
            rates = self.rates.get(key) or DEFAULT_RATES.get(key)
            if rates:
                return rates
        return DEFAULT_RATES["numpy:float32"]

    def curves(self, dtype: str, backend: str = "numpy") -> Optional[LocalCurves]:
        """The measured local curves of ``backend:dtype``, else of ``backend:float32``, else
        None (the shape-class rates apply)."""
        return self.local.get(f"{backend}:{dtype}") or self.local.get(f"{backend}:float32")

    def gemm(self, m: int, k: int, n: int, dtype: str, backend: str = "numpy") -> float:
        """Predicted seconds of one local (m, k) @ (k, n) product."""
        if min(m, k, n) <= 0:
            return 0.0
        rates = self._rates(dtype, backend)
        return gemm_work(m, k, n, resolve_dtype(dtype).itemsize) / rates[gemm_class(m, k, n)]

    def memory_time(self, nbytes: float, dtype: str, backend: str = "numpy") -> float:
        """Seconds to stream ``nbytes`` through memory (the "thin" GEMM rate, bytes/s)."""
        return nbytes / self._rates(dtype, backend)["thin"]

    def staged_collective(self, op: str, p: int, nbytes: float, sharing: float = 1.0,
                          key: Optional[str] = None) -> float:
        """Predicted seconds of ``op`` staged through host memory: copies down and up
        (:func:`tpmpi.core.colltable.staged_bytes`, at the calibrated pinned bandwidth divided by
        the ``sharing`` ranks of one device) and MPI on host buffers, pipelined over pieces of
        :data:`tpmpi.core.staging.STAGING_CHUNK_BYTES` (see the module docstring)."""
        if p <= 1:
            return 0.0
        down, up = staged_bytes(op, p, nbytes)
        d = down * sharing / self.staging.get("d2h", DEFAULT_STAGING["d2h"])
        u = up * sharing / self.staging.get("h2d", DEFAULT_STAGING["h2d"])
        m = self.collective(op, p, nbytes, key)
        pieces = max(1.0, math.ceil(max(down, up) / STAGING_CHUNK_BYTES))
        top = max(d, m, u)
        return top + (d + m + u - top) / pieces

    def to_json(self) -> dict:
        return {"machine": self.machine, "alpha": self.alpha, "beta": self.beta,
                "rates": self.rates, "staging": self.staging,
                "local": {key: c.to_json() for key, c in self.local.items()}}

    @classmethod
    def from_json(cls, data: Any, where: str = "calibration") -> Calibration:
        """The calibration a ``calibrate`` file holds, checked field by field first
        (:func:`tpmpi.studies.calfile.check_calibration`: ValueError ``"<where>: field
        'alpha.allgather.2' is ...: expected ..."``)."""
        check_calibration(data, where, classes=tuple(CLASS_SHAPES),
                          staging=tuple(DEFAULT_STAGING), collectives=fitted_names())
        rates = json.loads(json.dumps(DEFAULT_RATES))
        rates.update(data["rates"])
        return cls(alpha=data["alpha"], beta=data["beta"], rates=rates, machine=data["machine"],
                   staging={**DEFAULT_STAGING, **data.get("staging", {})},
                   local=curves_from_json(data.get("local"), where))


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


REDUCTIONS = ("allreduce", "reduce_scatter", "reduce")
"""The collectives that :mod:`tpmpi.core.comm` runs as an exchange of slices for 2-byte floats
(``Alltoallv`` + ``Allgatherv`` / ``Gatherv``) instead of MPI's own reduction."""


def calibration_key(op: str, dtype: str) -> str:
    """The name ``op``'s alpha and beta are fitted under for ``dtype``: ``"allreduce.exchange"``
    (and so on for :data:`REDUCTIONS`) for float16 and bfloat16, which take another path, else
    ``op``."""
    return f"{op}.exchange" if op in REDUCTIONS and dtype in HALF else op


def fitted_names() -> tuple[str, ...]:
    """Every name a calibration fits alpha and beta under: the collectives of
    :data:`tpmpi.core.colltable.OPS` and the exchange paths of :data:`REDUCTIONS`."""
    return tuple(OPS) + tuple(calibration_key(op, "float16") for op in REDUCTIONS)


@dataclasses.dataclass(frozen=True)
class CalibratedMachine:
    """This machine as ``calibration`` describes it, for ``backend``: the machine protocol of
    :func:`tpmpi.studies.pricing.price`. ``staged``: collectives go through host memory (a GPU
    without GPU-aware MPI); ``oversubscription`` (BLAS threads of a node's ranks per core, or
    ranks per GPU, when above 1) slows every local product, every element-wise step and, on a
    GPU, every staging copy by that factor: the rates are calibrated with the cores, or one
    rank per device, to themselves."""

    calibration: Calibration
    backend: str = "numpy"
    staged: bool = False
    oversubscription: float = 1.0

    @property
    def _slowdown(self) -> float:
        return max(1.0, float(self.oversubscription))

    def product_s(self, step: Product) -> float:
        curves = self.calibration.curves(step.dtype, self.backend)
        if curves is not None:
            return curves.product_s(step.m, step.k, step.n, step.batch) * self._slowdown
        return step.batch * self.calibration.gemm(step.m, step.k, step.n, step.dtype,
                                                  self.backend) * self._slowdown

    def pointwise_s(self, step: Pointwise) -> float:
        curves = self.calibration.curves(step.dtype, self.backend)
        if curves is not None:
            return curves.pointwise_s(step.nbytes) * self._slowdown
        return self.calibration.memory_time(step.nbytes, step.dtype, self.backend) \
            * self._slowdown

    def collective_s(self, step: Collective) -> float:
        key = calibration_key(step.op, step.dtype)
        if self.staged:
            return self.calibration.staged_collective(step.op, step.size, step.nbytes,
                                                      self._slowdown, key)
        return self.calibration.collective(step.op, step.size, step.nbytes, key)


def square_grid(p: int) -> tuple[int, int]:
    """The most nearly square ``(pr, pc)`` with ``pr <= pc`` and ``pr * pc == p``."""
    pr = max(r for r in range(1, math.isqrt(p) + 1) if p % r == 0)
    return pr, p // pr


def default_grid(problem: Problem, p: int) -> tuple[int, int]:
    """The TP grid a problem runs on by default: the most square grid for tile2d and the tile2d
    FFN, else 1 x ``p``."""
    two_d = problem.scheme == "tile2d" or (problem.scheme == "mlp"
                                           and problem.opts.get("mode") == "tile2d")
    return square_grid(p) if two_d else (1, p)


def schedule_of(problem: Problem, grid: Sequence[int], *, dp: int = 1,
                bucket_bytes: int = BUCKET_BYTES, staged: bool = False) -> Optional[Schedule]:
    """The schedule of one rank of ``problem`` (its scheme's layer class, sizes, dtype, pass
    and options) on the TP ``grid``, ``dp`` replicas each taking M/dp rows (with the DP
    gradient buckets); None for a scheme without a layer class. No communication."""
    opts = dict(problem.options)
    overlap = opts.pop("overlap", True) is not False
    pr, pc = (int(g) for g in grid)
    if transformer.is_transformer(problem):  # dp replicas of whole sequences
        replica = dataclasses.replace(problem, m=problem.m // dp)
        return DataParallel.schedule_for(transformer.schedule(replica, pr * pc), dp,
                                         bucket_bytes=bucket_bytes, overlap=overlap,
                                         staged=staged)
    cls = SCHEME_LAYERS.get(problem.scheme)
    if cls is None:
        return None
    sched = cls.schedule_for(largest_block(problem.m, dp), problem.k, problem.n, (pr, pc),
                             dtype=problem.dtype, backward=problem.backward, overlap=overlap,
                             staged=staged, hidden=problem.hidden, **opts)
    return DataParallel.schedule_for(sched, dp, bucket_bytes=bucket_bytes, overlap=overlap,
                                     staged=staged)


def predict(problem: Problem, ranks: int, grid: Optional[Sequence[int]] = None,
            calibration: Optional[Calibration] = None, backend: str = "numpy",
            oversubscription: float = 1.0, staged: bool = False, *, dp: int = 1,
            bucket_bytes: int = BUCKET_BYTES) -> Optional[Prediction]:
    """Predicted time of ``problem`` on ``ranks`` ranks: ``dp`` data-parallel replicas (each
    taking M/dp rows, gradients averaged in buckets of ``bucket_bytes``) of a TP group arranged
    as ``grid`` (default :func:`default_grid`): its schedule (:func:`schedule_of`) priced on
    :class:`CalibratedMachine` (``calibration``, ``backend``, ``staged``,
    ``oversubscription``). ``mem_bytes`` is :func:`tpmpi.studies.footprint.bytes_per_rank` of
    a replica. None for a scheme the model does not know."""
    dp = int(dp)
    p = int(ranks) // dp
    pr, pc = (int(g) for g in grid) if grid is not None else default_grid(problem, p)
    grid = (pr, pc)
    sched = schedule_of(problem, grid, dp=dp, bucket_bytes=bucket_bytes, staged=staged)
    if sched is None:
        return None
    machine = CalibratedMachine(calibration or Calibration(), backend, staged,
                                oversubscription)
    cost = price(sched, machine, backward=problem.backward)
    replica = dataclasses.replace(problem, m=largest_block(problem.m, dp))
    mem = bytes_per_rank(replica, grid)
    if mem is None:  # a transformer: its parameters (and gradients) and what forward keeps
        mem = sched.param_bytes * (2 if problem.backward else 1) + sched.saved_bytes
    return Prediction(scheme=problem.scheme, grid=grid, options=dict(problem.options),
                      compute_s=cost.compute_s, comm_s=cost.comm_s, time_s=cost.time_s,
                      bytes_per_rank=cost.sent_bytes, mem_bytes=float(mem or 0), dp=dp,
                      dp_comm_s=cost.exposed_s.get("dp", 0.0),
                      dp_allreduce_s=cost.collective_s.get("dp", 0.0))


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
         calibration: Optional[Calibration] = None, bucket_bytes: int = BUCKET_BYTES,
         overlap: bool = True) -> list[Prediction]:
    """All candidate layouts (every dp x TP factorisation of ``ranks``, see
    :func:`candidates`) ranked by predicted time (fastest first); ``overlap=False``: the
    layers' backward collectives (and DP buckets) blocking after the work they would
    overlap."""
    preds = []
    for scheme, grid, opts, dp in candidates(m, k, n, ranks, hidden):
        opts = opts if overlap else {**opts, "overlap": False}
        prob = Problem(scheme=scheme, m=m, k=k, n=n, hidden=hidden, dtype=dtype,
                       backward=backward, options=tuple(sorted(opts.items())))
        pred = predict(prob, ranks, grid, calibration, backend, dp=dp, bucket_bytes=bucket_bytes)
        assert pred is not None, f"the model knows every candidate scheme ({scheme})"
        preds.append(pred)
    return sorted(preds, key=lambda pr: pr.time_s)


def plan_transformer(problem: Problem, ranks: int, *, backend: str = "numpy",
                     calibration: Optional[Calibration] = None,
                     bucket_bytes: int = BUCKET_BYTES) -> list[Prediction]:
    """The layouts of a transformer problem (scheme attention, block or gpt) ranked by
    predicted time: every dp x tp mesh of ``ranks`` whose replicas take whole sequences, each
    TP group of more than one rank with and without sequence parallelism."""
    preds = []
    batch = transformer.batch_of(problem)
    for dp in (d for d in range(1, ranks + 1) if ranks % d == 0 and batch % d == 0):
        tp = ranks // dp
        for sp in (False, True) if tp > 1 else (False,):
            opts = {**problem.opts, **({"sequence_parallel": True} if sp else {})}
            prob = dataclasses.replace(problem, options=tuple(sorted(opts.items())))
            pred = predict(prob, ranks, (1, tp), calibration, backend, dp=dp,
                           bucket_bytes=bucket_bytes)
            assert pred is not None  # every transformer scheme lists its schedule
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
