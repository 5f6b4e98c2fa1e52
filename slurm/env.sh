# Sourced by the tpmpi sbatch templates: site modules, Python env, MPI launch, threads, output.
# Edit the ADAPT lines for your cluster (see slurm/README.md). TPMPI_ROOT is the repository root
# (the templates set it to the job's starting directory, which submit_scaling.sh makes the root).
# Every check here runs in the batch shell, before any rank starts: a job that cannot work
# exits 2 with one "error:" line instead of failing on every rank (or running the wrong thing).
: "${TPMPI_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
TPMPI_JOB=${SLURM_JOB_NAME:-tpmpi}

# scancel and time limits SIGTERM every process of the job, this shell included: with a trap
# set, it first waits for the running launcher (whose ranks end the MPI job, rank 0 printing one
# line) instead of leaving at once and letting the job end while they still run; then it stops.
trap 'exit 143' TERM

tpmpi_die() {
    echo "$TPMPI_JOB: error: $*" >&2
    exit 2
}

# Parameters come from the submitting environment (sbatch --export=ALL, its default): sbatch
# splits --export=NAME=VALUE at every comma, so --export=ALL,SCHEMES=column,row runs column
# alone. Refuse what such a split leaves behind: a bare name that is not set (here: row).
tpmpi_check_export() {
    local part prev="" parts
    IFS=, read -ra parts <<< "${SLURM_EXPORT_ENV:-}"
    for part in "${parts[@]}"; do
        case "$part" in
            ALL|NONE|NIL|*=*) prev=$part ;;
            *)  if ! [[ $part =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || [ -z "${!part+set}" ]; then
                    tpmpi_die "sbatch --export=$SLURM_EXPORT_ENV: sbatch split '$prev,$part'" \
                        "at its comma, so ${prev%%=*} got '${prev#*=}' alone. Put values with" \
                        "commas in the environment instead: ${prev%%=*}='${prev#*=},$part...'" \
                        "sbatch --export=ALL ... (slurm/README.md)"
                fi ;;
        esac
    done
}
tpmpi_check_export

# ADAPT: modules providing the MPI that mpi4py was built against (never PyPI's mpich wheel on a
# cluster: docs/cluster.md, "Use the site MPI")
# module load openmpi/4.1 python/3.11        # Open MPI site
# module load cray-mpich python              # MPICH / Cray
: "${LAUNCHER:=srun}"   # srun: Slurm starts the ranks (PMI); mpiexec: the MPI's own launcher
: "${MPI_PLUGIN:=auto}" # srun --mpi=...; auto: the one for the MPI that mpi4py loads (below)
: "${VENV:=}"           # ADAPT: venv with tpmpi; empty: <root>/.venv, else python on PATH
if [ -n "$VENV" ]; then
    [ -f "$VENV/bin/activate" ] || tpmpi_die "VENV=$VENV: no $VENV/bin/activate"
    . "$VENV/bin/activate"
elif [ -f "$TPMPI_ROOT/.venv/bin/activate" ]; then
    . "$TPMPI_ROOT/.venv/bin/activate"
fi
cd "$TPMPI_ROOT" || tpmpi_die "TPMPI_ROOT=$TPMPI_ROOT: cannot cd there"

# Which MPI library mpi4py loads (MPI_Get_library_version may be called before MPI_Init, so
# this starts no MPI), and that tpmpi is importable -- both from the python the ranks will run.
command -v python > /dev/null || tpmpi_die "no python on PATH and no venv: create" \
    "$TPMPI_ROOT/.venv (python3 -m venv .venv && .venv/bin/pip install .) or set VENV=..."
TPMPI_MPI=$(python - 2>&1 <<'PY'
import importlib.util
import sys

missing = [name for name in ("mpi4py", "tpmpi") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"{sys.executable} cannot import {' and '.join(missing)}")
import mpi4py

mpi4py.rc.initialize = mpi4py.rc.finalize = False
from mpi4py import MPI  # noqa: E402

print(MPI.Get_library_version().split("\0")[0].strip().splitlines()[0])
PY
) || tpmpi_die "$TPMPI_MPI: set VENV=<venv with tpmpi> or create $TPMPI_ROOT/.venv" \
    "(python3 -m venv .venv && .venv/bin/pip install .)"

# srun --mpi must match the MPI: Open MPI needs PMIx (pmi2 or none make every rank fail in
# MPI_Init), MPICH-family libraries PMI-2 (PyPI's mpich aborts under pmix: "unsupported PMI
# version PMIx"); Cray MPICH uses cray_shasta.
if [ "$MPI_PLUGIN" = auto ]; then
    case "$TPMPI_MPI" in
        *"Open MPI"*) MPI_PLUGIN=pmix ;;
        *CRAY*) MPI_PLUGIN=cray_shasta ;;
        *MPICH*|*MVAPICH*|*"Intel(R) MPI"*) MPI_PLUGIN=pmi2 ;;
        *) tpmpi_die "MPI_PLUGIN=auto: no srun plugin known for '$TPMPI_MPI': set" \
               "MPI_PLUGIN to one of srun --mpi=list" ;;
    esac
