#!/usr/bin/env bash
# GPU check of tpmpi, for a developer on a machine with CuPy and at least one CUDA GPU.
#
#   scripts/gpu_check.sh [OUTDIR]        (default OUTDIR: gpu-check)
#
# 1. the test suite at 1, 2 and 4 ranks sharing the GPU(s), with the backend-parametrised tests
#    on CuPy (TPMPI_TEST_BACKEND=cupy: they fail, not skip, if CuPy or the device is missing);
# 2. `run --backend cupy` records for the column and tile2d schemes (those available) at
#    M=K=N=SIZE in float32 and float16, appended to OUTDIR/records.jsonl;
# 3. the device's cuBLAS peak (one SIZE^3 GEMM timed alone) per dtype, and each record's local
#    GEMM throughput as a fraction of it (OUTDIR/peak-DTYPE.jsonl).
# Environment: MPIEXEC (default mpiexec), RANKS (default "1 2 4"), SIZE (default 8192).
# Exit status: 0 when every step passed, 1 otherwise (logs in OUTDIR).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mpiexec=${MPIEXEC:-mpiexec}
ranks=${RANKS:-"1 2 4"}
size=${SIZE:-8192}
status=0

if ! python -c "import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() == 0)" 2>/dev/null; then
    echo "gpu_check: needs CuPy and a visible CUDA device" >&2
    exit 2
fi
$mpiexec -n 1 python -m tpmpi info | tee "$out/info.txt"

for p in $ranks; do
    echo "== tests, $p rank(s)"
    TPMPI_TEST_BACKEND=cupy $mpiexec -n "$p" python -m mpi4py -m pytest --with-mpi -q \
        2>&1 | tee "$out/tests-P$p.log" || status=1
done

schemes=$(python -c "from tpmpi.schemes import available
print(' '.join(s for s in ('column', 'tile2d') if s in available()))")
for p in $ranks; do
    for scheme in $schemes; do
        grid=()
        if [ "$scheme" = tile2d ] && [ "$p" = 4 ]; then grid=(--grid 2x2); fi
        for dtype in float32 float16; do
            echo "== run $scheme P=$p $dtype"
            $mpiexec -n "$p" python -m tpmpi run --backend cupy --scheme "$scheme" ${grid[@]+"${grid[@]}"} \
                --m "$size" --k "$size" --n "$size" --dtype "$dtype" --check \
                --json "$out/records.jsonl" 2>&1 | tee -a "$out/runs.log" || status=1
        done
    done
done

for dtype in float32 float16; do
    echo "== cuBLAS peak $dtype"
    python -m tpmpi.peak --backend cupy --dtype "$dtype" --n "$size" \
        --records "$out/records.jsonl" | tee "$out/peak-$dtype.jsonl" || status=1
done
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL) (logs in $out)"
exit $status
