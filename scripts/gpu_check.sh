#!/usr/bin/env bash
# Acceptance run of tpmpi on a GPU machine, inside 8 minutes on one H200.
#
#   scripts/gpu_check.sh [OUTDIR]        (default OUTDIR: gpu-check; everything is written there)
#
# Steps, each under its own `timeout`, all within DEADLINE seconds (a step with under 20 s
# left is reported SKIPPED); output on the terminal and in OUTDIR/STEP.log:
#   preflight  CuPy sees a GPU, the Python packages import, and `mpiexec -n 2` starts ONE job
#              of 2 ranks (a launcher from another MPI than the library mpi4py loads starts
#              singletons that each run alone: the check stops there, loudly);
#   subcomm    layers on nested and overlapping sub-communicators, built in a different order
#              on each rank, the backend created by each rank's first layer (CuPy, 4 ranks);
#   suite-P4   the MPI test suite on 4 ranks sharing the GPU (it covers world sizes 1-4), with
#              the backend tests on CuPy (TPMPI_TEST_BACKEND=cupy: they fail, never skip);
#   calibrate  host-MPI alpha/beta at P=2 and 4, the device's GEMM rate per dtype at SIZE^3
#              and its pinned copy bandwidth -> OUTDIR/calib.json;
#   table-PN   every layer (column, row, mlp, tile2d) x {float32, float16, bfloat16} at SIZE^3:
#              forward and forward+backward against the bare CuPy products (and torch.matmul
#              on the same arrays where torch is installed), predicted vs measured, for each P
#              in RANKS -> OUTDIR/vsbare.jsonl; OUTDIR/table.md is the side-by-side table;
#   run-*      `python -m tpmpi run --check` of the column scheme at P=2 with its
#              compute/communication split: float32 forward (its comm_ms is the forward's),
#              float16 forward+backward -> OUTDIR/runs.jsonl;
#   suite-P1/2 the GPU-facing test files at 1 and 2 ranks;
#   peak-*     the device's GEMM peak per dtype (python -m tpmpi.studies.peak) and the runs' fraction.
# OUTDIR/summary.txt lists each step's verdict and time.
#
# Environment: PYTHON (python3), MPIEXEC (mpiexec), SIZE (8192), RANKS ("1 2 4"), ITERS (3),
# DEADLINE (470). WHEELS: a folder of wheels for this Python (default .whl when it exists),
# e.g. mpich, mpi4py, pytest-mpi and threadpoolctl; they are unpacked into OUTDIR/site and, with
# an mpich wheel, mpi4py is pointed at its libmpi (MPI4PY_LIBMPI, MPI4PY_MPIABI=mpich) and its
# mpiexec comes first in PATH: for machines whose mpi4py would load another MPI (README, "GPU
# check"). Open MPI's launcher is allowed to run as root here.
# Exit status: 0 every step passed; 1 a step failed, timed out or was skipped; 2 the machine
# cannot run the check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out" && out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
mpiexec=${MPIEXEC:-mpiexec}
size=${SIZE:-8192}
ranks=${RANKS:-"1 2 4"}
iters=${ITERS:-3}
deadline=$((SECONDS + ${DEADLINE:-470}))
summary="$out/summary.txt"
: > "$summary"
status=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$summary"; }
die() { note "gpu_check: $*"; exit 2; }

# step NAME LIMIT CMD...: CMD under `timeout` (LIMIT seconds, fewer when the deadline is near)
step() {
    local name=$1 limit=$2 left=$((deadline - SECONDS)) t0=$SECONDS rc verdict
    shift 2
    if [ "$left" -lt 20 ]; then
        note "SKIPPED  $name (out of time)"
        status=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then verdict=PASS
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict=TIMEOUT
    else verdict=FAIL
    fi
    [ "$verdict" = PASS ] || status=1
    note "$(printf '%-8s %s (%ss, exit %s)' "$verdict" "$name" $((SECONDS - t0)) "$rc")"
}

