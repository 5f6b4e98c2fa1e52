"""A mesh of ranks for hybrid parallelism: ``dp`` data-parallel replicas of a tensor-parallel
(TP) group of ``T = pr * pc`` ranks.

Rank order (Megatron-core's ``tp-...-dp``): rank ``r`` of ``comm`` is TP index ``r % T`` of
replica ``r // T``, so the ranks of one TP group are contiguous in ``comm``. Under block
placement (``srun --distribution=block``, the default; ``mpiexec --map-by core``) consecutive
ranks share a node, so a TP group whose size divides the ranks per node stays inside one node
and its frequent collectives use shared memory, while the DP Allreduce of the gradients (once per
step) crosses the network. A TP group that spans nodes is reported once, on rank 0, with a
warning.

* ``mesh.tp``: a :class:`~tpmpi.core.grid.ProcessGrid` of shape ``(pr, pc)`` over this rank's TP
  group (1D: ``(1, T)``); layers take it exactly as any grid.
* ``mesh.dp_comm``: the ``dp`` ranks with the same TP coordinates, i.e. holding the same
  shards (rank in it = ``mesh.dp_rank``); :class:`tpmpi.DataParallel` averages gradients there.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
from mpi4py import MPI

from .agreement import CALL_ORDER, Same, Text, agree
from .args import check_int, parse_int
from .backend import node_comm
from .grid import ProcessGrid, factorisations, parse_shape

TPSpec = Union[int, str, Sequence[int], None]

_warned = False  # the node-spanning warning is given once per process
_MESHES: weakref.WeakValueDictionary[int, Mesh] = weakref.WeakValueDictionary()


def mesh_shapes(size: int) -> list[tuple[int, tuple[int, int]]]:
    """Every ``(dp, (pr, pc))`` with ``dp * pr * pc == size``."""
    return [(dp, grid) for dp in range(1, size + 1) if size % dp == 0
            for grid in factorisations(size // dp)]


def describe_shapes(size: int) -> str:
    """The valid meshes of ``size`` ranks, e.g. ``dp=1 tp=4 (1x4, 2x2, 4x1); dp=2 tp=2 ...``."""
    parts = []
    for dp in (d for d in range(1, size + 1) if size % d == 0):
        t = size // dp
        grids = ", ".join(f"{r}x{c}" for r, c in factorisations(t))
        parts.append(f"dp={dp} tp={t} ({grids})")
    return "; ".join(parts)


def tp_shape(tp: TPSpec, size: int, dp: int) -> tuple[int, int]:
    """The TP grid ``(pr, pc)`` named by ``tp`` for ``dp`` replicas over ``size`` ranks: None
    (``size / dp`` ranks, 1D), ``T`` or ``"T"`` (1D, ``1 x T``), ``(pr, pc)`` or ``"RxC"``
    (2D). ValueError naming the argument."""
    if tp is None:
        if size % dp:
            raise ValueError(f"mesh dp={dp}: dp must divide the {size} ranks; valid meshes: "
                             f"{describe_shapes(size)}")
        return 1, size // dp
    if isinstance(tp, str):
        try:
            return parse_shape(tp) if "x" in tp.lower() else (1, parse_int("tp", tp, 1))
        except ValueError:
            raise ValueError(f"tp={tp!r}: expected T or RxC (digits 0-9), e.g. 2 or 2x2"
                             ) from None
    if isinstance(tp, (list, tuple)):
        if len(tp) != 2:
            raise ValueError(f"tp={tp!r}: expected T or (pr, pc)")
        return check_int("tp[0]", tp[0], 1), check_int("tp[1]", tp[1], 1)
    return 1, check_int("tp", tp, 1)


def mesh_of(grid: object) -> Optional[Mesh]:
    """The live :class:`Mesh` whose TP grid ``grid`` is (``mesh.tp``), else None: checkpoints
    of a module built on ``mesh.tp`` are saved once for the whole mesh. Local."""
    mesh = _MESHES.get(id(grid))
    return mesh if mesh is not None and mesh.tp is grid else None


def node_leader(comm: MPI.Comm) -> int:
    """The lowest rank of ``comm`` on this rank's node (shared-memory split). Collective."""
    local = node_comm(comm)
    try:
        return local.allreduce(comm.Get_rank(), op=MPI.MIN)
    finally:
        local.Free()