fi
case "$LAUNCHER" in
    srun) TPMPI_LAUNCH="srun --mpi=$MPI_PLUGIN" ;;
    mpiexec)
        case "$TPMPI_MPI" in
            *"Open MPI"*) : "${MPIEXEC:=mpirun}" ;;
            *) : "${MPIEXEC:=mpiexec}" ;;
        esac
        command -v "$MPIEXEC" > /dev/null || tpmpi_die "MPIEXEC=$MPIEXEC: not found"
        # An mpiexec of another MPI than mpi4py's starts singletons or fails in MPI_Init.
        tpmpi_family=$("$MPIEXEC" --version 2>&1 | grep -ciE 'open[- ]?mpi|openrte' || true)
        case "$TPMPI_MPI" in *"Open MPI"*) tpmpi_want=yes ;; *) tpmpi_want=no ;; esac
        if [ "$([ "$tpmpi_family" -gt 0 ] && echo yes || echo no)" != "$tpmpi_want" ]; then
            tpmpi_die "MPIEXEC=$MPIEXEC ($(command -v "$MPIEXEC")) is not" \
                "the launcher of the MPI that mpi4py loads ($TPMPI_MPI): set MPIEXEC=<its" \
                "mpiexec/mpirun>"
        fi
        TPMPI_LAUNCH=$MPIEXEC ;;
    *) tpmpi_die "LAUNCHER=$LAUNCHER: expected srun or mpiexec" ;;
esac

# BLAS/OpenMP threads per rank (tpmpi reads TPMPI_THREADS): --cpus-per-task when given, else
# the node's CPUs (all of them under --exclusive) shared by its tasks.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    TPMPI_THREADS=$SLURM_CPUS_PER_TASK
else
    tpmpi_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
    tpmpi_per_node=${tpmpi_per_node%%[(,]*}
    TPMPI_THREADS=$(( ${SLURM_CPUS_ON_NODE:-1} / tpmpi_per_node ))
    (( TPMPI_THREADS >= 1 )) || TPMPI_THREADS=1
fi
export TPMPI_THREADS OMP_NUM_THREADS=$TPMPI_THREADS OMP_PLACES=cores OMP_PROC_BIND=close

# Results: one JSON-lines file per job (array jobs: per array task), next to the job's log.
: "${RESULTS:=$TPMPI_ROOT/results}"
mkdir -p "$RESULTS"
JOB_TAG="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+-$SLURM_ARRAY_TASK_ID}"
OUT_JSON="$RESULTS/$TPMPI_JOB-$JOB_TAG.jsonl"

# Problem and sweep, from the submitting environment: SWEEP=weak M=4096 sbatch ...
: "${SWEEP:=strong}" "${SCHEMES:=column,row,tile2d}" "${M:=8192}" "${K:=8192}" "${N:=8192}"
: "${DTYPE:=float32}" "${ITERS:=20}" "${WARMUP:=3}"

# tpmpi_launch CMD...: CMD on all SLURM_NTASKS ranks. srun gets the plugin, the task's CPUs
# (srun does not inherit --cpus-per-task since Slurm 22.05), core binding, and ends every task
# when one fails (a rank that dies in MPI_Init leaves the others spinning there). Open MPI's
# mpirun gets the same CPUs per rank (its default binds a rank to one core); MPICH's mpiexec
# (Hydra) leaves the ranks on the node's CPUs, which tpmpi divides among them. Both end every
# rank when one fails.
tpmpi_launch() {
    # shellcheck disable=SC2086  # SRUN_EXTRA and MPIEXEC_EXTRA are lists of options
    case "$LAUNCHER:$TPMPI_MPI" in
        srun:*) srun --mpi="$MPI_PLUGIN" --cpus-per-task="$TPMPI_THREADS" --cpu-bind=cores \
                    --kill-on-bad-exit=1 ${SRUN_EXTRA:-} "$@" ;;
        mpiexec:*"Open MPI"*) "$MPIEXEC" -n "$SLURM_NTASKS" --map-by "slot:PE=$TPMPI_THREADS" \
                    --bind-to core ${MPIEXEC_EXTRA:-} "$@" ;;
        mpiexec:*) "$MPIEXEC" -n "$SLURM_NTASKS" ${MPIEXEC_EXTRA:-} "$@" ;;
    esac
}

# tpmpi_info: `tpmpi info` on all ranks, and a stop unless they form ONE job of SLURM_NTASKS
# ranks (a launch that does not match the MPI starts singletons that each say "ranks 1").
tpmpi_info() {
    local info
    info=$(tpmpi_launch python -m tpmpi info) || tpmpi_die "python -m tpmpi info failed" \
        "under $TPMPI_LAUNCH (its messages above)${info:+: $info}"
    echo "$info"
    if [ "$(grep -cE "^ranks +$SLURM_NTASKS\$" <<< "$info")" != 1 ]; then
        tpmpi_die "$TPMPI_LAUNCH did not start one MPI job of $SLURM_NTASKS ranks (tpmpi" \
            "info above; MPI_PLUGIN=$MPI_PLUGIN, MPI library $TPMPI_MPI)"
    fi
}

echo "$TPMPI_JOB: ${SLURM_JOB_NUM_NODES:-?} nodes, ${SLURM_NTASKS:-?} tasks, $TPMPI_THREADS" \
     "threads/task, $TPMPI_LAUNCH, $TPMPI_MPI"

# tpmpi_bench [extra bench flags]: info, then the sweep on all SLURM_NTASKS ranks (weak: M grows
# with P; strong: fixed), each configuration's record appended to OUT_JSON as it finishes.
tpmpi_bench() {
    echo "$TPMPI_JOB: sweep $SWEEP, schemes $SCHEMES, M K N = $M $K $N, $DTYPE, $ITERS iters" \
         "-> $OUT_JSON"
    tpmpi_info
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    tpmpi_launch python -m tpmpi bench --sweep "$SWEEP" --ranks "$SLURM_NTASKS" \
        --scheme "$SCHEMES" --m "$M" --k "$K" --n "$N" --dtype "$DTYPE" \
        --warmup "$WARMUP" --iters "$ITERS" ${CALIBRATION:+--calibration "$CALIBRATION"} \
        ${BENCH_ARGS:-} --json "$OUT_JSON" "$@"
}
