#!/bin/bash
# Submit a scaling study as a job array over node counts, from any directory:
#   slurm/submit_scaling.sh cpu|gpu strong|weak ["1 2 4 8"] [extra sbatch args...]
# The node list defaults to "1 2 4 8"; extra sbatch arguments need the node list before them.
# Parameters (SCHEMES, M, ...) travel in the environment: SCHEMES=column,row slurm/submit...
# Slurm gives every task of one array the same --nodes, so each node count is submitted as
# its own array task (--array=<nodes>, same job name). Every node count is first checked with
# `sbatch --test-only`: if one cannot run on this cluster, nothing is submitted. The jobs run
# in the repository root (this script's parent directory, created results/ included): records
# land in results/tpmpi-<kind>-<sweep>-<jobid>-<nodes>.jsonl, logs next to them in .out; then
#   python -m tpmpi report results/tpmpi-cpu-strong-*.jsonl --out report-cpu-strong
set -euo pipefail
me=$(basename "$0")
usage="usage: $0 cpu|gpu strong|weak [\"1 2 4 8\"] [extra sbatch args...]"
kind=${1:-}; sweep=${2:-}; nodes=${3:-"1 2 4 8"}
case "$kind" in cpu|gpu) ;; *) echo "$0: kind '$kind': expected cpu or gpu; $usage" >&2; exit 2;; esac
case "$sweep" in strong|weak) ;; *) echo "$0: sweep '$sweep': expected strong or weak; $usage" >&2; exit 2;; esac
for n in $nodes; do
    case "$n" in ''|*[!0-9]*|0) echo "$0: node count '$n': expected positive integers, e.g. \"1 2 4\"; $usage" >&2; exit 2;; esac
done
shift $(( $# < 3 ? $# : 3 ))   # the rest are sbatch arguments
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mkdir -p results
export SWEEP="$sweep"
name="tpmpi-$kind-$sweep"
# job NODES [sbatch args]: sets JOB to the sbatch arguments of one node count
job() {
    local n=$1; shift
    JOB=(--chdir="$root" --nodes="$n" --array="$n" --job-name="$name"
         --output="results/%x-%A-%a.out" --export=ALL "$@" "slurm/${kind}_scaling.sbatch")
}

refused=0
for n in $nodes; do
    job "$n" "$@"
    if ! msg=$(sbatch --test-only "${JOB[@]}" 2>&1); then
        echo "$me: $kind $sweep on $n node(s) cannot run here: ${msg//$'\n'/ }" >&2
        refused=1
    fi
done
if (( refused )); then
    echo "$me: nothing submitted (sinfo shows the partitions; adapt --nodes," \
         "--ntasks-per-node, --cpus-per-task or the partition)" >&2
    exit 1
fi

submitted=()
for n in $nodes; do
    job "$n" "$@"
    if ! id=$(sbatch --parsable "${JOB[@]}"); then
        echo "$me: submitting $n node(s) failed (message above)" >&2
        if (( ${#submitted[@]} )); then
            echo "$me: cancelling the jobs already submitted: ${submitted[*]}" >&2
            scancel "${submitted[@]}"
        fi
        exit 1
    fi
    id=${id%%;*}
    submitted+=("$id")
    echo "$me: $n node(s): job $id -> results/$name-$id-$n.jsonl (log .out)"
done
