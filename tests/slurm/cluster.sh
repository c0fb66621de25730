#!/usr/bin/env bash
# A throwaway SLURM cluster on this one machine, for the launcher's end-to-end tests
# (tests/slurm/test_slurm.py): one slurmctld and two slurmd as the logical nodes n1 and n2
# (Debian's Slurm is built with MULTIPLE_SLURMD), no accounting daemon, no cgroups, no systemd.
#
#   tests/slurm/cluster.sh install     apt-get the packages if slurmctld is missing (root; idempotent)
#   tests/slurm/cluster.sh start DIR   write DIR/slurm.conf, start munged (if not running), slurmctld
#                                      and both slurmd; return once both nodes are idle
#   tests/slurm/cluster.sh stop DIR    cancel every job, stop the daemons started by `start DIR`
#
# Everything lives under DIR (config, state, spool, logs, pid files); use a fresh DIR per start (a
# reused state dir keeps old jobs, a wiped one restarts job ids at 1). Clients need the config:
#   export SLURM_CONF=DIR/slurm.conf
# Ports: SlurmctldPort and the two SlurmdPorts are three consecutive free TCP ports, picked at start
# (override the first with SLURM_TEST_PORT). Waits are bounded: SLURM_TEST_WAIT_S (default 60).
set -euo pipefail

export PATH=$PATH:/usr/sbin:/sbin
wait_s=${SLURM_TEST_WAIT_S:-60}
packages=(slurmctld slurmd slurm-client munge)

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

need_root() {
    ((EUID == 0)) || die "$1 needs root (daemons run as root; SlurmUser=root)"
}

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null
}

cmd_install() {
    if installed; then
        return 0
    fi
    need_root install
    command -v apt-get >/dev/null || die "no apt-get: install ${packages[*]} by hand"
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/slurm-install.XXXXXX")
    echo "cluster.sh: installing ${packages[*]} (apt-get)" >&2
    if ! {
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                -o DPkg::Lock::Timeout=120 "${packages[@]}"
    } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get install ${packages[*]} failed"
    fi
    rm -f "$log"
    installed || die "installed ${packages[*]}, but slurmctld/slurmd/sbatch/munged are still missing"
}

# Local TCP ports something listens on (IPv4 and IPv6), one a line, decimal.
listening_ports() {
    local f
    for f in /proc/net/tcp /proc/net/tcp6; do
        [[ -r $f ]] || continue
        # st 0A = LISTEN; local_address is ADDR:PORT in hex
        awk 'NR > 1 && $4 == "0A" { split($2, a, ":"); print a[2] }' "$f"
    done | while read -r hex; do echo $((16#$hex)); done
}

# The first of three consecutive ports nothing listens on, from a random start in 20000-29999.
free_ports() {
    local busy base p ok tries
    busy=" $(listening_ports | tr '\n' ' ') "
    for ((tries = 0; tries < 200; tries++)); do
        base=$((20000 + RANDOM % 9997))
        ok=1
        for ((p = base; p < base + 3; p++)); do
            if [[ $busy == *" $p "* ]]; then ok=0; fi
        done
        if ((ok)); then
            echo "$base"
            return 0
        fi
    done
    die "no three consecutive free ports found in 20000-29999"
}

alive() { # a pid that is neither gone nor a zombie (PID 1 here may never reap the daemons)
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

pid_of() { # pid from a pid file, empty if none
    local pid=""
    [[ -r $1 ]] && read -r pid <"$1" || true
    echo "$pid"
}

logs_tail() {
    local f
    for f in "$dir"/log/*.log; do
        [[ -r $f ]] || continue
        echo "--- $f" >&2
        tail -n 15 "$f" >&2
    done
}

munge_ok() {
    command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    if munge_ok; then
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --force
        else
            install -d -m 700 /etc/munge
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- munged
    local deadline=$((SECONDS + wait_s))
    until munge_ok; do
        ((SECONDS < deadline)) || die "munged did not answer within ${wait_s}s"
        sleep 0.2
    done
    # Ours: `stop` ends it (munged writes its pid here by default).
    cp /run/munge/munged.pid "$dir/munged.pid" 2>/dev/null || true
}

write_conf() {
    local port=$1 host
    host=$(hostname -s)
    cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a two-node test cluster on one host.
ClusterName=ftjobtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Job credentials expire after 5 s instead of 120 s: a requeued job is not held back ~140 s.
AuthInfo=cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd_%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd_%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd_%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
JobFileAppend=1
ReturnToService=2
SlurmdTimeout=10
# Finished jobs stay visible to scontrol show job for 5 min (there is no accounting for sacct).
MinJobAge=300
KillWait=5
InactiveLimit=0
MailProg=/bin/true
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=1 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

cmd_start() {
    need_root start
    installed || die "Slurm is not installed: run '$0 install' first"
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    dir=$(cd "$dir" && pwd)
    if [[ -e $dir/slurmctld.pid ]] && alive "$(pid_of "$dir/slurmctld.pid")"; then
        die "a cluster already runs from $dir: '$0 stop $dir' first"
    fi
    local port=${SLURM_TEST_PORT:-}
    [[ -n $port ]] || port=$(free_ports)
    write_conf "$port"
    export SLURM_CONF=$dir/slurm.conf
    start_munge
    # Daemons fork into the background; their stdio goes to files, never to our caller's pipes.
    slurmctld </dev/null >>"$dir/log/slurmctld.out" 2>&1 || { logs_tail; die "slurmctld did not start"; }
    local node
    for node in n1 n2; do
        slurmd -N "$node" </dev/null >>"$dir/log/slurmd_$node.out" 2>&1 ||
            { logs_tail; die "slurmd -N $node did not start"; }
    done
    local deadline=$((SECONDS + wait_s)) states=""
    while :; do
        states=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ $states == *"n1=idle "* && $states == *"n2=idle "* ]]; then
            break
        fi
        if ((SECONDS >= deadline)); then
            logs_tail
            die "nodes not idle within ${wait_s}s (sinfo: ${states:-no answer}); logs in $dir/log"
        fi
        sleep 0.3
    done
    echo "cluster.sh: nodes n1 n2 idle; SLURM_CONF=$SLURM_CONF (ports $port-$((port + 2)))" >&2
}

stop_pid() { # TERM, then KILL after a bounded wait
    local pid=$1 deadline
    [[ -n $pid ]] && alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    deadline=$((SECONDS + 10))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
}

cmd_stop() {
    [[ -d $dir ]] || return 0
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    local ctld
    ctld=$(pid_of "$dir/slurmctld.pid")
    if [[ -n $ctld ]] && alive "$ctld" && [[ -r $SLURM_CONF ]]; then
        timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
        local deadline=$((SECONDS + 20))
        while [[ -n $(timeout 5 squeue -h -o %i 2>/dev/null || true) ]] && ((SECONDS < deadline)); do
            sleep 0.3
        done
    fi
    local f
    for f in "$dir"/slurmd_*.pid; do
        [[ -e $f ]] && stop_pid "$(pid_of "$f")"
    done
    stop_pid "$ctld"
    if [[ -e $dir/munged.pid ]]; then # only a munged this script started
        stop_pid "$(pid_of "$dir/munged.pid")"
        rm -f "$dir/munged.pid"
    fi
}

case ${1:-} in
install) cmd_install ;;
start | stop)
    [[ -n ${2:-} ]] || die "usage: $0 $1 DIR"
    dir=$2
    "cmd_$1"
    ;;
*)
    echo "usage: $0 install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
