#!/usr/bin/env bash
# A real single-node SLURM cluster on this host, for the workflow's SLURM tests.
#
#   tests/slurm/cluster.sh install   apt-get install slurm-wlm and munge if they are missing
#   tests/slurm/cluster.sh start     install if needed, write slurm.conf, start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop      cancel the cluster's jobs and stop what `start` started
#   tests/slurm/cluster.sh check     exit 3, saying why, where a slurm.conf this script did not
#                                    write is in the way (a real cluster's: `start` would refuse)
#
# Debian's Slurm (22.05 on Debian 12) without an accounting database: `sacct` cannot answer,
# so clients must ask `squeue` (MinJobAge keeps finished jobs visible there for 5 minutes).
# Needs root. The cluster listens on 127.0.0.1 only. The node's CPUs and memory come from
# `slurmd -C`; its partition is `debug`. State, spool and logs go to $SMALLTALK_SLURM_DIR
# (default /tmp/smalltalk-slurm); slurm.conf goes to /etc/slurm, where every Slurm command and
# the job steps inside jobs find it, and is only ever written or removed when it carries this
# script's marker line, so a real cluster's configuration is never touched. Where $SLURM_CONF is
# set, Slurm's commands read their configuration from there instead, and so does this script.
set -euo pipefail

STATE_DIR=${SMALLTALK_SLURM_DIR:-/tmp/smalltalk-slurm}
SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARKER="# Written by smalltalk tests/slurm/cluster.sh"
PARTITION=debug
FOREIGN_CONF=3  # the exit status of `check` where another's slurm.conf is in the way

log() { echo "cluster.sh: $*" >&2; }

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "needs root (it installs packages and starts the SLURM daemons)"
        exit 1
    fi
}

install_packages() {
    local missing=0 tool
    for tool in sbatch squeue slurmctld slurmd munged; do
        command -v "$tool" >/dev/null || missing=1
    done
    [[ $missing -eq 1 ]] || return 0
    require_root
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

munge_answers() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# No slurm.conf, or one this script wrote: nobody else's configuration to overwrite.
conf_is_free() { [[ ! -e $SLURM_CONF ]] || grep -qxF "$MARKER" "$SLURM_CONF"; }

check() {
    if ! conf_is_free; then
        log "$SLURM_CONF exists and was not written by this script; not touching it"
        exit "$FOREIGN_CONF"
    fi
}

cluster_answers() { timeout 10 sinfo -h >/dev/null 2>&1; }

start_munge() {
    if munge_answers; then
        return  # a munged is already serving this host: use it, and leave it running
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    for _ in $(seq 50); do munge_answers && return; sleep 0.2; done
    log "munged did not answer"
    exit 1
}

write_conf() {
    check
    local host node
    host=$(hostname -s)
    # slurmd -C prints this host's NodeName line (CPUs, sockets, cores, RealMemory) and UpTime.
    node=$(slurmd -C | head -n 1)
    mkdir -p "$(dirname "$SLURM_CONF")" "$STATE_DIR/state" "$STATE_DIR/spool"
    cat >"$SLURM_CONF" <<EOF
$MARKER
# A single-node test cluster on 127.0.0.1; no accounting database, no cgroups.
ClusterName=smalltalk-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue keeps finished jobs for MinJobAge seconds: Snakemake reads their final state there.
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    require_root
    install_packages
    mkdir -p "$STATE_DIR"
    start_munge
    if [[ -e $SLURM_CONF ]] && grep -qxF "$MARKER" "$SLURM_CONF" && cluster_answers; then
        log "the test cluster is already running"
    else
        write_conf
        slurmctld -c  # -c: start clean, without the state of an earlier test cluster
        slurmd
    fi
    for _ in $(seq 60); do
        if [[ $(sinfo -h -n "$(hostname -s)" -o %t 2>/dev/null) == idle* ]]; then
            log "cluster up: partition $PARTITION, $(sinfo -h -o '%c CPUs, %m MB')"
            return
        fi
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    log "the node did not become idle; see $STATE_DIR/slurmctld.log and slurmd.log"
    sinfo -R >&2 || true
    exit 1
}

stop_pid_file() {
    local file=$1
    [[ -s $file ]] || return 0
    local pid
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$file"
}

stop() {
    require_root
    if [[ -e $SLURM_CONF ]] && grep -qxF "$MARKER" "$SLURM_CONF"; then
        if cluster_answers; then
            scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
        fi
        stop_pid_file "$STATE_DIR/slurmd.pid"
        stop_pid_file "$STATE_DIR/slurmctld.pid"
        rm -f "$SLURM_CONF"
    fi
    stop_pid_file "$STATE_DIR/munged.pid"  # only a munged that `start` started
    log "stopped"
}

case ${1:-} in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    check) check ;;
    *)
        echo "usage: $0 install|start|stop|check" >&2
        exit 2
        ;;
esac
