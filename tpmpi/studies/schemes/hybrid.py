"""Cases on a :class:`~tpmpi.Mesh`: a scheme's case on the TP grid of each of the ``dp``
replicas, replica ``r`` taking block ``r`` of the M rows (with its own deterministic data),
and :class:`~tpmpi.DataParallel` averaging the gradients over the replicas in backward."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from mpi4py import MPI

from ...core.backend import Backend
from ...core.comm import allreduce
from ...core.grid import ProcessGrid
from ...core.mesh import Mesh
from ...core.partition import block_range, largest_block
from ...core.profiler import Profiler
from ...layers.data_parallel import BUCKET_BYTES, DataParallel
from ...layers.module import attach_tap
from ..problem import TRANSFORMER, Problem
from .base import Case, LayerCase, collective_rel_err, host64
from .registry import build
from .transformer import TransformerCase


class DataParallelCase(Case):
    """The replica's case (``inner``, built on ``mesh.tp`` with its rows) driven through
    :class:`~tpmpi.DataParallel` (``dp``). ``problem`` is the global problem, ``flops`` the sum
    over the replicas, ``module`` / ``layers`` the TP ones; ``dp_profiler`` counts the DP
    traffic (attached with ``profiler``, which counts the TP traffic)."""

    def __init__(self, problem: Problem, mesh: Mesh, backend: Backend, *,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        a, b = block_range(problem.m, mesh.dp, mesh.dp_rank)
        inner = build(dataclasses.replace(problem, m=b - a, replica=mesh.dp_rank), mesh.tp,
                      backend)
        assert isinstance(inner, LayerCase)  # the transformer cases run on the mesh
        self.inner: LayerCase = inner
        self.problem = dataclasses.replace(self.inner.problem, m=problem.m, replica=0)
        self.mesh, self.comm = mesh, mesh.comm
        overlap = self.problem.opts.get("overlap", True) is not False
        self.dp = DataParallel(self.inner.layer, mesh, bucket_bytes=bucket_bytes,
                               overlap=overlap)
        self.module, self.layers = self.inner.module, self.inner.layers
        self.dp_profiler: Optional[Profiler] = None
        self.backend = self.inner.backend  # with the TP grid's GPU-aware decision
        self.flops = mesh.comm.allreduce(self.inner.flops if mesh.tp.rank == 0 else 0.0)

    def attach_profiler(self) -> Profiler:
        """Time the TP module's regions (returned) and, apart, the DP gradient communication
        (``dp_profiler``) from now on (the benchmark's)."""
        self.dp_profiler = attach_tap(self.dp, Profiler.for_backend(self.backend))
        self.profiler = self.inner.attach_profiler()
        return self.profiler

    def forward(self) -> None:
        self.inner.y = self.dp(self.inner.x)

    def backward(self) -> None:
        self.inner.dx = self.dp.backward(self.inner.dy)

    def serial(self, backend: Backend) -> Callable[[], None]:
        """The inner scheme's serial product at the global size (its arrays are made now)."""
        local, self.inner.problem = self.inner.problem, self.problem
        try:
            return self.inner.serial(backend)
        finally:
            self.inner.problem = local

    def verify(self) -> float:
        """The replica's own check (TP shards, local gradients), then the DP average: every
        gradient against the float64 mean over the replicas of their local gradients. The
        same value on every rank. Collective over the mesh."""
        err = self.inner.verify()
        grads = [g for _, _, g in self.dp.parameters()]
        refs = [allreduce(host64(self.inner.backend, g), self.mesh.dp_comm) / self.mesh.dp
                for g in grads]
        self.dp.allreduce_gradients()
        err = max(err, collective_rel_err(self.comm, list(zip(grads, refs))))
        return float(self.comm.allreduce(err, op=MPI.MAX))


def largest_replica(problem: Problem, dp: int) -> Problem:
    """``problem`` as its largest data-parallel replica runs it: ceil(M / dp) rows (cost and
    memory estimates of one replica)."""
    return dataclasses.replace(problem, m=largest_block(problem.m, dp))


def build_case(problem: Problem, where: ProcessGrid | Mesh, backend: Backend, *,
               bucket_bytes: int = BUCKET_BYTES) -> Case:
    """The case of ``problem`` on a grid (:func:`tpmpi.studies.schemes.build`) or on a mesh (a
    :class:`DataParallelCase`; a transformer scheme's case runs on the mesh itself)."""
    if isinstance(where, Mesh) and problem.scheme in TRANSFORMER:
        return TransformerCase(problem, where, backend)
    if isinstance(where, Mesh):
        return DataParallelCase(problem, where, backend, bucket_bytes=bucket_bytes)
    return build(problem, where, backend)

