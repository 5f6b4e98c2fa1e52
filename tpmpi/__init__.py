"""tpmpi: tensor parallelism for matrix products over MPI, on NumPy or CuPy."""
from ._version import __version__
from .backend import Backend, configure_blas_threads, get_backend
from .checkpoint import load_checkpoint, save_checkpoint
from .data_parallel import DataParallel
from .grid import ProcessGrid
from .init import init_weight
from .layers import ColumnParallelLinear, ParallelMLP, RowParallelLinear, TileParallelLinear
from .layout import gather, scatter
from .mesh import Mesh
from .partition import block_partition

__all__ = ["Backend", "ColumnParallelLinear", "DataParallel", "Mesh", "ParallelMLP",
           "ProcessGrid", "RowParallelLinear", "TileParallelLinear", "block_partition",
           "configure_blas_threads", "gather", "get_backend", "init_weight", "load_checkpoint",
           "save_checkpoint", "scatter", "__version__"]
