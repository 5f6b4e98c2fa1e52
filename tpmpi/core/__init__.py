"""The parallel core: process grids and meshes, block partitions and layouts, the collectives
(with their agreement, host staging and cost facts), the communication operators the layers
hold by name (1D and SUMMA), array backends, dtypes, local GEMMs, the taps that operators and
local work report to (and the profiler tap), schedules as data, and weight initialisation.
Nothing here imports the layers, the checkpoints or the studies.

Dependency levels (a module imports only modules of earlier levels; tests/test_imports.py
checks this list against the source):

1. ``agreement``, ``arrays``, ``colltable``, ``schedule``, ``tap`` (no tpmpi imports)
2. ``args``, ``dtypes``, ``gemm``
3. ``backend``, ``partition``, ``tiling``
4. ``grid``, ``init``, ``profiler``, ``staging``
5. ``comm``, ``mesh``
6. ``layout``
7. ``mappings``
8. ``summa``
"""
