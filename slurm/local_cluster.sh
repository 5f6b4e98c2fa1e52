#!/bin/bash
# A real SLURM on this one machine, to rehearse the templates before spending an allocation
# (docs/cluster.md, "Try it on your laptop") and to test them in CI (.ci/slurm.sh):
#   slurm/local_cluster.sh start [NODES]   # munged, slurmctld, NODES slurmd (default 1); prints
#                                          # the line to export for sbatch/srun/squeue
#   slurm/local_cluster.sh stop            # cancels every job, stops the daemons by their PIDs
#   slurm/local_cluster.sh status          # sinfo and squeue, or why not
# Needs root (slurmd starts jobs as their user) and Debian/Ubuntu's packages:
#   apt-get install -y slurmctld slurmd slurm-client munge libpmix-dev
# (libpmix-dev before the first start: srun --mpi=pmix dlopens its libpmix.so). Everything --
# configuration, munge key and socket, state, logs, PID files -- lives in TPMPI_SLURM_DIR
# (default /tmp/tpmpi-slurm); nothing is written to /etc and no system service is touched.
# NODES=1 is one node described exactly as `slurmd -C` sees this machine; NODES>1 emulates a
# cluster of NODES such nodes (n1, n2, ...: one slurmd each, on ports PORT+1, PORT+2, ...).
# TPMPI_SLURM_PORT (default 6817) is slurmctld's port.
set -euo pipefail
S=${TPMPI_SLURM_DIR:-/tmp/tpmpi-slurm}
PORT=${TPMPI_SLURM_PORT:-6817}
CONF=$S/etc/slurm.conf
me="local_cluster.sh"

die() { echo "$me: $*" >&2; exit 1; }

