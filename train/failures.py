"""Permanent failures: say it in one line, exit with a non-retryable code, don't crash-loop."""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

from train.errors import PermanentError, RunDirError

log = logging.getLogger("train")


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


def permanent(error: PermanentError) -> int:
    code = error.exit_code
    print(f"error: {error} [exit {code}: permanent, restarting will not help]", file=sys.stderr, flush=True)
    return code
