#!/bin/bash
# A real Slurm cluster on this one machine: one slurmctld and N slurmd daemons, each slurmd a
# node of its own (name, port, spool, pid and log file). It lets `sbatch`, job arrays,
# dependencies, --signal and --requeue, and submitit's SlurmExecutor run for real on a
# workstation or a CI machine.
#
#   tools/local_slurm.sh start [--nodes N]   # installs slurm-wlm + munge if missing (apt)
#   tools/local_slurm.sh status
#   tools/local_slurm.sh stop                # cancels jobs, stops every daemon it started
#
# Needs root (the daemons run as root: SlurmUser=root). Configuration, state and logs live in
# $EVR1_SLURM_DIR (default /tmp/evr1-slurm); /etc/slurm/slurm.conf links there while the
# cluster runs, so plain `sbatch`/`squeue` find it. Environment knobs:
#   EVR1_SLURM_DIR    state folder                    (default /tmp/evr1-slurm)
#   EVR1_SLURM_PORT   slurmctld port; node i gets +i  (default 17600)
#   EVR1_SLURM_CPUS   CPUs each node advertises       (default 2)
set -euo pipefail

DIR=${EVR1_SLURM_DIR:-/tmp/evr1-slurm}
PORT=${EVR1_SLURM_PORT:-17600}
CPUS=${EVR1_SLURM_CPUS:-2}
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET_DIR=/run/munge
START_TIMEOUT_S=60

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    echo "usage: $0 start [--nodes N] | stop | status" >&2
    exit 2
}

# ------------------------------------------------------------------------------ packages

ensure_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get"
    log "installing slurm-wlm and munge (apt-get)"
    # Non-interactive: CI has no terminal, and the packages ask nothing we need to answer.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

# ------------------------------------------------------------------------------ munge

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return  # a munged is already serving this host (ours or the system's): share it
    fi
    install -d -o munge -g munge -m 0755 "$MUNGE_SOCKET_DIR"
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged 9>&-  # the daemon must not inherit our lock
    for _ in $(seq 50); do munge_works && break; sleep 0.1; done
    munge_works || die "munged did not start (see /var/log/munge/munged.log)"
    # Remember that this script started it, so that stop only stops a munged of its own.
    cp "$MUNGE_SOCKET_DIR/munged.pid" "$DIR/munged.pid"
}

# ------------------------------------------------------------------------------ config

write_conf() {
    local nodes=$1 host mem
    host=$(hostname -s)
    # Split the machine's memory over the nodes, so that a job asking for a few GB fits.
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / nodes ))
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    {
        cat <<EOF
# Written by tools/local_slurm.sh: a $nodes-node cluster on one machine.
ClusterName=evr1local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups: processes are tracked through /proc and tasks are not pinned to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every second (defaults: 60 s and 30 s), so that a requeued job or a
# job whose dependency just finished starts at once: tests wait for these.
SchedulerParameters=sched_interval=1,bf_interval=1
# The nodes advertise more than this machine may have: don't let slurmd refuse them for it.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
EOF
        for i in $(seq "$nodes"); do
            echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i))" \
                "CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
        done
        # OverSubscribe=YES: jobs that ask for it (sbatch --oversubscribe) may share CPUs.
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" \
             "OverSubscribe=YES"
    } >"$CONF"
    echo "$nodes" >"$DIR/nodes"
}

