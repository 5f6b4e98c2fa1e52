"""Scaling sweeps: the configurations of ``python -m tpmpi bench`` and the loop that runs them.

Every configuration runs on the first ``P`` ranks of the job (a sub-communicator), so one
``mpiexec -n 4`` measures P = 1, 2, 4; ranks outside it wait without busy-polling. Rank 0 is in
every sub-communicator and writes every record.

* strong: fixed problem, P varies;  weak: ``dim`` multiplied by P;  sizes: ``dim`` swept
  (``-b/-e/-f``) at the given P.

Progress (rank 0, stderr): the cost model's estimate of the whole sweep when it exceeds
:data:`tpmpi.studies.progress.LONG_S`, then a bar weighted by each configuration's estimate.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional

import numpy as np
from mpi4py import MPI

from ..core.agreement import agree
from ..core.backend import Backend
from ..core.comm import first_ranks, polite_barrier
from ..core.grid import ProcessGrid, parse_shape
from ..core.mesh import Mesh
from ..layers.data_parallel import BUCKET_BYTES
from .bench import node_threads, oversubscription, run_case
from .collbench import format_row, time_collective
from .costmodel import Calibration, square_grid
from .problem import TRANSFORMER, Problem
from .progress import Progress, announce, case_s
from .record import RunRecord
from .schemes.hybrid import largest_replica

SWEEPS = ("strong", "weak", "sizes")
# scheme options the sweep varies, and the schemes that take them (None = option unset)
SCHEME_OPTIONS = {"panel": ("tile2d",), "chunks": ("column",), "mode": ("mlp",),
                  "activation": ("mlp",), "overlap": ("column", "row", "mlp"),
                  "sequence_parallel": TRANSFORMER}
GRID_2D = ("tile2d",)  # schemes that use a 2D grid; the others run on 1xP only


@dataclasses.dataclass(frozen=True)
class Config:
    """One run: a problem on the first ``ranks`` ranks arranged as ``dp`` replicas of the TP
    ``grid`` (a :class:`~tpmpi.Mesh` when ``dp > 1``)."""

    problem: Problem
    ranks: int
    grid: tuple
    sweep: tuple = ("strong", "m")  # (kind, dim), copied into the record
    dp: int = 1


SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMG]?)")


def parse_size(text: str) -> int:
    """``'64'``, ``'4K'``, ``'1.5K'``, ``'128M'``, ``'1G'`` (binary multiples, as nccl-tests) ->
    int; ASCII digits only (as :func:`tpmpi.core.args.parse_int`), a whole number of bytes.
    ValueError naming the text otherwise."""
    found = SIZE.fullmatch(text.strip().upper())
    value = float(found[1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "": 1}[found[2]] \
        if found else 0.5
    if not value.is_integer():
        raise ValueError(f"size {text.strip().upper()!r}: expected an integer with optional "
                         "K/M/G (digits 0-9; a whole number of bytes)")
    return int(value)


def default_ranks(kind: str, world: int) -> list[int]:
    """P values of a sweep: 1, 2, 4, ... and the world size (strong/weak); the world (sizes)."""
    if kind == "sizes":
        return [world]
    return sorted({2 ** i for i in range(world.bit_length()) if 2 ** i <= world} | {world})


def grids_for(scheme: str, p: int, grids: Sequence[str]) -> list[tuple]:
    """The grids of ``grids`` ("RxC" or "auto") that have ``p`` ranks and suit ``scheme``;
    "auto" is 1xP, or the most square grid for the schemes of :data:`GRID_2D`."""
    two_d = scheme in GRID_2D
    out = []
    for g in grids:
        shape = (square_grid(p) if two_d else (1, p)) if g == "auto" else parse_shape(g)
        if shape[0] * shape[1] == p and (two_d or shape[0] == 1) and shape not in out:
            out.append(shape)
    return out


def configs(kind: str, *, schemes: Sequence[str], dims: dict, dim: str,
            sizes: Sequence[int], ranks: Sequence[int], grids: Sequence[str],
            dtypes: Sequence[str], backward: bool, options: dict,
            dps: Sequence[int] = (1,), model: Optional[dict] = None) -> list[Config]:
    """The sweep's configurations, largest P first (a problem's serial baseline is measured at
    its first, largest run). ``dims`` = {m, k, n, hidden: [values]}; non-empty ``sizes``
    replace ``dims[dim]``; "weak" multiplies ``dim`` by P; ``options`` = {name: [values]}
    (None = unset) for the schemes of :data:`SCHEME_OPTIONS`; ``dps``: data-parallel replicas
    (those dividing P; ``grids`` then name the TP grid of P/dp ranks; the tile2d FFN takes 2D
    grids like scheme tile2d)."""
    dims = dict(dims, **({dim: list(sizes)} if sizes else {}))
    names = ("m", "k", "n", "hidden")
    out: list[Config] = []
    for p in sorted(ranks, reverse=True):
        for *shape, scheme, dtype in itertools.product(*(dims[d] for d in names), schemes,
                                                      dtypes):
            d = dict(zip(names, shape))
            if kind == "weak":
                d[dim] = d[dim] * p
            opt_names = [o for o in options if scheme in SCHEME_OPTIONS.get(o, ())]
            for values in itertools.product(*(options[o] for o in opt_names)):
                opts = tuple(sorted((o, v) for o, v in zip(opt_names, values) if v is not None))
                shape_of = dict(d, n=d["k"], **(model or {})) if scheme in TRANSFORMER else d
                prob = Problem(scheme=scheme, dtype=dtype, backward=backward, options=opts,
                               **shape_of)
                kind2d = "tile2d" if dict(opts).get("mode") == "tile2d" else scheme
                out.extend(Config(prob, p, g, (kind, dim), dp) for dp in sorted(set(dps))
                           if p % dp == 0 for g in grids_for(kind2d, p // dp, grids))
    return out


def estimate(cfgs: Sequence[Config], backend: str, calibration: Optional[Calibration], *,
             warmup: int, iters: int, baseline: bool, overlap: bool,
             oversubscription: float = 1.0, world: int = 1) -> list[float]:
    """Predicted seconds of each configuration (:func:`tpmpi.studies.progress.case_units`), the
    serial baseline counted at a problem's first configuration only; ``oversubscription`` of
    the whole job, scaled to each configuration's share of its ranks."""
    cal = calibration or Calibration()
    seen: set = set()
    out = []
    for cfg in cfgs:
        key = dataclasses.replace(cfg.problem, options=())
        out.append(case_s(largest_replica(cfg.problem, cfg.dp), cfg.ranks // cfg.dp, cfg.grid,
                          cal, backend, warmup=warmup, iters=iters,
                          baseline=baseline and key not in seen, overlap=overlap,
                          oversubscription=oversubscription * cfg.ranks / world))
        seen.add(key)
    return out


