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
import uuid
from pathlib import Path

from train import records, warmstart
from train.ckpt import objstore
from train.config import Config
from train.errors import (
    CAUSES,
    EXIT_COLLECTIVE_TIMEOUT,
    EXIT_CRASH,
    EXIT_PEER,
    ConfigError,
    DataError,
    PermanentError,
    RunDirError,
    StorageError,
    classify,
)

log = logging.getLogger("train")
STATUS_FILE = "exit_status.json"
STATUS_ENV = "FTJOB_STATUS_FILE"
PEER_GRACE_S = 10.0  # how long a quiet rank waits for the one that reports a permanent error

# Words of torch's gloo/nccl/store errors when the other side went away, or did not answer in time.
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
              "socket closed", "ncclremoteerror", "recv_bytes", "pipe closed")  # fmt: skip
_TIMED_OUT = ("timed out", "timeout", "watchdog caught collective operation")


def check_run_dir(run_dir: str) -> None:
    path = Path(run_dir)
    probe = path / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"run dir {run_dir!r} is not writable ({e.strerror}); pass a writable --run-dir"
        ) from None


def check_ckpt_dir(cfg: Config) -> None:
    """A --ckpt.dir URL is checked now, not at the first save: one object written, read back and
    deleted. Bad credentials, a missing bucket, a missing extra: ConfigError (permanent). A store
    that does not answer: StorageError (retryable: an outage passes; a wrong endpoint does not)."""
    if not objstore.is_url(cfg.ckpt.dir):
        return
    url = cfg.ckpt.dir
    try:
        storage = objstore.FsspecStorage(url)
    except ImportError as e:
        raise ConfigError(f"--ckpt.dir {url} needs {e.name or 'fsspec'}: pip install 'ftjob[s3]'") from None
    except ValueError as e:  # an fsspec protocol it does not know
        raise ConfigError(f"--ckpt.dir {url}: {e}") from None
    try:
        storage.probe()
    except PermissionError as e:
        raise ConfigError(
            f"--ckpt.dir {url}: access refused ({objstore.first_line(e)}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE and the bucket's permissions"
        ) from None
    except FileNotFoundError as e:
        raise ConfigError(
            f"--ckpt.dir {url}: no such bucket ({objstore.first_line(e)}); create it or fix --ckpt.dir"
        ) from None
    except OSError as e:
        if "NoCredentialsError" in str(e):
            raise ConfigError(
                f"--ckpt.dir {url}: no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)"
            ) from None
        raise StorageError(
            f"--ckpt.dir {url} is not reachable ({objstore.first_line(e)}); retrying, as an outage "
            "passes (if it persists, check the URL and AWS_ENDPOINT_URL)"
        ) from None


def guess_run_dir(argv: list[str] | None) -> str | None:
    """Where the run-dir copy goes when the config itself did not parse."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--run-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--run-dir="):
            return arg.split("=", 1)[1]
    return Config().run_dir


def _attempt() -> list[str]:
    """Which attempt of which agent a record belongs to: records of other attempts are replaced."""
    return [
        os.environ.get("TORCHELASTIC_RUN_ID", ""),
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
        socket.gethostname(),
        str(warmstart.agent_pid()),
    ]


def _targets(run_dir: str | None) -> list[Path]:
    targets = [Path(os.environ[STATUS_ENV])] if os.environ.get(STATUS_ENV) else []
    if run_dir is not None and os.environ.get("GROUP_RANK", "0") == "0":
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
        "rank": int(os.environ.get("RANK", "0")),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
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
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if (
            isinstance(old, dict)
            and old.get("attempt") == status["attempt"]
            and (status["secondary"] or not old.get("secondary"))
        ):
            return  # this attempt already has a record that is at least as close to the root cause
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(status) + "\n")
        os.replace(tmp, path)
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
    alike = isinstance(error, (ConfigError, DataError)) and os.environ.get("LOCAL_RANK", "0") != "0"
    # A rank of another node says it (global rank 0), and nobody on this node will: this node's
    # local rank 0 stops its torchrun at once. Waiting, it would see the other node's torchrun (the
    # rendezvous host, maybe) go first, and torchrun here would fail loudly on its lost store.
    first_here = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("GROUP_RANK", "0") != "0"
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
