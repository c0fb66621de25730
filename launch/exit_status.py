"""The exit code a scheduler should see when torchrun has failed (used by launch/ftjob.py).

torchrun exits 1 whatever its workers did. Two records say more; the launcher gives each node a
private directory for them, so nodes never overwrite each other's:
- the job's own (``$FTJOB_STATUS_FILE``, written by train/runtime/exits.py): {"code", "class", "reason",
  "secondary", ...}; ``secondary`` means "this rank failed because another did";
- torchrun's own account, in the launcher's directory: its root-cause record
  (``agent-error.json``, from ``$TORCHELASTIC_ERROR_FILE``) and a copy of its stderr
  (``torchrun.err``), whose closing summary lists every failed worker - the only witness of a
  worker that died of a signal (SIGKILL by the OOM killer, SIGSEGV), which cannot write anything.

Order: a permanent error or a clean preemption save the job recorded; a worker's death by signal
that torchrun saw (128 + N: retryable); the loss of the rendezvous (145); any other record of the
job; the stop signal the launcher passed on (128 + N); else 144 - nothing says why, so it counts
as retryable, like every unknown failure. Standard library only: the launcher decides in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from pathlib import Path

from train.errors import EXIT_CRASH, EXIT_PEER


def _json(path: str) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def job_record(path: str) -> tuple[int, str, bool] | None:
    data = _json(path)
    try:
        code = int(data["code"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None
    if not 0 <= code <= 255:
        return None
    return code, " ".join(str(data.get("reason", "")).split()), bool(data.get("secondary"))  # type: ignore[union-attr]


def agent_record(records: str) -> tuple[int, str] | None:
    """(128 + N, why) if torchrun saw a worker die of signal N that torchrun itself did not send
    (when stopping the other workers of a failed group); SIGKILL first, if several."""
    text = ""
    for name in ("agent-error.json", "torchrun.err"):
        with contextlib.suppress(OSError):
            text += (Path(records) / name).read_text(errors="replace")
    stopped_by_torchrun = set(re.findall(r"Sending process (\d+) closing signal", text))
    deaths = re.findall(r"Signal (\d+) \((SIG\w+)\) received by PID (\d+)", text)
    found = {(int(n), name) for n, name, pid in deaths if pid not in stopped_by_torchrun}
    if not found:
        return None
    number, name = max(found, key=lambda f: (f[0] == signal.SIGKILL, f[0]))
    why = f"a worker died of {name}"
    if number == signal.SIGKILL:
        why += " (out of memory? the kernel's OOM killer sends SIGKILL: check dmesg)"
    return 128 + number, why


def rendezvous_lost(records: str) -> tuple[int, str] | None:
    """torchrun lost its rendezvous store: with c10d it lives in one node's torchrun, gone with it."""
    with contextlib.suppress(OSError):
        if "RendezvousConnectionError" in (Path(records) / "torchrun.err").read_text(errors="replace"):
            return EXIT_PEER, (
                "lost the rendezvous: the node that hosts the c10d store is gone (retryable: a relaunch "
                "brings the job back; an etcd rendezvous, RDZV_BACKEND=etcd, survives the loss of any node)"
            )
    return None


def decide(status_file: str, records: str, stop_signal: int | None) -> tuple[int, str]:
    job = job_record(status_file)
    # A permanent error counts even from a rank that only echoes another's (the same error, found
    # by every rank); any other ending only from a rank that saw it itself - then it is the cause,
    # whatever torchrun met afterwards (the rendezvous host gone as the job was ending, say).
    if job is not None and (1 <= job[0] <= 127 or not job[2]):
        return job[0], job[1]
    agent = agent_record(records) or rendezvous_lost(records)
    if agent is not None:
        return agent
    if job is not None:
        return job[0], job[1]
    if stop_signal:
        return 128 + stop_signal, f"stopped by signal {stop_signal} before the job reported a status"
    return EXIT_CRASH, "the job reported no status and torchrun saw no signal (unknown: retryable)"