class Mesh:
    """``dp x tp`` ranks over ``comm`` (see the module docstring). Collective over ``comm``.

    Parameters
    ----------
    comm : the ranks of the mesh (COMM_WORLD or any sub-communicator).
    dp : data-parallel replicas (positive int).
    tp : the TP grid: None (``comm`` size / dp ranks, 1D), T (1D, ``1 x T``) or ``(pr, pc)`` /
        ``"RxC"`` (2D). ``dp * pr * pc`` must equal the size of ``comm``: otherwise a ValueError
        naming the valid meshes, raised on every rank.

    A mesh leaves BLAS alone: :func:`tpmpi.configure_blas_threads` over ``comm`` counts the
    node's ranks whatever their group.
    """

    def __init__(self, comm: MPI.Comm = MPI.COMM_WORLD, *, dp: int = 1, tp: TPSpec = None):
        size = comm.Get_size()
        error, shape = None, (1, size)
        try:
            dp = check_int("dp", dp, 1)
            shape = tp_shape(tp, size, dp)
            if dp * shape[0] * shape[1] != size:
                raise ValueError(f"mesh dp={dp} x tp={tp!r} (grid {shape[0]}x{shape[1]}): "
                                 f"dp * pr * pc must equal the {size} ranks; valid meshes: "
                                 f"{describe_shapes(size)}")
        except (TypeError, ValueError) as exc:
            error = str(exc)
        agree(comm, error, call=Same(Text("construction of a Mesh"), CALL_ORDER), dp=dp,
              tp=shape)
        self.comm = comm
        self.size, self.rank = size, comm.Get_rank()
        self.dp: int = dp
        t = shape[0] * shape[1]
        self.dp_rank, tp_index = divmod(self.rank, t)
        tp_comm = comm.Split(self.dp_rank, tp_index)
        self.tp = ProcessGrid(tp_comm, shape)
        tp_comm.Free()
        self.dp_comm: MPI.Comm = comm.Split(tp_index, self.dp_rank)
        _MESHES[id(self.tp)] = self
        self._warn_if_spanning_nodes()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(dp, pr, pc)``."""
        return (self.dp,) + self.tp.shape

    @property
    def label(self) -> str:
        """``"Dx(RxC)"``, e.g. ``"2x(1x2)"``."""
        return f"{self.dp}x({self.tp.label})"

    def __repr__(self) -> str:
        return (f"Mesh({self.label}, rank={self.rank}, dp_rank={self.dp_rank}, "
                f"tp_coords={self.tp.coords})")

    def _warn_if_spanning_nodes(self) -> None:
        """Rank 0 warns (once per process) when some TP group has ranks on several nodes.
        Collective: a node split and two small Allreduces."""
        global _warned  # noqa: PLW0603 - the warning is given once per process
        leader = node_leader(self.comm)
        both = np.array([leader, -leader], dtype=np.int64)
        self.tp.comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
        spans = int(both[0] != -both[1] and self.tp.rank == 0)
        groups = self.comm.allreduce(spans)
        if groups and self.rank == 0 and not _warned:
            _warned = True
            warnings.warn(
                f"Mesh {self.label}: {groups} of {self.dp} TP groups of {self.tp.size} ranks span "
                "several nodes, so their collectives cross the network; place ranks by block "
                "(srun --distribution=block, mpiexec --map-by core) with a TP size that divides "
                "the ranks per node", RuntimeWarning, stacklevel=3)

    def free(self) -> None:
        """Free the TP grid's and the DP communicators (collective)."""
        self.tp.free()
        if self.dp_comm != MPI.COMM_NULL:
            self.dp_comm.Free()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