# kill_pidfile FILE: SIGTERM the process FILE names, SIGKILL it after 15 s if still alive.
kill_pidfile() {
    local p
    [ -s "$1" ] || return 0
    p=$(cat "$1")
    if kill "$p" 2>/dev/null; then
        for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$p" 2>/dev/null; then
            echo "$me: pid $p ($1) ignored SIGTERM: SIGKILL" >&2
            kill -9 "$p" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

stop() {
    [ -d "$S" ] || { echo "$me: no cluster in $S"; return 0; }
    export SLURM_CONF=$CONF
    if [ -s "$S/run/slurmctld.pid" ] && kill -0 "$(cat "$S/run/slurmctld.pid")" 2>/dev/null; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// }" ]; then
            echo "$me: cancelling jobs $jobs"
            # shellcheck disable=SC2086  # a list of job ids
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    local f
    for f in "$S"/run/slurmd-*.pid "$S/run/slurmctld.pid" "$S/munge/munged.pid"; do
        [ -e "$f" ] && kill_pidfile "$f"
    done
    echo "$me: stopped the cluster in $S (logs in $S/log)"
}

start() {
    local nodes=${1:-1}
    case "$nodes" in ''|*[!0-9]*|0) die "NODES '$nodes': expected a positive integer";; esac
    [ "$(id -u)" = 0 ] || die "needs root (slurmd launches jobs as their user); in a container:" \
        "docker run -it debian:bookworm"
    local tool
    for tool in slurmctld slurmd sbatch munged mungekey; do
        command -v "$tool" > /dev/null || PATH=$PATH:/usr/sbin command -v "$tool" > /dev/null \
            || die "'$tool' not found: apt-get install -y slurmctld slurmd slurm-client munge" \
                   "libpmix-dev"
    done
    export PATH=$PATH:/usr/sbin
    if [ -s "$S/run/slurmctld.pid" ] && kill -0 "$(cat "$S/run/slurmctld.pid")" 2>/dev/null; then
        die "a cluster already runs from $S: $0 stop first"
    fi
    rm -rf "$S"
    mkdir -p "$S"/etc "$S"/state "$S"/run "$S"/log "$S"/munge
    chmod 755 "$S"
    trap 'echo "$me: start failed: stopping what it started" >&2; stop >&2' EXIT

    # munge: a key of our own, its socket in $S, the daemon as the munge user.
    id munge > /dev/null 2>&1 || die "no 'munge' user: apt-get install -y munge"
    # munged wants its socket directory searchable by all and its key private.
    mkdir -p "$S/munge/private"
    mungekey --create --keyfile="$S/munge/private/munge.key"
    chown -R munge:munge "$S/munge"
    chmod 711 "$S/munge"; chmod 700 "$S/munge/private"; chmod 400 "$S/munge/private/munge.key"
    local sock=$S/munge/munge.socket
    runuser -u munge -- munged --socket="$sock" --key-file="$S/munge/private/munge.key" \
        --pid-file="$S/munge/munged.pid" --log-file="$S/munge/private/munged.log" \
        --seed-file="$S/munge/private/munged.seed" \
        || die "munged did not start (its message above; log $S/munge/private/munged.log)"
    munge -S "$sock" -n | unmunge -S "$sock" > /dev/null || die "munge does not work: see" \
        "$S/munge/private/munged.log"

    # The node(s): CPUs, sockets, cores, threads and memory as slurmd sees this machine.
    local host hw i node_lines=""
    host=$(hostname -s)
    hw=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
    if [ "$nodes" = 1 ]; then
        node_lines="NodeName=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) $hw State=UNKNOWN"
    else
        for i in $(seq 1 "$nodes"); do
            node_lines+="NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i))"
            node_lines+=" $hw State=UNKNOWN"$'\n'
        done
    fi
    cat > "$CONF" <<CONF
# Written by tpmpi's slurm/local_cluster.sh: $nodes node(s) on $host.
ClusterName=tpmpi-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool-%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$S/etc/plugstack.conf
MailProg=/bin/true
# A request that can never fit this partition fails at sbatch instead of pending forever.
EnforcePartLimits=ALL
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
# scancel / time limit: SIGTERM, then SIGKILL after KillWait seconds (Slurm's default).
KillWait=30
# Job ids that no earlier start of this script handed out (100 per second since the epoch,
# modulo a week): MPICH names its shared memory after the job and step ids and reopens a
# segment that a killed step left in /dev/shm, so a reused id fails in MPI_Init ("UCX ERROR
# failed to unpack address").
FirstJobId=$(( $(date +%s) % 604800 * 100 + 1 ))
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$S/log/jobcomp.log
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    : > "$S/etc/plugstack.conf"
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF" -c
    # One slurmd per node, each with its own mpi.conf: two slurmstepds on one host must not
    # share PMIx's client directory (srun --mpi=pmix fails with "File exists" otherwise).
    local name names
    names=$(sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF")
    for name in $names; do
        mkdir -p "$S/etc-$name" "$S/pmix-$name"
        cp "$CONF" "$S/etc/plugstack.conf" "$S/etc-$name/"
        echo "PMIxCliTmpDirBase=$S/pmix-$name" > "$S/etc-$name/mpi.conf"
        slurmd -f "$S/etc-$name/slurm.conf" -N "$name"
    done
    for _ in $(seq 1 120); do
        [ "$(sinfo -h -o '%T %D' 2>/dev/null)" = "idle $nodes" ] && break
        sleep 0.5
    done
    if [ "$(sinfo -h -o '%T %D' 2>/dev/null)" != "idle $nodes" ]; then
        sinfo >&2 || true
        tail -n 20 "$S"/log/*.log >&2
        die "the $nodes node(s) did not become idle in 60 s (logs above, in $S/log)"
    fi
    trap - EXIT
    sinfo
    echo "$me: running; for sbatch, srun, squeue, scancel: export SLURM_CONF=$CONF"
}

status() {
    [ -f "$CONF" ] || die "no cluster in $S ($0 start)"
    SLURM_CONF=$CONF sinfo && SLURM_CONF=$CONF squeue
}

case "${1:-}" in
    start) start "${2:-1}" ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start [NODES] | stop | status" ;;
esac
