#!/usr/bin/env bash
# A private one-node SLURM cluster on this machine (for tests/test_slurm_real.py and for trying slurm/*.sbatch
# by hand). Needs Debian's slurm-wlm and munge packages.
#   bash scripts/slurm_cluster.sh start  DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf            # then sbatch / squeue / scontrol / scancel talk to it
#   bash scripts/slurm_cluster.sh status DIR
#   bash scripts/slurm_cluster.sh stop   DIR   # cancels its jobs, stops its three daemons by their pids
# Everything lives under DIR: its own munge key and socket, state, spool, pid and log files, and free TCP ports,
# so it does not touch (or clash with) a system munged/slurm or another such cluster. start and stop are
# idempotent. The node gets this machine's CPU count and memory; no GRES (override the scripts' --gpus-per-node,
# see slurm/README.md).
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
(( $# == 2 )) || usage
CMD=$1
[[ $CMD == start ]] && mkdir -p "$2"
if [[ ! -d $2 ]]; then echo "slurm_cluster: no cluster in $2 (not running)"; exit 0; fi
DIR=$(cd "$2" && pwd)
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
DAEMONS=(munged slurmctld slurmd)

pidfile() { case $1 in munged) echo "$DIR/munge/munged.pid" ;; *) echo "$DIR/run/$1.pid" ;; esac; }
pid_of() { local f; f=$(pidfile "$1"); [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"; return 0; }
running() { [[ -n $(pid_of "$1") ]]; }

need() {
    local missing=()
    for b in munged slurmctld slurmd sbatch scontrol; do
        command -v "$b" > /dev/null || [[ -x /usr/sbin/$b ]] || missing+=("$b")
    done
    if (( ${#missing[@]} )); then
        echo "slurm_cluster: missing ${missing[*]}; install with: apt-get install -y slurm-wlm munge" >&2
        exit 1
    fi
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_conf() {
    local mem cpus ctld_port slurmd_port
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # MiB, leave some to the OS
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done
    cat > "$CONF" <<EOF
# written by scripts/slurm_cluster.sh: a one-node cluster, everything under $DIR
ClusterName=tokenprune
SlurmctldHost=$HOST
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmUser=$(id -un)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    running munged && return 0
    local m=$DIR/munge
    mkdir -p "$m"
    chmod 0755 "$m"  # clients of every user reach the socket through it
    [[ -s $m/munge.key ]] || { dd if=/dev/urandom of="$m/munge.key" bs=1 count=1024 status=none; chmod 0600 "$m/munge.key"; }
    # munged refuses to run as root without --force; as its own user it needs the files to be its own
    local run=()
    if (( EUID == 0 )) && id munge > /dev/null 2>&1; then
        chown -R munge: "$m"
        run=(runuser -u munge --)
    fi
    "${run[@]}" /usr/sbin/munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed"
}

wait_for() {  # wait_for SECONDS COMMAND...: poll until the command succeeds
    local t=$1; shift
    for ((i = 0; i < t * 5; i++)); do "$@" > /dev/null 2>&1 && return 0; sleep 0.2; done
    return 1
}

node_up() { [[ $(SLURM_CONF=$CONF sinfo -h -n "$HOST" -o %t 2>/dev/null) =~ ^(idle|mix|alloc) ]]; }

start() {
    need
    if running slurmctld && running slurmd && running munged; then
        echo "slurm_cluster: already running in $DIR"; status; return 0
    fi
    mkdir -p "$DIR"/{state,spool,run,log}
    chmod 0755 "$DIR"
    [[ -s $CONF ]] || write_conf
    start_munged
    export SLURM_CONF=$CONF
    running slurmctld || /usr/sbin/slurmctld -f "$CONF" -i
    wait_for 20 scontrol ping || { echo "slurm_cluster: slurmctld did not answer; see $DIR/log/slurmctld.log" >&2; exit 1; }
    running slurmd || /usr/sbin/slurmd -f "$CONF" -N "$HOST"
    wait_for 30 node_up || { echo "slurm_cluster: node $HOST not up; see $DIR/log/slurmd.log" >&2; status; exit 1; }
    echo "slurm_cluster: started; export SLURM_CONF=$CONF"
    status
}

stop() {
    if running slurmctld; then  # its jobs first: slurmstepd and the job processes outlive slurmd
        local jobs
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            wait_for 30 bash -c "[[ -z \$(SLURM_CONF=$CONF squeue -h -o %A) ]]" || true
        fi
    fi
    for d in slurmd slurmctld munged; do
        local pid
        pid=$(pid_of "$d")
        [[ -n $pid ]] || continue
        kill "$pid" 2>/dev/null || true
        wait_for 15 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
    done
    echo "slurm_cluster: stopped (logs in $DIR/log and $DIR/munge/munged.log)"
}

status() {
    local d
    for d in "${DAEMONS[@]}"; do
        printf '  %-10s %s\n' "$d" "$(running "$d" && echo "pid $(pid_of "$d")" || echo "not running")"
    done
    echo "  conf       $CONF"
    echo "  logs       $DIR/log/slurmctld.log $DIR/log/slurmd.log $DIR/munge/munged.log"
    if running slurmctld; then SLURM_CONF=$CONF sinfo 2>&1 | sed 's/^/  /'; fi
}

case $CMD in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
