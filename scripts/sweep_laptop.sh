#!/bin/bash
# Strong-scaling sweep on one machine, then the report:
#   scripts/sweep_laptop.sh [NP=2] [OUT=sweep-laptop]   (env: SCHEMES, M, K, N, BENCH_ARGS, MPIEXEC)
# Calibrates the cost model, runs P = 1..NP inside one mpiexec job (sub-communicators) for
# every available scheme (or $SCHEMES) at M = 8, 256, 2048 and K = N = 4096, benchmarks the
# collectives, writes $OUT/strong.jsonl, $OUT/collectives.jsonl, $OUT/calib.json and the report
# (report.md, report.csv, PNGs) in $OUT/report.
#
# Expected time with the defaults on a 2-core laptop: about 7 minutes with NP=2 (8 with NP=4):
# the cost model's default rates estimate 6 minutes for the bench step (7 with NP=4), the mlp at
# M=2048 (hidden 16384) being half of it, and calibration, collectives and report took about a
# minute here. A loaded machine takes longer. The bench step prints the cost model's estimate
# for your machine (from the calibration just measured) as it starts, then a progress bar
# (pip install ".[progress]"). A quick look at the same plots, 1.5 minutes measured on a
# heavily loaded 2-core machine:  M=8,256 K=1024 N=1024 scripts/sweep_laptop.sh
set -euo pipefail
NP=${1:-2}
OUT=${2:-sweep-laptop}
MPIEXEC=${MPIEXEC:-mpiexec}
mkdir -p "$OUT"
echo "sweep_laptop.sh: NP=$NP, M=${M:-8,256,2048} K=${K:-4096} N=${N:-4096}; expected about" \
     "7 min with the defaults on a 2-core laptop (the bench step prints its own estimate)" >&2
$MPIEXEC -n "$NP" python -m tpmpi calibrate --json "$OUT/calib.json"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
$MPIEXEC -n "$NP" python -m tpmpi bench --sweep strong --scheme "${SCHEMES:-all}" \
    --grid auto ${BENCH_ARGS:-} --m "${M:-8,256,2048}" --k "${K:-4096}" --n "${N:-4096}" \
    --iters 10 --warmup 2 --calibration "$OUT/calib.json" --json "$OUT/strong.jsonl"
$MPIEXEC -n "$NP" python -m tpmpi bench --collective allgather,allreduce,reduce_scatter,bcast \
    -b 8 -e 32M -f 4 --iters 20 --json "$OUT/collectives.jsonl"
python -m tpmpi report "$OUT/strong.jsonl" "$OUT/collectives.jsonl" --out "$OUT/report"
python "$(dirname "$0")/plan_accuracy.py" "$OUT/strong.jsonl" --calibration "$OUT/calib.json"
