"""The memory-fit policy: refuse, on every rank and before any allocation, a run whose arrays
cannot fit this node's memory (or this rank's GPU), from a lower bound per rank derived from
the layers' declared layouts (:mod:`tpmpi.studies.footprint`)."""
from __future__ import annotations

from collections.abc import Sequence

from mpi4py import MPI

from ..core.backend import Backend
from ..core.launch import agree_usage
from ..core.topology import node_comm
from ..studies import footprint
from ..studies.schemes import Problem


def agree_fits(runs: Sequence[tuple[Problem, tuple[int, int]]], backend: Backend,
               comm: MPI.Comm) -> None:
    """UsageError on every rank when one of ``runs`` (a problem on a grid shape) needs more
    memory than this node (or this rank's GPU) has: a lower bound per rank from the layouts
    (:mod:`tpmpi.studies.footprint`) times the ranks of the run on this node. Before any allocation;
    collective."""
    with node_comm(comm) as local:
        sharing = local.Get_size()
    if backend.is_gpu:
        free, where = backend.xp.cuda.runtime.memGetInfo()[0], "free on this rank's GPU"
    else:
        free, where = footprint.host_available(), "available on this node"
    error = None
    for p, shape in runs:
        per_rank = footprint.bytes_per_rank(p, shape)
        ranks = 1 if backend.is_gpu else min(sharing, shape[0] * shape[1])
        if per_rank is None or free is None or per_rank * ranks <= free:
            continue
        error = (f"--m {p.m} --k {p.k} --n {p.n}{f' --hidden {p.hidden}' if p.hidden else ''} "
                 f"--dtype {p.dtype} ({p.scheme} on {shape[0]}x{shape[1]}"
                 f"{', backward' if p.backward else ''}) needs at least {per_rank} bytes "
                 f"({footprint.gib(per_rank)}) per rank for its arrays, "
                 f"{footprint.gib(per_rank * ranks)} for its {ranks} rank(s) on this node; "
                 f"{footprint.gib(free)} {where}")
        break
    agree_usage(comm, error)