# ---- preflight: wheels, packages, GPU, one multi-rank job
wheels=${WHEELS:-}
if [ -z "$wheels" ] && [ -d .whl ]; then wheels=.whl; fi
if [ -n "$wheels" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$out/site" \
        "$wheels"/*.whl || die "could not unpack the wheels in $wheels"
    export PYTHONPATH="$out/site:$PYTHONPATH" PATH="$out/site/bin:$PATH"
    mpich=$(ls "$wheels"/mpich-*.whl 2>/dev/null | head -1)
    if [ -n "$mpich" ]; then  # pip --target drops the wheel's data files, libmpi among them
        "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
            "$mpich" "$out/mpich-wheel" || die "could not unpack $mpich"
        libmpi=$(find "$out/mpich-wheel" -name libmpi.so.12 | head -1)
        [ -n "$libmpi" ] || die "no libmpi.so.12 in $mpich"
        export MPI4PY_LIBMPI=$libmpi MPI4PY_MPIABI=mpich
        export LD_LIBRARY_PATH="$(dirname "$libmpi")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi
"$py" -c "import cupy, sys; sys.exit(cupy.cuda.runtime.getDeviceCount() == 0)" 2>/dev/null \
    || die "needs CuPy and a visible CUDA device"
missing=$("$py" -c "import importlib.util as u; print(' '.join(m for m in ('numpy', 'mpi4py',
    'threadpoolctl', 'pytest', 'pytest_mpi', 'pytest_timeout', 'hypothesis', 'ml_dtypes')
    if u.find_spec(m) is None))")
[ -z "$missing" ] || die "missing Python packages: $missing (carry their wheels in WHEELS)"
sizes=$(timeout 60 $mpiexec -n 2 "$py" -c "from mpi4py import MPI
if MPI.COMM_WORLD.rank == 0: print('size', MPI.COMM_WORLD.size)" 2>&1 | tr '\n' ' ')
if [ "$sizes" != "size 2 " ]; then
    die "'$mpiexec -n 2' printed '$sizes' instead of one job of 2 ranks: the launcher and \
the MPI library mpi4py loads ($("$py" -c 'from mpi4py import MPI
print(MPI.Get_library_version().splitlines()[0])' 2>&1)) differ. Carry the MPICH wheel \
(WHEELS) or set MPIEXEC to the launcher of that library."
fi
note "preflight: $("$py" -c 'import cupy; print("CuPy", cupy.__version__)'), world size 2 OK"
step info 60 $mpiexec -n 1 "$py" -m tpmpi info

# ---- correctness on CuPy
step subcomm 90 env TPMPI_TEST_BACKEND=cupy $mpiexec -n 4 "$py" -m mpi4py -m pytest --with-mpi \
    -q tests/test_subcomm.py tests/test_gpubind.py
step suite-P4 240 env TPMPI_TEST_BACKEND=cupy $mpiexec -n 4 "$py" -m mpi4py -m pytest \
    --with-mpi -q

# ---- performance against the bare products, and the model
step calibrate 90 $mpiexec -n 4 "$py" -m tpmpi calibrate --backend cupy --json "$out/calib.json" \
    -b 1K -e 256M -f 16 --iters 5
cal=()
if [ -s "$out/calib.json" ]; then cal=(--calibration "$out/calib.json"); fi
table() {
    step "table-P$1" 200 $mpiexec -n "$1" "$py" -m tpmpi.studies.vsbare --backend cupy --m "$size" \
        --k "$size" --n "$size" --iters "$iters" ${cal[@]+"${cal[@]}"} --json "$out/vsbare.jsonl"
}
for p in $ranks; do
    [ "$p" -le 2 ] && table "$p"
done
for case in "float32" "float16 --backward"; do  # fp32: forward comm_ms; fp16: fwd+bwd split
    read -r dtype backward <<< "$case"
    step "run-column-$dtype-P2${backward:+-bwd}" 60 $mpiexec -n 2 "$py" -m tpmpi run \
        --backend cupy --scheme column --m "$size" --k "$size" --n "$size" --dtype "$dtype" \
        $backward --check --iters "$iters" ${cal[@]+"${cal[@]}"} --json "$out/runs.jsonl"
done
for p in $ranks; do
    [ "$p" -gt 2 ] && table "$p"
done
for p in 1 2; do
    step "suite-P$p" 90 env TPMPI_TEST_BACKEND=cupy $mpiexec -n "$p" "$py" -m mpi4py -m pytest \
        --with-mpi -q tests/test_backends.py tests/test_arraylib.py tests/test_devices.py \
        tests/test_gpubind.py tests/test_subcomm.py tests/test_hot_path.py \
        tests/test_staging.py tests/test_vsbare.py tests/test_gpu_model.py
done
for dtype in float32 float16 bfloat16; do
    step "peak-$dtype" 45 "$py" -m tpmpi.studies.peak --backend cupy --dtype "$dtype" --n "$size" \
        --records "$out/runs.jsonl"
done

if [ -s "$out/vsbare.jsonl" ]; then
    "$py" -m tpmpi.studies.vsbare --table "$out/vsbare.jsonl" > "$out/table.md" && cat "$out/table.md"
fi
echo
cat "$summary"
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL) (everything in $out)"
exit $status
