"""The parallel core: process grids and meshes, block partitions and layouts, the collectives
(with their agreement, host staging and cost facts), array backends, dtypes, local GEMMs,
per-layer profiling, weight initialisation and dropout masks (both counter-based), and the
attention heads each rank holds. Nothing here imports the layers, the checkpoints, the models or
the studies.

Dependency levels (a module imports only modules of earlier levels; tests/test_imports.py
checks this list against the source):

1. ``args``, ``arrays``, ``colltable``, ``schedule`` (no tpmpi imports)
2. ``agreement``, ``dtypes``, ``gemm``, ``partition``, ``tiling``
3. ``backend``, ``heads``
4. ``grid``, ``init``, ``profiler``, ``staging``
5. ``comm``, ``dropout``, ``mesh``
6. ``layout``
7. ``mappings``
"""
