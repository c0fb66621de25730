#!/usr/bin/env bash
# A TORCHRUN for launch/local.sh (which honours $TORCHRUN) that injects a fault into the first SLURM
# attempt only: FTJOB_FAULT is set to $FIRST_ATTEMPT_FAULT while SLURM_RESTART_COUNT is 0 or unset,
# and left unset on a requeued attempt. FTJOB_FAULT's own `restart=0` counts torchrun restarts
# (TORCHELASTIC_RESTART_COUNT), which start at 0 again in every SLURM attempt, so on its own a fault
# would fire again after each requeue. Then runs $REAL_TORCHRUN (default: torchrun on PATH).
#
#   sbatch --export=ALL,TORCHRUN=tests/slurm/first-attempt-torchrun.sh,REAL_TORCHRUN=...,FIRST_ATTEMPT_FAULT=raise:step=5 ...
set -euo pipefail

unset FTJOB_FAULT
if ((${SLURM_RESTART_COUNT:-0} == 0)) && [[ -n ${FIRST_ATTEMPT_FAULT:-} ]]; then
    export FTJOB_FAULT=$FIRST_ATTEMPT_FAULT
fi
exec "${REAL_TORCHRUN:-torchrun}" "$@"
