"""Parallel linear layers: forward and backward on a ProcessGrid.

Determinism and reproducibility
-------------------------------
* Same inputs, same grid shape, same world size, same MPI library and BLAS (threads included)
  -> bit-identical outputs and gradients, run to run: every local GEMM sees the same operands
  and MPICH/Open MPI pick their reduction algorithm from (message size, communicator size), so
  each Allreduce adds the same partial sums in the same order (tests/test_determinism.py).
* Across grid shapes or world sizes, results agree within the dtype's tolerance
  (:func:`tpmpi.core.dtypes.tolerance`) but not bit for bit, because the floating-point sums are
  grouped differently:
  - reductions over a split K (the column layer's ``dX = sum_p dY_p W_p^T``, a row layer's
    ``Y = sum_p X_p W_p``) add P partial products, each itself a BLAS sum over its own slice,
    and the Allreduce combines them in an order set by P and by the algorithm MPI picks
    (recursive doubling, reduce-scatter + allgather, ...): a different P regroups the sum;
  - split N (column outputs, ``grad_weight``) does not reduce across ranks, but BLAS blocks
    and vectorises a (K, N_p) operand differently for each N_p, which may change the last bit;
  - the message-size limit (``TPMPI_MAX_MESSAGE_BYTES``) splits big reductions into chunks;
    each element is still reduced once, but MPI may pick another algorithm for the smaller
    chunk size. Keep the limit fixed for bit reproducibility.
  The error bound grows like ``K * eps * max|X| max|W|`` whatever the grid, which is what the
  tolerance formula covers.
"""
from .attention import ParallelAttention
from .base import ParallelLinear
from .block import TransformerBlock
from .column import ColumnParallelLinear
from .embedding import VocabParallelEmbedding
from .mlp import ParallelMLP
from .module import Composite, Module, named_layers
from .row import RowParallelLinear
from .tile2d import TileParallelLinear
from .vocab_loss import VocabParallelLoss

__all__ = ["ParallelLinear", "ColumnParallelLinear", "Composite", "Module", "ParallelAttention",
           "ParallelMLP", "RowParallelLinear", "TileParallelLinear", "TransformerBlock",
           "VocabParallelEmbedding", "VocabParallelLoss", "named_layers"]