link_system_conf() {
    # Client commands read /etc/slurm/slurm.conf; never replace a real site configuration.
    if [[ -e $SYSTEM_CONF && ! -L $SYSTEM_CONF ]]; then
        log "$SYSTEM_CONF is a real file: left alone; use: export SLURM_CONF=$CONF"
        return
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

unlink_system_conf() {
    if [[ -L $SYSTEM_CONF && $(readlink "$SYSTEM_CONF") == "$CONF" ]]; then
        rm -f "$SYSTEM_CONF"
    fi
}

# ------------------------------------------------------------------------------ daemons

# The pid in a pid file is alive and still the daemon the file is named after (slurmd-n1.pid:
# slurmd): a stale file whose pid was reused by another process must not get that one killed.
pid_alive() {
    local file=$1 name
    name=$(basename "$file" .pid)
    [[ -s $file && $(cat "/proc/$(cat "$file")/comm" 2>/dev/null) == "${name%%-*}" ]]
}

node_count() { cat "$DIR/nodes" 2>/dev/null || echo 0; }

controller_up() {
    # Without its config file scontrol keeps retrying for a minute: check the file first.
    [[ -s $CONF ]] && timeout 10 env SLURM_CONF="$CONF" scontrol ping 2>/dev/null | grep -q UP
}

idle_nodes() {
    SLURM_CONF=$CONF sinfo -h -N -o "%N %t" 2>/dev/null | awk '$2 == "idle" || $2 == "mix" \
        || $2 == "alloc" {n++} END {print n + 0}'
}

start_daemons() {
    local nodes=$1
    pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" 9>&-
    for i in $(seq "$nodes"); do
        mkdir -p "$DIR/spool/n$i"  # slurmd does not create its own spool folder
        pid_alive "$DIR/slurmd-n$i.pid" || slurmd -f "$CONF" -N "n$i" 9>&-
    done
}

wait_until_ready() {
    local nodes=$1 deadline=$((SECONDS + START_TIMEOUT_S))
    until controller_up && [[ $(idle_nodes) -eq $nodes ]]; do
        if ((SECONDS > deadline)); then
            SLURM_CONF=$CONF sinfo -N 2>&1 | sed 's/^/  /' >&2 || true
            die "nodes not up after ${START_TIMEOUT_S}s; logs in $DIR/log"
        fi
        sleep 0.5
    done
}

stop_pidfile() {
    local file=$1 pid
    pid_alive "$file" || { rm -f "$file"; return; }
    pid=$(cat "$file")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid"
    fi
    rm -f "$file"
}

cancel_all_jobs() {
    controller_up || return 0
    local ids
    ids=$(SLURM_CONF=$CONF squeue -h -o %A)
    [[ -n $ids ]] || return 0
    log "cancelling jobs: $(echo "$ids" | tr '\n' ' ')"
    # shellcheck disable=SC2086  # one id per word
    SLURM_CONF=$CONF scancel $ids || true
    for _ in $(seq 60); do
        [[ -z $(SLURM_CONF=$CONF squeue -h -o %A) ]] && return 0
        sleep 0.5
    done
    log "some jobs did not end in 30 s"
}

# ------------------------------------------------------------------------------ commands

cmd_start() {
    local nodes=$1
    [[ $EUID -eq 0 ]] || die "start needs root (the daemons run as SlurmUser=root)"
    ensure_packages
    mkdir -p "$DIR"
    if controller_up && [[ $(node_count) -ne $nodes ]]; then
        log "running with $(node_count) node(s); restarting with $nodes"
        cmd_stop
    fi
    start_munge
    if ! pid_alive "$DIR/slurmctld.pid"; then
        write_conf "$nodes"
    fi
    link_system_conf
    start_daemons "$nodes"
    wait_until_ready "$nodes"
    log "up: $nodes node(s), config $CONF"
    SLURM_CONF=$CONF sinfo -N
}

cmd_stop() {
    [[ $EUID -eq 0 ]] || die "stop needs root"
    cancel_all_jobs
    for file in "$DIR"/slurmd-*.pid; do
        [[ -e $file ]] && stop_pidfile "$file"
    done
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$DIR/munged.pid"  # only present when this script started munged
    unlink_system_conf
    log "stopped"
}

cmd_status() {
    if ! controller_up; then
        echo "local_slurm: not running"
        return 1
    fi
    SLURM_CONF=$CONF sinfo -N
    SLURM_CONF=$CONF squeue
}

main() {
    [[ $# -ge 1 ]] || usage
    local cmd=$1 nodes=2
    shift
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) usage ;;
        esac
    done
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive number, got $nodes"
    mkdir -p "$DIR"
    # One start/stop at a time: two test sessions may both try to bring the cluster up.
    exec 9>"$DIR/.lock"
    flock 9
    case $cmd in
        start) cmd_start "$nodes" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        *) usage ;;
    esac
}

main "$@"
