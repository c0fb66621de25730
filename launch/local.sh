#!/usr/bin/env bash
# The training job under torchrun on this machine, or as one node of a multi-node job, configured by
# environment variables (what the SLURM script and the batch/v1 Job set). It runs the launcher,
# launch/ftjob.py (installed as `ftjob`), which exits with a code a scheduler can act on.
#
#   launch/local.sh [train/main.py options]          e.g.  NPROC=4 launch/local.sh --max-steps 500
#
# Environment (all optional; torchrun's own PET_* variables work too):
#   NPROC            workers on this node (default 2; torchrun also takes "gpu", "cpu", "auto")
#   MAX_RESTARTS     torchrun worker-group restarts before giving up (default 3)
#   NNODES           nodes, or MIN:MAX for elastic (default 1); with NNODES != 1 or RDZV_ENDPOINT
#                    set, the node joins a rendezvous instead of running --standalone
#   RDZV_ENDPOINT    host:port of the rendezvous (c10d: the node whose address it is hosts it;
#                    etcd: the etcd server's client URL host:port)
#   RDZV_BACKEND     c10d (default) or etcd (torchrun's etcd-v2: survives the loss of any node)
#   RDZV_ID          rendezvous id, the same on every node of one job (default: ftjob)
#   RDZV_CONF        torchrun --rdzv-conf entries; the launcher's defaults fill in the rest
#   TORCHRUN_ARGS    extra torchrun options, separated by spaces (e.g. "--monitor-interval=0.5")
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT, RDZV_RESOLVE_WAIT_S, TORCHRUN: see launch/ftjob.py
#   PYTHON           the Python to run it with (default: this repository's .venv if it has one)
#
# Exit code, signals: see launch/ftjob.py and launch/supervise.py.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi

args=(--nproc-per-node="${NPROC:-2}" --max-restarts="${MAX_RESTARTS:-3}")
nnodes=${NNODES:-1}
if [[ $nnodes != 1 || -n ${RDZV_ENDPOINT:-} ]]; then
    backend=${RDZV_BACKEND:-c10d}
    [[ $backend == etcd ]] && backend=etcd-v2
    args+=(--nnodes="$nnodes" --rdzv-backend="$backend"
        --rdzv-endpoint="${RDZV_ENDPOINT:?"multi-node (NNODES=$nnodes) needs RDZV_ENDPOINT=host:port"}"
        --rdzv-id="${RDZV_ID:-ftjob}")
    [[ -n ${RDZV_CONF:-} ]] && args+=(--rdzv-conf="$RDZV_CONF")
fi
read -r -a extra <<<"${TORCHRUN_ARGS:-}"

exec "$PYTHON" "$here/ftjob.py" "${args[@]}" ${extra[@]+"${extra[@]}"} -- "$@"
