"""Panel and chunk sizes that avoid tile quantisation, and the workspace they bound.

GEMM libraries compute the output in fixed tiles: cuBLAS kernels use tiles of 64 to 256 rows
or columns (Tensor-Core kernels also want dimensions that are multiples of 8 for fp16/bf16);
CPU BLAS packs panels of a few hundred elements. A local product whose M, N or K is not a
multiple of the tile runs a partial last tile at the cost of a whole one ("tile
quantisation"): a K panel of 1000 costs about the same as one of 1024, a chunk of 130 rows
almost as much as 256. The tile2d scheme therefore takes its requested K-panel width through
:func:`round_size`, which rounds it to a multiple of :data:`TILE` (128 on a GPU, 64 on a CPU);
only the last panel of a dimension may be shorter. (The column layer's pipelined M chunks use
whole OpenBLAS register blocks instead, see :func:`tpmpi.layers.column.chunk_bounds`.) The
options still bound memory: a rounded size never exceeds the request by more than
``multiple - 1`` rows/columns, and :func:`panel_workspace_bytes` gives what a panel loop holds.
"""
from __future__ import annotations

from .args import check_int

TILE = {"gpu": 128, "cpu": 64}


def multiple_for(is_gpu: bool) -> int:
    """The size multiple that panels and chunks are rounded to on this kind of device."""
    return TILE["gpu" if is_gpu else "cpu"]


def round_size(requested: int, total: int, multiple: int = TILE["gpu"]) -> int:
    """A panel width or chunk length for a dimension of ``total``: ``requested`` rounded to the
    nearest multiple of ``multiple`` (at least one multiple), or ``total`` when that is no larger
    (one panel: no loop). Returns 0 only when ``total`` is 0."""
    requested, multiple = check_int("requested", requested, 1), check_int("multiple", multiple, 1)
    if total < 0:
        raise ValueError(f"total={total!r}: expected an integer >= 0")
    rounded = max(multiple, (requested + multiple // 2) // multiple * multiple)
    return min(rounded, int(total))


def panel_workspace_bytes(rows: int, cols: int, panel: int, itemsize: int,
                          buffers: int = 2) -> int:
    """Bytes of the panel buffers of a K-panel loop: ``buffers`` (2 when double-buffered) pairs
    of an X panel (rows, panel) and a W panel (panel, cols)."""
    return int(buffers) * (int(rows) + int(cols)) * int(panel) * int(itemsize)
