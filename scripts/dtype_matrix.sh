#!/bin/bash
# Every scheme x dtype x world size through `python -m tpmpi run --backward --check`, under the
# MPI library that $MPIEXEC launches:
#   scripts/dtype_matrix.sh [MAXP=4]                         (PyPI's MPICH: plain mpiexec)
#   OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 MPI4PY_MPIABI=openmpi \
#     MPIEXEC="mpiexec.openmpi --oversubscribe" scripts/dtype_matrix.sh   (Debian's Open MPI)
# Env: DTYPES, SCHEMES (default: all), SIZES ("M,K,N[,H]" list; default a small even and an
# uneven shape with fewer columns than ranks). Prints one table (cell: max_rel_err/tolerance,
# FAIL when the run fails its check or crashes) and the MPI library; exit 1 on any FAIL.
# About 2-4 minutes on 2 cores (128 short jobs).
set -uo pipefail
MAXP=${1:-4}
MPIEXEC=${MPIEXEC:-mpiexec}
DTYPES=${DTYPES:-float32 float64 float16 bfloat16}
SCHEMES=${SCHEMES:-column row mlp tile2d tile2d:panel}
SIZES=${SIZES:-40,96,96,64 7,5,3,3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
library=$($MPIEXEC -n 1 python -c \
  "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])" | tr -d '\0')
echo "MPI library: $library"
printf '%-13s %-9s %-12s' scheme dtype "m,k,n,h"
for p in $(seq 1 "$MAXP"); do printf ' %9s' "P=$p"; done
echo
fails=0
for scheme in $SCHEMES; do
  for dtype in $DTYPES; do
    for size in $SIZES; do
      IFS=, read -r m k n h <<< "$size"
      args=(--scheme "${scheme%%:*}" --m "$m" --k "$k" --n "$n" --dtype "$dtype")
      [ "${scheme%%:*}" = mlp ] && args+=(--n "$k" --hidden "$h")
      [ "$scheme" = tile2d:panel ] && args+=(--panel 1)
      printf '%-13s %-9s %-12s' "$scheme" "$dtype" "$size"
      for p in $(seq 1 "$MAXP"); do
        grid=()
        [ "${scheme%%:*}" = tile2d ] && [ "$p" = 4 ] && grid=(--grid 2x2)
        if timeout 120 $MPIEXEC -n "$p" python -m tpmpi run "${args[@]}" "${grid[@]}" \
             --backward --check --iters 1 --warmup 0 > "$log" 2>&1; then
          cell=$(sed -n 's/^check: max_rel_err=\([^ ]*\) tolerance=\([^ ]*\) .*/\1 \2/p' "$log" |
                 awk '{printf "%.3f", $1 / $2}')
        else
          cell=FAIL
          fails=$((fails + 1))
          tail -3 "$log" | sed 's/^/    | /' >&2
        fi
        printf ' %9s' "$cell"
      done
      echo
    done
  done
done
echo "failures: $fails"
[ "$fails" = 0 ]
