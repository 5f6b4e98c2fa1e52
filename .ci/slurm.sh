#!/usr/bin/env bash
# CI stage: tpmpi's SLURM templates under a real Slurm on this machine (Debian, root, no
# systemd). Installs Debian's slurmctld, slurmd, slurm-client, munge, libpmix-dev (before any
# slurmd starts: srun --mpi=pmix needs it) and openmpi-bin; starts a one-node cluster with
# slurm/local_cluster.sh (the recipe of docs/cluster.md, "Try it on your laptop") and runs
# tests/test_slurm_cluster.py; then the same on an emulated two-node cluster (two slurmd on
# this host). Every daemon it started is stopped by its PID, on success and on failure, and
# checked gone. Uses the venv .ci-venv of .ci/run when it is there, else makes one.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== SLURM: packages"
need=()
for pkg in slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if (( ${#need[@]} )); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" > /dev/null
fi
if [ ! -x .ci-venv/bin/python ] || ! .ci-venv/bin/python -c "import tpmpi" 2> /dev/null; then
    rm -rf .ci-venv
    python3 -m venv .ci-venv
    .ci-venv/bin/python -m pip install -q --upgrade pip
    .ci-venv/bin/python -m pip install -q ".[mpich,test]"
fi
. .ci-venv/bin/activate

export TPMPI_SLURM_DIR
TPMPI_SLURM_DIR=$(mktemp -d /tmp/tpmpi-slurm-ci.XXXXXX)
export SLURM_CONF=$TPMPI_SLURM_DIR/etc/slurm.conf
pids=()
finish() {
    local rc=$? p
    bash slurm/local_cluster.sh stop || rc=1
    for p in "${pids[@]}"; do
        if kill -0 "$p" 2> /dev/null; then
            echo "SLURM stage: daemon $p still alive after stop" >&2
            rc=1
        fi
    done
    rm -rf "$TPMPI_SLURM_DIR"
    exit "$rc"
}
trap finish EXIT

for nodes in 1 2; do
    echo "== SLURM: $nodes node(s): slurm/local_cluster.sh start $nodes"
    bash slurm/local_cluster.sh start "$nodes"
    for f in "$TPMPI_SLURM_DIR"/run/*.pid "$TPMPI_SLURM_DIR"/munge/munged.pid; do
        pids+=("$(cat "$f")")
    done
    echo "== SLURM: $nodes node(s): python -m pytest tests/test_slurm_cluster.py"
    timeout 1800 python -m pytest -q tests/test_slurm_cluster.py
    echo "== SLURM: $nodes node(s): the jobs (Slurm's job completion log)"
    python - "$TPMPI_SLURM_DIR/log/jobcomp.log" <<'PY'
import re, sys
keys = ("JobId", "Name", "JobState", "ExitCode", "NodeCnt", "ProcCnt", "StartTime", "EndTime",
        "WorkDir")
print(" ".join(f"{k:>9}" if k != "WorkDir" else k for k in keys))
for line in open(sys.argv[1]):
    job = dict(re.findall(r"(\w+)=(\S*)", line))
    job["WorkDir"] = job["WorkDir"].rsplit("/", 1)[-1]  # the launch mode's job root
    print(" ".join(f"{job[k]:>9}" if k != "WorkDir" else job[k] for k in keys))
PY
    bash slurm/local_cluster.sh stop
done