def _run_config(sub: MPI.Comm, cfg: Config, backend: Backend, *, baseline: bool | dict,
                **timing: Any) -> RunRecord:
    """The record of one configuration on the communicator ``sub`` of its ranks: a
    :class:`~tpmpi.Mesh` of ``cfg.dp`` replicas, or a grid (BLAS threads as the caller
    configured them). Collective over ``sub``."""
    with (Mesh(sub, dp=cfg.dp, tp=cfg.grid) if cfg.dp > 1
          else ProcessGrid(sub, cfg.grid)) as grid:
        rec = run_case(cfg.problem, grid, backend, baseline=baseline, **timing)
    rec.sweep = dict(zip(("kind", "dim"), cfg.sweep))
    return rec


def run_sweep(world: MPI.Comm, cfgs: Sequence[Config], backend: Backend, *, threads: int,
              warmup: int, iters: int, baseline: bool, calibration: Optional[Calibration],
              on_record: Callable[[Mapping[str, Any]], None], measure_overlap: bool = False,
              bucket_bytes: int = BUCKET_BYTES) -> None:
    """Run every configuration on the first ``ranks`` ranks of ``world``; ``on_record`` is
    called on rank 0 with each record. With ``baseline``, one serial baseline per distinct
    problem (all the node's threads), reused for every P. A ValueError on any member is raised
    on every rank of ``world``. Collective over ``world``."""
    rank = world.Get_rank()
    bases: dict = {}
    timing = {"warmup": warmup, "iters": iters, "calibration": calibration,
              "overlap": measure_overlap, "bucket_bytes": bucket_bytes,
              "baseline_threads": node_threads(world, threads)}  # all of rank 0's node
    seconds = estimate(cfgs, backend.name, calibration, warmup=warmup, iters=iters,
                       baseline=baseline, overlap=measure_overlap,
                       oversubscription=oversubscription(world, threads, backend),
                       world=world.Get_size())
    announce(f"bench: {len(cfgs)} configurations", sum(seconds), rank == 0)
    step = Progress(seconds, rank == 0).step
    for p, group in itertools.groupby(cfgs, key=lambda c: c.ranks):
        with first_ranks(world, p) as sub:
            for cfg in group:
                error = None
                if sub != MPI.COMM_NULL:
                    key = dataclasses.replace(cfg.problem, options=())
                    try:
                        rec = _run_config(sub, cfg, backend,
                                          baseline=bases.get(key, baseline), **timing)
                        if baseline:
                            bases[key] = rec["spread"]["baseline_s"]
                        if rank == 0:
                            on_record(rec)
                    except ValueError as exc:
                        error = str(exc)
                polite_barrier(world)
                agree(world, error)
                if rank == 0:
                    step(f"{cfg.problem.scheme} P={p} "
                         + (f"dp={cfg.dp} " if cfg.dp > 1 else "")
                         + f"{cfg.grid[0]}x{cfg.grid[1]} m={cfg.problem.m}")


def collective_sweep(world: MPI.Comm, ops: Iterable[str], sizes: Sequence[int],
                     ranks: Sequence[int], dtype: str, backend: Backend, *, warmup: int,
                     iters: int, on_record: Callable[[Mapping[str, Any]], None],
                     out: Callable[[str], None]) -> None:
    """nccl-tests-style table (``out`` on rank 0) and records for each op, P and size in bytes.
    Collective over ``world``."""
    rank, item = world.Get_rank(), np.dtype(dtype).itemsize
    for p in sorted(ranks):
        with first_ranks(world, p) as sub:
            for op in ops:
                if rank == 0:
                    out(f"# tpmpi {op}: {p} ranks, dtype {dtype}, warmup {warmup}, "
                        f"iters {iters}")
                    out(format_row({}, header=True))
                busbw = []
                if sub != MPI.COMM_NULL:
                    for size in sizes:
                        rec = time_collective(op, max(size // item, 1), dtype, sub, backend,
                                              warmup=warmup, iters=iters)
                        busbw.append(rec["busbw_gbs"] or 0.0)
                        if rank == 0:
                            out(format_row(rec))
                            on_record(rec)
                if rank == 0:
                    out(f"# Avg bus bandwidth    : {sum(busbw) / max(len(busbw), 1):.3f} "
                        "GB/s\n")
                polite_barrier(world)
