"""Failure classes and the exit codes they map to.

Exit codes follow Kubeflow's ``restartPolicy: ExitCode`` convention: 1-127 are permanent (restarting
cannot help: fix the input), 128-255 are retryable (requeue or restart and it will continue). The
retryable codes of our own stay clear of 128+N for the signals that kill processes (129-143 minus
the two chosen to match: 142, 143), so a code always says who decided it.
"""

from __future__ import annotations

# Permanent: the same input fails the same way on every restart.
EXIT_CONFIG = 2  # bad option or value, bad config file
EXIT_DATA = 3  # data missing or unreadable
EXIT_INCOMPATIBLE_CKPT = 4  # checkpoint from another model/config
EXIT_RUN_DIR = 5  # run dir not writable
EXIT_DISK_FULL = 6  # checkpoints do not fit: --ckpt.max-failures saves in a row failed for lack of space
# Retryable: the job is fine, the world around it was not.
EXIT_KILLED = 137  # a worker died of SIGKILL (the OOM killer, or a person): seen by the agent/launcher
EXIT_HANG = 142  # watchdog saw no progress; restart resumes from the last checkpoint
EXIT_PREEMPTED = 143  # saved at a step boundary on SIGTERM/SIGINT/SIGUSR*; requeue to continue
EXIT_CRASH = 144  # an exception nobody classified: unknown, so retried
EXIT_PEER = 145  # another rank or node failed first (connection to it lost)
EXIT_COLLECTIVE_TIMEOUT = 146  # a collective did not complete within --dist.timeout-s
EXIT_STORAGE = 147  # checkpoint storage failing or hung (not a full disk)

# What each code is called in exit_status.json ("cause") and in the README's table.
CAUSES = {
    0: "finished",
    EXIT_CONFIG: "config",
    EXIT_DATA: "data",
    EXIT_INCOMPATIBLE_CKPT: "incompatible-checkpoint",
    EXIT_RUN_DIR: "run-dir",
    EXIT_DISK_FULL: "disk-full",
    EXIT_KILLED: "killed",
    EXIT_HANG: "hang",
    EXIT_PREEMPTED: "preempted",
    EXIT_CRASH: "crash",
    EXIT_PEER: "peer-failure",
    EXIT_COLLECTIVE_TIMEOUT: "collective-timeout",
    EXIT_STORAGE: "storage",
}


def classify(code: int) -> str:
    """'done', 'preempted', 'permanent' or 'retryable': what a scheduler should do with this code."""
    if code == 0:
        return "done"
    if code == EXIT_PREEMPTED:
        return "preempted"
    return "permanent" if 1 <= code <= 127 else "retryable"


class PermanentError(Exception):
    """An error that restarting will not fix. ``str(e)`` is the one line shown to the user.

    ``echo=False``: another rank (rank 0) already says the same thing; this one stays quiet.
    """

    exit_code = 1

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo


class ConfigError(PermanentError):
    exit_code = EXIT_CONFIG


class DataError(PermanentError):
    exit_code = EXIT_DATA


class IncompatibleCheckpointError(PermanentError):
    exit_code = EXIT_INCOMPATIBLE_CKPT


class RunDirError(PermanentError):
    exit_code = EXIT_RUN_DIR


class DiskFullError(PermanentError):
    exit_code = EXIT_DISK_FULL


class StorageError(RuntimeError):
    """Checkpoint storage keeps failing or hangs: retryable (the next attempt may find it healthy)."""

    exit_code = EXIT_STORAGE

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo
