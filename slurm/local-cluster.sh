#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the sbatch templates.
#
#   slurm/local-cluster.sh start    install slurm-wlm + munge if missing (root), write slurm.conf, start
#                                   munged, slurmctld, slurmd; wait until the node is idle
#   slurm/local-cluster.sh stop     stop the three daemons
#   slurm/local-cluster.sh status   print daemon state and `sinfo`; exit 0 only if the node is up
#
# Idempotent: `start` on a running cluster only checks it. State, logs and pid files live in
# $FAHR_SLURM_STATE (default /tmp/fahr-slurm). Partition: "debug" (default, no time limit).
# Env: FAHR_SLURM_TIMEOUT (s, default 60) bounds the wait for the node to become idle.
set -euo pipefail

STATE=${FAHR_SLURM_STATE:-/tmp/fahr-slurm}
TIMEOUT=${FAHR_SLURM_TIMEOUT:-60}
CONF_DIR=/etc/slurm            # where the Debian binaries look for slurm.conf
CONF=$CONF_DIR/slurm.conf

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

running() {  # running <pidfile>
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed and installing them needs root:
    sudo apt-get install -y slurm-wlm munge   (then re-run: $0 start)"
    say "installing slurm-wlm and munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    # nproc honours OMP_NUM_THREADS (a test run's 1 thread would make a 1-CPU node on which a
    # 2-CPU job pends forever); the CPUs this process may use are what the node offers
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # Leave ~10% for the OS; slurmd refuses to register a node claiming more memory than it has.
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$STATE"/{ctld,d,log} "$CONF_DIR"
    if [[ -f $CONF ]] && ! grep -q "^# Written by fahr slurm/local-cluster.sh" "$CONF"; then
        die "$CONF exists and was not written by this script: this machine has its own SLURM; not touching it"
    fi
    cat > "$CONF" <<EOF
# Written by fahr slurm/local-cluster.sh: a one-node test cluster. Not for production.
ClusterName=fahr-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups in containers: track processes through /proc and bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
# --requeue after a preemption signal must be allowed
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c munged 2>/dev/null || munged --force
    else
        munged --force
    fi
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle|mixed|allocated|completing) return 0 ;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "the node did not become idle within ${TIMEOUT}s (last sinfo state: '${state:-no answer}').
    Logs: $STATE/log/slurmctld.log, $STATE/log/slurmd.log"
}

start() {
    if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid"; then
        wait_idle
        say "already running: $(sinfo -h -N -o '%N %T %c CPUs')"
        return
    fi
    install
    [[ $(id -u) == 0 ]] || die "starting the daemons needs root (they run as SlurmUser=root)"
    write_conf
    start_munge
    running "$STATE/slurmctld.pid" || slurmctld -c    # -c: fresh state, no stale jobs from an earlier run
    for _ in $(seq 20); do scontrol ping >/dev/null 2>&1 && break; sleep 0.5; done
    running "$STATE/slurmd.pid" || slurmd
    wait_idle
    say "up: $(sinfo -h -N -o '%N %T %c CPUs')"
}

stop_one() {  # stop_one <name> <pidfile>
    local pid
    if running "$2"; then
        pid=$(cat "$2")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        say "stopped $1"
    fi
    rm -f "$2"
}

stop() {
    stop_one slurmd "$STATE/slurmd.pid"
    stop_one slurmctld "$STATE/slurmctld.pid"
    # munged's own pid file; only ours if we started it, but the test cluster is the only user here.
    # Waited for like the others: a `start` right after would see it still running and not restart it.
    if pgrep -x munged >/dev/null && [[ -f /run/munge/munged.pid ]]; then
        stop_one munged /run/munge/munged.pid
    fi
    return 0
}

status() {
    local ok=0
    for d in slurmctld slurmd; do
        if running "$STATE/$d.pid"; then echo "$d: running (pid $(cat "$STATE/$d.pid"))"; else echo "$d: stopped"; ok=1; fi
    done
    pgrep -x munged >/dev/null && echo "munged: running" || { echo "munged: stopped"; ok=1; }
    ((ok == 0)) && sinfo -N -o '%N %P %T %c %m' || true
    return $ok
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
