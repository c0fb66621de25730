"""How a run ends, in a form schedulers and launchers can act on.

torchrun exits 1 whatever its workers did, so the job records its outcome in
``<run-dir>/exit_status.json`` ({"code", "reason", ...}); launch/ scripts exit with that code.
Permanent errors print one line and, under torchrun, stop the agent: restarting cannot fix them,
and each futile restart would only repeat the error and burn the restart budget.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from train import warmstart
from train.config import Config
from train.errors import PermanentError, RunDirError

log = logging.getLogger("train")
STATUS_FILE = "exit_status.json"


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


def guess_run_dir(argv: list[str] | None) -> str | None:
    """Where launchers will look for exit_status.json when the config itself did not parse."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--run-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--run-dir="):
            return arg.split("=", 1)[1]
    return Config().run_dir


def _is_local_leader() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def record_exit(run_dir: str | None, code: int, reason: str) -> None:
    """Rank 0's (or, before ranks agree, local rank 0's) account of how this attempt ended."""
    if run_dir is None or not _is_local_leader():
        return
    status = {
        "code": code,
        "reason": reason,
        "time": time.time(),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(run_dir) / f".{STATUS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(status) + "\n")
        os.replace(tmp, Path(run_dir) / STATUS_FILE)
    except OSError:
        pass  # an unwritable run dir is itself the error being reported


def clear_exit(run_dir: str) -> None:
    if _is_local_leader():
        Path(run_dir, STATUS_FILE).unlink(missing_ok=True)


def permanent(error: PermanentError, run_dir: str | None) -> int:
    code = error.exit_code
    agent = warmstart.torchrun_agent() if _is_local_leader() else None
    action = f"; stopping torchrun (pid {agent}) so it does not restart" if agent else ""
    print(
        f"error: {error} [exit {code}: permanent, restarting will not help{action}]",
        file=sys.stderr,
        flush=True,
    )
    record_exit(run_dir, code, str(error))
    if agent:
        os.kill(agent, signal.SIGTERM)
    return code
