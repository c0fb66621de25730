#!/usr/bin/env bash
# Run the training job under torchrun on this machine, or as one node of a multi-node job, and exit
# with a code a scheduler can act on.
#
#   launch/local.sh [train/main.py options]          e.g.  NPROC=4 launch/local.sh --max-steps 500
#
# Environment (all optional):
#   NPROC            workers on this node (default 2; torchrun also takes "gpu", "cpu", "auto")
#   MAX_RESTARTS     torchrun worker-group restarts before giving up (default 3)
#   NNODES           nodes, or MIN:MAX for elastic (default 1); with NNODES != 1 or RDZV_ENDPOINT
#                    set, the node joins a c10d rendezvous instead of running --standalone
#   RDZV_ENDPOINT    host:port of the rendezvous; the node whose address it is hosts it
#   RDZV_ID          rendezvous id, the same on every node of one job (default: ftjob)
#   RDZV_RESOLVE_WAIT_S  wait up to this long for the rendezvous host's name to resolve (default 300)
#   RDZV_CONF        torchrun --rdzv-conf (default: keep_alive_interval=1,keep_alive_max_attempt=3,
#                    so a lost node is declared dead after ~3 s instead of torchrun's 15 s; measured
#                    node loss 2 -> 1 ranks, kill -> first step: 5.5 s instead of 17.5 s)
#   TORCHRUN_ARGS    extra torchrun options, separated by spaces (e.g. "--monitor-interval=0.5")
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives workers to save after a stop signal
#                    before it kills them (default here 90; torchrun's own default is 30)
#   TORCHRUN, PYTHON the executables (default: this repository's .venv if it has one, else PATH)
#
# Exit code: 0 when torchrun succeeds. Otherwise torchrun says only 1, so the job's own account (a
# status file in a private directory of this launcher, FTJOB_STATUS_FILE) and torchrun's record of
# the first failed worker (TORCHELASTIC_ERROR_FILE, beside it) decide, see launch/exit_status.py:
# 1-127 permanent (2 config, 3 data, 4 incompatible checkpoint, 5 run dir, 6 disk full), 128-255
# retryable (137 a worker was SIGKILLed - OOM?, 142 hang, 143 preempted and saved, 144 unknown
# crash, 145 a peer failed, 146 collective timeout, 147 checkpoint storage failing or hung; 128+N
# after this launcher got stop signal N and the job said nothing). See train/errors.py.
#
# SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (and SIGHUP, sent on as SIGTERM) are passed to torchrun, which
# passes them to the workers: they save at the next step boundary and exit 143. The first stop
# signal is passed on once, later ones are dropped (torchrun cuts its graceful shutdown short when
# signalled again), except SIGINT: a repeated Ctrl-C is passed on each time. Where torchrun is
# signalled directly too (Slurm signals every process of a step) and exits early anyway, this script
# waits for the workers it left behind before reading exit_status.json.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

if [[ -z ${TORCHRUN:-} ]]; then
    if [[ -x $repo/.venv/bin/torchrun ]]; then TORCHRUN=$repo/.venv/bin/torchrun; else TORCHRUN=torchrun; fi
fi
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}

nnodes=${NNODES:-1}
if [[ $nnodes == 1 && -z ${RDZV_ENDPOINT:-} ]]; then
    rdzv=(--standalone)
else
    endpoint=${RDZV_ENDPOINT:?"multi-node (NNODES=$nnodes) needs RDZV_ENDPOINT=host:port"}
    rdzv=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="${RDZV_ID:-ftjob}"
        --rdzv-conf="${RDZV_CONF:-keep_alive_interval=1,keep_alive_max_attempt=3}")
    # A node that joins a running job (a replacement, a scale-up) must learn where the workers'
    # store is: torch 2.13's agent-shared store publishes that only in the first rendezvous round,
    # so the joiner would wait out join_timeout. Unshared, every round publishes it (rank 0 of
    # the workers hosts it; see tests/e2e/test_replacement_node.py).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    # A pod's DNS name appears a little after the pod starts; torchrun fails at once without it.
    host=${endpoint%:*}
    if command -v getent >/dev/null; then
        for ((i = 0; i < ${RDZV_RESOLVE_WAIT_S:-300}; i++)); do
            getent ahosts "$host" >/dev/null && break  # ahosts: getaddrinfo, IPs pass as they are
            ((i % 30)) || echo "launch: waiting for $host to resolve" >&2
            sleep 1
        done
    fi
