#!/bin/bash
# Submit a scaling study as a job array over node counts, from any directory:
#   slurm/submit_scaling.sh cpu|gpu strong|weak ["1 2 4 8"] [extra sbatch args...]
# The node list defaults to "1 2 4 8"; extra sbatch arguments need the node list before them.
# Slurm gives every task of one array the same --nodes, so each node count is submitted as
# its own array task (--array=<nodes>, same job name). The jobs run in the repository root
# (this script's parent directory, created results/ included): results land in
# results/tpmpi-<kind>-<sweep>-<jobid>-<nodes>.jsonl, one file per job; then
#   python -m tpmpi report results/tpmpi-cpu-strong-*.jsonl --out report-cpu-strong
set -euo pipefail
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
for n in $nodes; do
    sbatch --chdir="$root" --nodes="$n" --array="$n" --job-name="tpmpi-$kind-$sweep" \
        --export=ALL,SWEEP="$sweep" "$@" "slurm/${kind}_scaling.sbatch"
done
