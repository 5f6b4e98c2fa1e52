"""ProcessGrid: a row-major 2D Cartesian communicator with row/column sub-communicators.

``grid.row_comm`` joins the ranks of one grid row (size ``pc``, rank = grid column);
``grid.col_comm`` joins the ranks of one grid column (size ``pr``, rank = grid row).
1D layers use the shape ``(1, P)``.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Union, cast

from mpi4py import MPI

from . import backend as _backend
from .agreement import Text, agree
from .args import check_int, parse_int


def factorisations(size: int) -> list[tuple[int, int]]:
    """Every ``(pr, pc)`` with ``pr * pc == size``."""
    return [(r, size // r) for r in range(1, size + 1) if size % r == 0]


def _grid_shape(shape: Union[Sequence[int], str, None], size: int) -> tuple[int, int]:
    """The ``(pr, pc)`` that ``shape`` asks for (default ``(1, size)``); ValueError (or
    TypeError) unless it is two positive integers whose product is ``size``."""
    if isinstance(shape, str):
        shape = parse_shape(shape)
    dims = (1, size) if shape is None else tuple(check_int(f"shape[{i}]", s)
                                                  for i, s in enumerate(shape))
    if len(dims) != 2 or min(dims) < 1 or dims[0] * dims[1] != size:
        valid = ", ".join(f"{r}x{c}" for r, c in factorisations(size))
        raise ValueError(f"grid shape={dims}: pr*pc must equal the {size} ranks; "
                         f"valid shapes: {valid}")
    return dims[0], dims[1]


def parse_shape(text: str) -> tuple[int, int]:
    """``'2x3'`` -> ``(2, 3)`` (:func:`tpmpi.core.args.parse_int` reads each side); ValueError
    naming the text otherwise."""
    try:
        pr, pc = (parse_int("grid", v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"grid={text!r}: expected RxC, e.g. 2x2") from None
    return pr, pc


def _check_comm(comm: object) -> MPI.Intracomm:
    """``comm`` when it is a live intracommunicator; ValueError (local, before any collective)
    otherwise."""
    if not isinstance(comm, MPI.Comm):
        raise ValueError(f"comm is a {type(comm).__module__}.{type(comm).__name__}: expected an "
                         "mpi4py communicator (e.g. MPI.COMM_WORLD)")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm is MPI.COMM_NULL (freed, or this rank is outside a Split): "
                         "expected a live communicator")
    if comm.Is_inter():
        raise ValueError("comm is an intercommunicator: expected an intracommunicator (e.g. "
                         "comm.Merge())")
    if not isinstance(comm, MPI.Intracomm):
        raise ValueError("comm is a plain MPI.Comm handle: expected an intracommunicator (e.g. "
                         "MPI.COMM_WORLD, or MPI.Intracomm(comm))")
    return comm


class ProcessGrid:
    """``pr x pc`` Cartesian grid over ``comm`` (``Create_cart(dims, reorder=False)``).

    Parameters
    ----------
    comm : the ranks of the grid (collective over it).
    shape : ``(pr, pc)`` or ``"RxC"``; default ``(1, size)``. ValueError naming the valid
        shapes when ``pr * pc != size``, raised on every rank.
    blas_threads : deprecated; a grid leaves BLAS alone. Call
        :func:`tpmpi.configure_blas_threads` (``"auto"`` here is ``threads=None`` there, an int
        sets it), as ``python -m tpmpi`` does.
    node_aware : order ranks by node before building the grid, so that the ranks of a grid row
        (the inner, faster-varying dimension) share a node whenever ``pc`` divides the number of
        ranks per node. Within a node ranks keep their order in ``comm`` and nodes are ordered
        by their lowest rank, so on a single node (or when ``comm`` already lists ranks node by
        node, as block placement does) the grid equals the plain one.
    """

    def __init__(self, comm: MPI.Comm, shape: Union[Sequence[int], str, None] = None, *,
                 blas_threads: Union[str, int, None] = None, node_aware: bool = False) -> None:
        comm = _check_comm(comm)
        size = comm.Get_size()
        error, dims = None, (1, size)
        try:
            dims = _grid_shape(shape, size)
        except (TypeError, ValueError) as exc:
            error = str(exc)
        agree(comm, error, call=Text("ProcessGrid()"), shape=dims, node_aware=bool(node_aware),
              blas_threads=Text("given" if blas_threads is not None else "not given"))
        self.shape: tuple[int, int] = dims
        base = comm
        if node_aware:
            local = _backend.node_comm(comm)
            leader = local.allreduce(comm.Get_rank(), op=MPI.MIN)
            # an Intracomm's Split is one (mpi4py's stubs declare Comm.Split's Comm)
            base = cast(MPI.Intracomm, comm.Split(0, key=leader * size + local.Get_rank()))
            local.Free()
        self.comm: MPI.Cartcomm = base.Create_cart(list(dims), periods=[False, False],
                                                   reorder=False)
        if base is not comm:
            base.Free()
        self.row_comm: MPI.Cartcomm = self.comm.Sub([False, True])
        self.col_comm: MPI.Cartcomm = self.comm.Sub([True, False])
        self.rank: int = self.comm.Get_rank()
        self.size: int = size
        row, col = self.comm.Get_coords(self.rank)
        self.coords: tuple[int, int] = (row, col)
        if blas_threads is not None:
            warnings.warn("ProcessGrid(blas_threads=...) is deprecated: a grid leaves BLAS "
                          "alone; call tpmpi.configure_blas_threads(comm, threads)",
                          DeprecationWarning, stacklevel=2)
            _backend.configure_blas_threads(
                self.comm, None if isinstance(blas_threads, str) and blas_threads == "auto"
                else blas_threads)  # type: ignore[arg-type]  # any other value: ValueError there

    def __repr__(self) -> str:
        return (f"ProcessGrid({self.shape[0]}x{self.shape[1]}, rank={self.rank}, "
                f"coords={self.coords})")

    @property
    def label(self) -> str:
        """``"RxC"``."""
        return f"{self.shape[0]}x{self.shape[1]}"

    def free(self) -> None:
        """Free the three communicators (collective)."""
        for c in (self.row_comm, self.col_comm, self.comm):
            if c != MPI.COMM_NULL:
                c.Free()

    @property
    def freed(self) -> bool:
        """True after :meth:`free`."""
        return self.comm == MPI.COMM_NULL

    def __enter__(self) -> ProcessGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


_DEFAULT: list = []


def default_grid() -> ProcessGrid:
    """The 1D grid over COMM_WORLD that layers (and checkpoint loads) use when given no grid,
    shared by all of them so that their calls are agreed on one communicator (created on first
    use, again if freed). Collective over COMM_WORLD when it is created."""
    if not _DEFAULT or _DEFAULT[0].freed:
        _DEFAULT[:] = [ProcessGrid(MPI.COMM_WORLD)]
    return _DEFAULT[0]
