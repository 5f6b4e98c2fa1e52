"""The parallel core: process grids and meshes, block partitions and layouts, the collectives
(with their agreement, host staging and cost facts), array backends, dtypes, local GEMMs,
per-layer profiling and weight initialisation. Nothing here imports the layers, the
checkpoints or the studies.

Dependency levels (a module imports only modules of earlier levels):

1. ``args``, ``agreement``, ``colltable``, ``dtypes``, ``gemm`` (no tpmpi imports)
2. ``backend``, ``partition``, ``tiling``, ``profiler``
3. ``staging``, ``grid``, ``init``
4. ``comm``, ``mesh``
5. ``layout``
6. ``mappings``
"""
