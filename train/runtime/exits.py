"""How a run ends, in a form schedulers and launchers can act on.

Every way a worker ends is recorded with a code and a class (see train/errors.py): finished,
preempted, a permanent error, the watchdog, an exception (classified: a lost peer, a collective
timeout, failing checkpoint storage, or unknown - which counts as retryable). Records go to

- ``$FTJOB_STATUS_FILE`` when set: the launchers give each node a private file of its own, so one
  node's status never overwrites another's;
- ``<run-dir>/exit_status.json``, for people and for plain torchrun users, written only by the node
  that holds global rank 0 (node rank 0).

Several ranks of one node may end at once; within one attempt the root cause wins: a record of a
rank that failed *because another did* (peer lost, collective timed out, "rank 0 said so") never
replaces one that says why. Permanent errors print one line (on the rank that saw them) and, under
torchrun, stop the agent: each futile restart would only repeat the error and burn the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from train.errors import (
    CAUSES,
    EXIT_COLLECTIVE_TIMEOUT,
    EXIT_CRASH,
    EXIT_PEER,
    EXIT_PREEMPTED,
    ConfigError,
    DataError,
    PermanentError,
    StorageError,
    classify,
)
from train.observe import records
from train.runtime import env, private, warmstart

log = logging.getLogger("train")
STATUS_FILE = "exit_status.json"
PEER_GRACE_S = 10.0  # how long a quiet rank waits for the one that reports a permanent error

# Words of torch's gloo/nccl/store errors when the other side went away, or did not answer in time.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "socket closed", "ncclremoteerror", "recv_bytes", "pipe closed")  # fmt: skip
_TIMED_OUT = ("timed out", "timeout", "watchdog caught collective operation")


def _attempt() -> list[str]:
    """Which attempt of which agent a record belongs to: records of other attempts are replaced."""
    launch = env.launch()
    return [launch.run_id, str(launch.restart), socket.gethostname(), str(warmstart.agent_pid())]


def _targets(run_dir: str | None) -> list[Path]:
    private = env.status_file()
    targets = [private] if private is not None else []
    if run_dir is not None and env.launch().node == 0:
        targets.append(Path(run_dir) / STATUS_FILE)
    return targets


def record_exit(run_dir: str | None, code: int, reason: str, secondary: bool = False) -> None:
    """This rank's account of how its attempt ended (``secondary``: it failed because another did)."""
    status = {
        "code": code,
        "class": classify(code),
        "cause": CAUSES.get(code, "signal" if code > 128 else "error"),
        "reason": reason,
        "secondary": secondary,
        "rank": env.launch().rank,
        "restart": env.launch().restart,
        "attempt": _attempt(),
        "time": time.time(),
    }
    for path in _targets(run_dir):
        with contextlib.suppress(OSError):  # an unwritable run dir is itself the error being reported
            _write(path, status)
    if run_dir is not None and Path(run_dir).is_dir():  # the run's record, for the recovery report
        row = {k: status[k] for k in ("code", "class", "cause", "reason", "secondary", "rank", "restart")}
        with contextlib.suppress(OSError):
            records.append(run_dir, "end", **row)


def _write(path: Path, status: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # best effort where a filesystem cannot lock directories
            fcntl.flock(lock, fcntl.LOCK_EX)  # local ranks of one node end at the same moment
        try:
            old = json.loads(private.read_regular(path, 1 << 20) or b"null")
        except Exception:  # anything at all: the record is rewritten
            old = None
        if (
            isinstance(old, dict)
            and old.get("attempt") == status["attempt"]
            and (status["secondary"] or not old.get("secondary"))
        ):
            return  # this attempt already has a record that is at least as close to the root cause
        private.write_replace(path, (json.dumps(status) + "\n").encode())
    finally:
        os.close(lock)


def permanent(error: PermanentError, run_dir: str | None) -> int:
    code = error.exit_code
    record_exit(run_dir, code, str(error), secondary=not error.echo)
    agent = warmstart.torchrun_agent()
    # Config and data errors are met alike by every rank of a node (same command line, same files,
    # before any process group): its local rank 0 speaks for them. A quiet rank waits for the one
    # that speaks to stop torchrun, which stops this rank too: the error is said once, and torchrun
    # never sees a quiet rank exit first and restarts the group. If nobody stops it, it goes on.
    launch = env.launch()
    alike = isinstance(error, (ConfigError, DataError)) and launch.local_rank != 0
    # A rank of another node says it (global rank 0), and nobody on this node will: this node's
    # local rank 0 stops its torchrun at once. Waiting, it would see the other node's torchrun (the
    # rendezvous host, maybe) go first, and torchrun here would fail loudly on its lost store.
    first_here = launch.local_rank == 0 and launch.node != 0
    if agent and (alike or not (error.echo or first_here)):
        time.sleep(PEER_GRACE_S)
    action = f"; stopping torchrun (pid {agent}) so it does not restart" if agent else ""
    if error.echo:
        print(
            f"error: {error} [exit {code}: permanent, restarting will not help{action}]",
            file=sys.stderr,
            flush=True,
        )
    if agent:
        os.kill(agent, signal.SIGTERM)
    return code


def one_line(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first}"


def crashed(error: BaseException, run_dir: str | None) -> tuple[int, bool]:
    """Record an exception nothing else handled; return (its code, whether it is secondary)."""
    code, secondary = classify_exception(error)
    record_exit(run_dir, code, one_line(error), secondary=secondary)
    return code, secondary


def classify_exception(error: BaseException) -> tuple[int, bool]:
    """(exit code, whether another rank's failure is the likely cause)."""
    if isinstance(error, StorageError):
        return error.exit_code, not error.echo
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT, False
    text = str(error).lower()
    distributed = "distributed" in type(error).__module__ or "gloo" in text or "nccl" in text
    if distributed or isinstance(error, ConnectionError):
        if any(words in text for words in _PEER_LOST) or isinstance(error, ConnectionError):
            return EXIT_PEER, True
        if any(words in text for words in _TIMED_OUT):
            return EXIT_COLLECTIVE_TIMEOUT, True
    return EXIT_CRASH, False


def finished(run_dir: str, code: int) -> int:
    """Record an attempt that ended as planned: done, or preempted and saved."""
    record_exit(
        run_dir, code, "preempted: saved, requeue to continue" if code == EXIT_PREEMPTED else "finished"
    )
    return code


def ended(error: BaseException, run_dir: str | None) -> int:
    """The exit code of an attempt that ``error`` ended, recorded. Re-raises what torchrun's
    ``@record`` should report with its traceback: an exception nobody classified, on the rank that
    saw it first."""
    if isinstance(error, SystemExit):
        raise error  # --help, or tyro's own exit
    if isinstance(error, PermanentError):
        return permanent(error, run_dir)
    code, secondary = crashed(error, run_dir)
    if isinstance(error, StorageError) and error.echo:
        log.error("%s [exit %d: retryable]", error, code)  # its message says it all
        return code
    if secondary:
        # Another rank failed first. One line, and no torchrun error file: torchrun would take
        # this rank's (earlier-stamped) file for the root cause and hide, e.g., a peer's SIGKILL.
        log.error("%s; exit %d (retryable)", one_line(error), code)
        return code
    error.ftjob_exit_code = code  # type: ignore[attr-defined]
    raise error
