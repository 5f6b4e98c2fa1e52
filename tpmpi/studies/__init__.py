"""The studies: what runs, times, models and reports the layers -- benchmark problems and cases
(``problem``, ``schemes``), the one timing loop (``timing``), benchmarks (``bench``,
``collbench``, ``peak``, ``overlap``, ``vsbare``), sweeps (``sweep``), memory and cost models
(``footprint``, ``pricing``, ``costmodel``), records and statistics (``record``, ``stats``),
reports and plots (``report``, ``plots``), the progress bar (``progress``), and planning on
named clusters (``cluster`` presets, ``nccl``, ``machine``, ``gptshape``, ``trainstep``,
``clusterplan``, ``validation``). Studies import the core and the layers; neither imports a
study.
"""
