"""Fault injection for tests and chaos runs. Off unless FTJOB_FAULT is set.

FTJOB_FAULT is a ';'-separated list of faults, each ``kind[:key=value]...``:

  crash:step=50:rank=1        SIGKILL this rank right after it completes step 50
  hang:step=30:rank=0         stop making progress after step 30 (sleep forever)
  slow:rank=1:ms=200          sleep 200 ms after every step on rank 1
  await_zygote:step=1         after step 1, wait (up to 120 s) until this node's warm-start zygote
                              accepts workers, so that the next restart is surely a warm one
  kill:point=ckpt.before_rename:save_step=40
                              SIGKILL inside the checkpoint commit of step 40 at that point
                              (points: ckpt.file_written, ckpt.before_rename, ckpt.after_rename)
  slow_write:ms=4000          every checkpoint file takes 4 s longer to write (a slow filesystem)
  hang_write:save_step=40     the checkpoint write of step 40 never finishes (a hung NFS mount)
  raise:step=20:rank=1        an uncaught exception (RuntimeError) right after step 20

Every fault fires only on the first attempt (``restart=0``) unless it says otherwise
(``restart=N``, or ``restart=any``), so an injected crash does not turn into a crash loop.
``once=PATH`` fires a fault only if PATH does not exist yet (and creates it): once per run across
requeues, where torchrun's restart count starts from 0 again.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from train import warmstart
from train.ckpt import hooks

log = logging.getLogger(__name__)

_context: dict[str, int] = {}


def _parse(spec: str) -> list[dict[str, str]]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, *pairs = item.split(":")
        fault = {"kind": kind, "restart": "0"}
        for pair in pairs:
            key, _, value = pair.partition("=")
            fault[key] = value
        faults.append(fault)
    return faults


_faults: list[dict[str, str]] | None = None


def _active() -> list[dict[str, str]]:
    """FTJOB_FAULT, parsed at first use, not at import: a warm-started trainer was imported by the
    zygote, in another environment."""
    global _faults
    if _faults is None:
        _faults = _parse(os.environ.get("FTJOB_FAULT", ""))
    return _faults


def _matches(fault: dict[str, str], **ctx: int | str) -> bool:
    env = {
        "rank": os.environ.get("RANK", "0"),
        "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
    }
    for key, want in fault.items():
        if key in ("kind", "ms", "once") or want == "any":
            continue
        have = ctx.get(key, _context.get(key, env.get(key)))
        if have is None or str(have) != want:
            return False
    return "once" not in fault or _first_time(fault["once"])  # claimed only when it fires


def _first_time(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def _kill(reason: str) -> None:
    log.warning("fault injection: SIGKILL %s", reason)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def set_context(**ctx: int) -> None:
    _context.update(ctx)


def point(name: str) -> None:
    for fault in _active():
        kind = fault["kind"]
        if kind == "kill" and _matches(fault, point=name):
            _kill(f"at {name}")
        elif kind in ("slow_write", "hang_write") and name == "ckpt.file_written" and _matches(fault):
            if kind == "hang_write":
                log.warning("fault injection: checkpoint write hangs")
                while True:
                    time.sleep(3600)
            time.sleep(float(fault.get("ms", "1000")) / 1000)


def after_step(step: int) -> None:
    for fault in _active():
        if not _matches(fault, step=step):
            continue
        if fault["kind"] == "crash":
            _kill(f"after step {step}")
        elif fault["kind"] == "raise":
            raise RuntimeError(f"fault injection: exception after step {step}")
        elif fault["kind"] == "hang":
            log.warning("fault injection: hanging after step %d", step)
            while True:
                time.sleep(3600)
        elif fault["kind"] == "slow":
            time.sleep(float(fault.get("ms", "100")) / 1000)
        elif fault["kind"] == "await_zygote":  # so that a test's next restart is surely warm
            deadline = time.monotonic() + 120
            while not warmstart.listening(warmstart.agent_pid()) and time.monotonic() < deadline:
                time.sleep(0.05)


hooks.install(point, set_context)  # the checkpoint package calls back at its points
