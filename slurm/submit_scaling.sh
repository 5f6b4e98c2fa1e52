#!/bin/bash
# Submit a scaling study as a job array over node counts:
#   slurm/submit_scaling.sh cpu|gpu strong|weak "1 2 4 8" [extra sbatch args...]
# Slurm gives every task of one array the same --nodes, so each node count is submitted as
# its own array task (--array=<nodes>, same job name): results land in
# results/tpmpi-<kind>-<sweep>-<jobid>-<nodes>.jsonl, one file per job; then
#   python -m tpmpi report results/tpmpi-cpu-strong-*.jsonl --out report-cpu-strong
set -euo pipefail
kind=${1:?cpu or gpu}; sweep=${2:?strong or weak}; nodes=${3:-"1 2 4 8"}; shift 3 || true
cd "$(dirname "$0")/.."
mkdir -p results
for n in $nodes; do
    sbatch --nodes="$n" --array="$n" --job-name="tpmpi-$kind-$sweep" \
        --export=ALL,SWEEP="$sweep" "$@" "slurm/${kind}_scaling.sbatch"
done
