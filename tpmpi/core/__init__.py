"""The parallel core: process grids and meshes, block partitions and layouts, the collectives
(with their agreement, datatypes, host staging and cost facts), the communication operators the
layers hold by name (1D and SUMMA), array backends, devices and their topology, dtypes, local
GEMMs, the taps that operators and local work report to (and the profiler tap), schedules as
data, weight initialisation and dropout masks (both counter-based), the attention heads each
rank holds, and how an MPI program of tpmpi starts and ends on every rank (``launch``). Nothing
here imports the layers, the checkpoints, the models or the studies.

One concern a module:

* arrays -- ``arrays`` (the annotation types), ``arraylib`` (the NumPy and CuPy backends),
  ``backend`` (which backend a process and a communicator use), ``dtypes``, ``gemm``,
  ``init``, ``dropout``, ``heads``, ``tiling``;
* devices and ranks -- ``gpubind`` (a process's GPU, no MPI), ``devices`` (what a
  communicator's ranks decide together: GPU-aware MPI, ranks per device), ``topology`` (node
  communicators, node leaders, device grouping), ``threads`` (BLAS threads per rank);
* communication -- ``agreement`` (errors on every rank), ``comm`` (the collectives, one
  dispatch), ``datatypes`` (MPI datatypes and gather plans), ``staging`` (host staging of device
  buffers), ``cache`` (the one LRU and the one per-communicator cache), ``colltable``,
  ``mappings`` (the operators layers hold by name), ``summa`` (the tile scheme's operators),
  ``schedule`` (products and collectives as data), ``tap`` (where operators and local work
  report), ``profiler`` (the tap that accounts time and bytes);
* placement -- ``grid``, ``mesh``, ``partition``, ``layout``, ``args``;
* processes -- ``launch`` (exit codes, agreed arguments, signals, abort).

Dependency levels (a module imports only modules of earlier levels; tests/test_imports.py
checks this list against the source):

1. ``args``, ``arrays``, ``cache``, ``colltable``, ``schedule``, ``tap``, ``topology`` (no
   tpmpi imports)
2. ``agreement``, ``arraylib``, ``dtypes``, ``gpubind``, ``partition``, ``tiling``
3. ``datatypes``, ``devices``, ``gemm``, ``heads``, ``launch``, ``threads``
4. ``backend``, ``grid``
5. ``init``, ``mesh``, ``profiler``, ``staging``
6. ``comm``, ``dropout``
7. ``layout``
8. ``mappings``
9. ``summa``
"""
