# Sourced by the tpmpi sbatch templates: site modules, Python env, threads, MPI plugin, output.
# Edit the ADAPT lines for your cluster (see slurm/README.md). TPMPI_ROOT is the repository root
# (the templates set it to the job's starting directory, which submit_scaling.sh makes the root).
: "${TPMPI_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"

# ADAPT: modules providing the MPI that mpi4py was built against (never PyPI's mpich wheel here)
# module load openmpi/4.1 python/3.11        # Open MPI site  -> MPI_PLUGIN=pmix
# module load cray-mpich python              # MPICH / Cray   -> MPI_PLUGIN=pmi2 (or cray_shasta)
: "${MPI_PLUGIN:=pmix}"                      # srun --mpi=...: pmix for Open MPI, pmi2 for MPICH
: "${VENV:=$TPMPI_ROOT/.venv}"              # ADAPT: venv with tpmpi installed (pip install .)
[ -f "$VENV/bin/activate" ] && . "$VENV/bin/activate"
cd "$TPMPI_ROOT" || exit 1

# One BLAS/OpenMP thread per CPU SLURM gives each task; tpmpi reads TPMPI_THREADS.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export TPMPI_THREADS="$OMP_NUM_THREADS"
export OMP_PLACES=cores OMP_PROC_BIND=close

# Results: one JSON-lines file per job (array jobs: per array task), next to the job's log.
: "${RESULTS:=$TPMPI_ROOT/results}"
mkdir -p "$RESULTS"
JOB_TAG="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}"
OUT_JSON="$RESULTS/${SLURM_JOB_NAME:-tpmpi}-$JOB_TAG.jsonl"

# Problem and sweep (override at submission: sbatch --export=ALL,SWEEP=weak,M=4096 ...)
: "${SWEEP:=strong}" "${SCHEMES:=column,row,tile2d}" "${M:=8192}" "${K:=8192}" "${N:=8192}"
: "${DTYPE:=float32}" "${ITERS:=20}" "${WARMUP:=3}"

# srun with the plugin, the task's CPUs (srun does not inherit --cpus-per-task since
# Slurm 22.05) and core binding.
tpmpi_srun() {
    # shellcheck disable=SC2086  # SRUN_EXTRA is a list of options
    srun --mpi="$MPI_PLUGIN" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --cpu-bind=cores \
        ${SRUN_EXTRA:-} "$@"
}

# tpmpi_bench [extra bench flags]: info, then the sweep on all SLURM_NTASKS ranks.
tpmpi_bench() {
    echo "tpmpi: $SLURM_JOB_NUM_NODES nodes, $SLURM_NTASKS tasks, $OMP_NUM_THREADS threads/task," \
         "sweep $SWEEP -> $OUT_JSON"
    tpmpi_srun python -m tpmpi info
    # weak: M grows with P; strong: fixed. All P of this allocation = SLURM_NTASKS ranks.
    tpmpi_srun python -m tpmpi bench --sweep "$SWEEP" --ranks "$SLURM_NTASKS" \
        --scheme "$SCHEMES" --m "$M" --k "$K" --n "$N" --dtype "$DTYPE" \
        --warmup "$WARMUP" --iters "$ITERS" ${CALIBRATION:+--calibration "$CALIBRATION"} \
        ${BENCH_ARGS:-} --json "$OUT_JSON" "$@"
}
