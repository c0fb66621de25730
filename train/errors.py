"""Failure classes and the exit codes they map to.

Exit codes follow Kubeflow's ``restartPolicy: ExitCode`` convention: 1-127 are permanent (restarting
cannot help: fix the input), 128-255 are retryable (requeue or restart and it will continue).
"""

from __future__ import annotations

# Permanent: the same input fails the same way on every restart.
EXIT_CONFIG = 2  # bad option or value, bad config file
EXIT_DATA = 3  # data missing or unreadable
EXIT_INCOMPATIBLE_CKPT = 4  # checkpoint from another model/config
EXIT_RUN_DIR = 5  # run dir not writable
# Retryable: the job is fine, the world around it was not.
EXIT_HANG = 142  # watchdog saw no progress; restart resumes from the last checkpoint
EXIT_PREEMPTED = 143  # saved at a step boundary on SIGTERM/SIGINT/SIGUSR*; requeue to continue


class PermanentError(Exception):
    """An error that restarting will not fix. ``str(e)`` is the one line shown to the user."""

    exit_code = 1


class ConfigError(PermanentError):
    exit_code = EXIT_CONFIG


class DataError(PermanentError):
    exit_code = EXIT_DATA


class IncompatibleCheckpointError(PermanentError):
    exit_code = EXIT_INCOMPATIBLE_CKPT


class RunDirError(PermanentError):
    exit_code = EXIT_RUN_DIR
