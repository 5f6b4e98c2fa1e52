"""tpmpi: tensor parallelism for matrix products over MPI, on NumPy or CuPy."""
from . import models
from ._version import __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .core.backend import Backend, get_backend
from .core.grid import ProcessGrid
from .core.init import init_weight
from .core.layout import gather, scatter
from .core.mesh import Mesh
from .core.partition import block_partition
from .core.threads import configure_blas_threads
from .layers import ColumnParallelLinear, ParallelAttention, ParallelMLP, RowParallelLinear, \
    TileParallelLinear, TransformerBlock, VocabParallelEmbedding, VocabParallelLoss
from .layers.data_parallel import DataParallel

__all__ = ["Backend", "ColumnParallelLinear", "DataParallel", "Mesh", "ParallelAttention",
           "ParallelMLP", "ProcessGrid", "RowParallelLinear", "TileParallelLinear",
           "TransformerBlock", "VocabParallelEmbedding", "VocabParallelLoss", "block_partition",
           "configure_blas_threads", "gather", "get_backend", "init_weight", "load_checkpoint",
           "models", "save_checkpoint", "scatter", "__version__"]
