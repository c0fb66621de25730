"""ftjob: the launcher every way of running uses: torchrun on this node, exiting with the job's class.

    ftjob [torchrun options] [--] [train/main.py options]
    ftjob --nproc-per-node=4 --max-steps 500                 one box
    ftjob --nnodes=2 --nproc-per-node=8 --rdzv-endpoint=node0:29500 --rdzv-id=exp1 -- --run-dir runs/exp1

torchrun's flags and its PET_* environment (what Kubeflow's PyTorchJob and TorchX set) work as they
do for torchrun. Where they are unset, the launcher fills in what recovery relies on: 3 restarts,
the stop signals of every scheduler (SIGTERM, SIGINT, SIGUSR1, SIGUSR2), --standalone on one node,
and on several nodes the c10d rendezvous with a lost node declared dead in ~3 s (launch/command.py).
The job's options are checked before any rendezvous, so a bad flag fails in a second on every node.

Exit code (train/errors.py): 0 done, 143 preempted and saved, 1-127 permanent (2 config, 3 data,
4 incompatible checkpoint, 5 run dir, 6 disk full), 128-255 retryable (137 a worker was SIGKILLed -
OOM?, 142 hang, 144 unknown crash, 145 a peer failed, 146 collective timeout, 147 checkpoint storage
failing or hung; 128+N after a stop signal N the job said nothing about). torchrun alone says 1 for
all of them; the job's own record (a private status file per node) and torchrun's record of the
first failed worker decide (launch/exit_status.py).

Environment: TORCH_ELASTIC_SHUTDOWN_TIMEOUT (seconds torchrun gives workers to save after a stop
signal; default here 90, torchrun's 30), RDZV_RESOLVE_WAIT_S (wait up to this long for the
rendezvous host's name to resolve, default 300: a pod's DNS name appears after the pod starts),
TORCHRUN (the torchrun executable; default: torch.distributed.run of this Python).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (launch/local.sh): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import command, exit_status, verdict
from launch.supervise import Supervisor
from train.errors import EXIT_PREEMPTED
from train.runtime.env import STATUS_ENV

SHUTDOWN_TIMEOUT_S = 90


def _say(text: str) -> None:
    print(f"launch: {text}", file=sys.stderr, flush=True)


def check_job_options(train_args: list[str], world_sizes: tuple[int, ...] = ()) -> tuple[int, str] | None:
    """(exit code, why) of a job that cannot start (said in one line), None if it may."""
    from train import preflight
    from train.errors import ConfigError, PermanentError, StorageError
    from train.runtime.exits import record_exit

    try:
        preflight.check(train_args, world_sizes=world_sizes)
    except StorageError as e:  # the store is down: worth a retry by the scheduler, not a rendezvous
        print(f"error: {e} [exit {e.exit_code}: retryable]", file=sys.stderr)
        record_exit(preflight.guess_run_dir(train_args), e.exit_code, str(e))
        return e.exit_code, str(e)
    except PermanentError as e:
        # Every node meets a bad option alike (one command line). Where the scheduler gathers every
        # node's output into one log (srun), the first node says it for all.
        if not (isinstance(e, ConfigError) and os.environ.get("SLURM_NODEID", "0") != "0"):
            print(f"error: {e} [exit {e.exit_code}: permanent, restarting will not help]", file=sys.stderr)
        record_exit(preflight.guess_run_dir(train_args), e.exit_code, str(e))
        return e.exit_code, str(e)
    except SystemExit as e:  # --help
        return (e.code if isinstance(e.code, int) else 0), "help"
    return None


def wait_for_endpoint(endpoint: str, wait_s: float) -> None:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    deadline = time.monotonic() + wait_s
    for attempt in range(10**9):
        try:
            socket.getaddrinfo(host, None)
            return
        except OSError:
            if time.monotonic() >= deadline:
                return  # torchrun says what it cannot resolve
            if attempt % 30 == 0:
                _say(f"waiting for {host} to resolve")
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # This process talks to rendezvous stores that may vanish (verdict.py handles it); torch's C++
    # side would log every failed read with a stack trace. Set before torch loads; not for torchrun.
    users_log_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip() + "\n\nThe job's options: ftjob -- --help. torchrun's: torchrun --help.")
        return 0
    try:
        torchrun_args, train_args = command.split(argv)
        exe = os.environ.get("TORCHRUN")
        plan = command.plan(torchrun_args, train_args, torchrun=[exe] if exe else None)
    except command.UsageError as e:
        print(f"error: {e} [exit 2: permanent, restarting will not help]", file=sys.stderr)
        return 2
    rejected = check_job_options(train_args, plan.world_sizes)
    if rejected is not None:
        code, why = rejected
        # The other nodes must not wait for this one - when waiting cannot help. A retryable
        # failure (a store down) closes nothing: the next attempt, or another node, may do better.
        if plan.multi_node and 1 <= code <= 127:
            verdict.publish(plan.backend, plan.endpoint, plan.run_id, code, why, tls=plan.tls)
        return code
    if plan.multi_node:
        wait_for_endpoint(plan.endpoint, float(os.environ.get("RDZV_RESOLVE_WAIT_S", "300")))

    # Per launch and per node: records of another node, or of an earlier launch, are never read.
    records = Path(tempfile.mkdtemp(prefix="ftjob-launch."))
    try:
        env = dict(os.environ)
        env.pop("TORCH_CPP_LOG_LEVEL")
        if users_log_level is not None:
            env["TORCH_CPP_LOG_LEVEL"] = users_log_level
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
        env.setdefault(STATUS_ENV, str(records / "status.json"))
        env["TORCHELASTIC_ERROR_FILE"] = str(records / "agent-error.json")
        if plan.multi_node:
            # A node that joins a running job (a replacement, a scale-up) must learn where the
            # workers' store is: torch 2.13's agent-shared store publishes that only in the first
            # rendezvous round. Unshared, every round does (tests/e2e/test_replacement_node.py).
            env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        grace = float(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) + 10
        status_file = env[STATUS_ENV]

        def stopped_on_purpose() -> bool:  # the job recorded a permanent error and stopped torchrun
            job = exit_status.job_record(status_file)
            return job is not None and 1 <= job[0] <= 127

        supervisor = Supervisor(plan.command, env, records / "torchrun.err", grace, stopped_on_purpose)
        watcher = None
        if plan.multi_node:
            watcher = verdict.Watcher(plan.backend, plan.endpoint, plan.run_id, plan.tls)
        with watcher or contextlib.nullcontext():
            rc = supervisor.run()
        if rc == 0:
            return 0
        code, reason = exit_status.decide(status_file, str(records), supervisor.stop_signal)
        told = watcher.verdict if watcher is not None else None
        if told is not None and not 1 <= code <= 127 and code != EXIT_PREEMPTED:
            code, reason = told["code"], f"node {told['node']} failed permanently: {told['reason']}"
        elif plan.multi_node and 1 <= code <= 127 and told is None:
            # The store was up while torchrun ran: it answers at once, or it went with this node.
            verdict.publish(plan.backend, plan.endpoint, plan.run_id, code, reason, 3, plan.tls)
        torchrun_said = rc if rc >= 0 else f"of signal {-rc}"
        _say(f"torchrun exited {torchrun_said}; exit {code}: {reason}")
        return code
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(records)


if __name__ == "__main__":
    sys.exit(main())
