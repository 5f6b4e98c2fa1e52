#!/bin/bash
# Strong-scaling sweep on one machine, then the report:
#   scripts/sweep_laptop.sh [NP=2] [OUT=sweep-laptop]     (env: SCHEMES, BENCH_ARGS, MPIEXEC)
# Calibrates the cost model, runs P = 1..NP inside one mpiexec job (sub-communicators) for
# every available scheme (or $SCHEMES) at small and large M, benchmarks the collectives, writes
# $OUT/strong.jsonl, $OUT/collectives.jsonl, $OUT/calib.json and the report in $OUT/report.
set -euo pipefail
NP=${1:-2}
OUT=${2:-sweep-laptop}
MPIEXEC=${MPIEXEC:-mpiexec}
mkdir -p "$OUT"
$MPIEXEC -n "$NP" python -m tpmpi calibrate --json "$OUT/calib.json"
$MPIEXEC -n "$NP" python -m tpmpi bench --sweep strong --scheme "${SCHEMES:-all}" \
    --grid auto ${BENCH_ARGS:-} --m 8,256,2048 --k 4096 --n 4096 --iters 10 --warmup 2 \
    --calibration "$OUT/calib.json" --json "$OUT/strong.jsonl"
$MPIEXEC -n "$NP" python -m tpmpi bench --collective allgather,allreduce,reduce_scatter,bcast \
    -b 8 -e 32M -f 4 --iters 20 --json "$OUT/collectives.jsonl"
python -m tpmpi report "$OUT/strong.jsonl" "$OUT/collectives.jsonl" --out "$OUT/report"
python "$(dirname "$0")/plan_accuracy.py" "$OUT/strong.jsonl" --calibration "$OUT/calib.json"