fi
read -r -a extra <<<"${TORCHRUN_ARGS:-}"

cmd=("$TORCHRUN" "${rdzv[@]}" --nproc_per_node="${NPROC:-2}" --max-restarts="${MAX_RESTARTS:-3}"
    "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2" ${extra[@]+"${extra[@]}"} "$repo/train/main.py" "$@")

# Per launch and per node: records of another node, or of an earlier launch, are never read.
records=$(mktemp -d "${TMPDIR:-/tmp}/ftjob-launch.XXXXXX")
trap 'rm -rf "$records"' EXIT
export FTJOB_STATUS_FILE=${FTJOB_STATUS_FILE:-$records/status.json}
export TORCHELASTIC_ERROR_FILE=$records/agent-error.json

stop_sig=""     # the first stop signal this launcher received
forwarded=0     # whether it reached torchrun
interrupted=0   # set by a trap: the `wait` below returned early
child=""
workers=()      # torchrun's children when the stop signal came

# Slurm (and a process-group kill) may signal torchrun directly as well as through this script; a
# third signal makes torchrun exit before its workers have saved. Note them, to wait for them below.
note_workers() {
    local f
    for f in /proc/"$child"/task/*/children; do
        # shellcheck disable=SC2207  # pids: no spaces or globs
        [[ -r $f ]] && workers+=($(<"$f"))
    done
}
alive() {  # a pid that is neither gone nor a zombie (an orphan's zombie may never be reaped here)
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}
send_stop() {
    if [[ -n $child ]]; then
        echo "launch: got SIG$1; torchrun (pid $child) passes it to the workers, which save and stop" >&2
        ((${#workers[@]})) || note_workers
        kill -s "$1" "$child" 2>/dev/null || true
        forwarded=1
    fi
}
# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
    interrupted=1
    if [[ -n $stop_sig && $1 != INT ]]; then
        return 0  # passed on already. Not a bare `return`: in a trap that returns the interrupted
                  # wait's 128+N, and set -e exits the script
    fi
    stop_sig=${stop_sig:-$1}
    send_stop "$1"
}
for sig in TERM INT USR1 USR2; do
    # shellcheck disable=SC2064  # expand $sig now, on purpose
    trap "on_signal $sig || :" "$sig"
done
trap 'on_signal TERM || :' HUP

# Job control puts torchrun in a process group of its own: a Ctrl-C at the terminal reaches this
# script only, which passes it on once (torchrun would otherwise get it twice).
set -m
# A copy of torchrun's stderr: its closing summary is the only witness of a worker that died of a
# signal (the OOM killer's SIGKILL) while its peers only saw the connection drop.
"${cmd[@]}" 2> >(tee "$records/torchrun.err" >&2) &
child=$!
set +m
if [[ -n $stop_sig ]] && ((!forwarded)); then  # it came while torchrun was being started
    send_stop "$stop_sig"
fi

# `wait` returns early (128+N) when a trapped signal arrives; wait again until torchrun is done.
rc=""
while :; do
    interrupted=0
    r=0
    wait "$child" || r=$?
    if [[ -n $rc && $r == 127 ]]; then break; fi  # its status was collected on the previous pass
    rc=$r
    ((interrupted)) || break
done
if [[ -n $stop_sig ]]; then
    deadline=$((SECONDS + TORCH_ELASTIC_SHUTDOWN_TIMEOUT + 10))
    for pid in ${workers[@]+"${workers[@]}"}; do
        while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    done
fi

if ((rc == 0)); then
    exit 0
fi
stop_number=""
if [[ -n $stop_sig ]]; then stop_number=$(kill -l "$stop_sig"); fi
for _ in 1 2 3 4 5 6 7 8 9 10; do  # tee may still be copying the summary
    grep -q "Root Cause" "$records/torchrun.err" 2>/dev/null && break
    sleep 0.1
done
status=$("$PYTHON" "$here/exit_status.py" read "$FTJOB_STATUS_FILE" "$records" "$stop_number" ||
    printf '%s\t%s' 144 "no status could be read (unknown: retryable)")
code=${status%%$'\t'*}
reason=${status#*$'\t'}
echo "launch: torchrun exited $rc; exit $code: $reason" >&2
exit "$code"
