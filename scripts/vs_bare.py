#!/usr/bin/env python
"""Every layer against the bare products it parallelises: forward and forward+backward time
ratios per scheme and dtype, and the cost model's prediction (see tpmpi/studies/vsbare.py).

    python scripts/vs_bare.py --m 2048 --k 2048 --n 2048            # P=1, NumPy on a laptop
    mpiexec -n 2 python scripts/vs_bare.py --m 8192 --k 8192 --n 8192 --json vs.jsonl
    python scripts/vs_bare.py --table vs.jsonl                       # side-by-side over P
"""
from tpmpi.studies.vsbare import run

if __name__ == "__main__":
    run()
