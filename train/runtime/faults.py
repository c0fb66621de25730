"""Fault injection for tests and chaos runs: off unless the entry point installs it (FTJOB_FAULT set).

FTJOB_FAULT is a ';'-separated list of faults, each ``kind[:key=value]...``:

  crash:step=50:rank=1        SIGKILL this rank right after it completes step 50
  crash:step=50:idle=1        the same at the first step from 50 on that no rank is saving at (the
                              step's agreement says so): a test's planned kill that must land
                              between saves, however slow the machine makes them
  hang:step=30:rank=0         stop making progress after step 30 (sleep forever)
  slow:rank=1:ms=200          sleep 200 ms after every step on rank 1
  await_zygote:step=1         after step 1, wait (up to 120 s) until this node's warm-start zygote
                              accepts workers, so that the next restart is surely a warm one
  kill:point=ckpt.before_rename:save_step=40
                              SIGKILL inside the checkpoint commit of step 40 at that point
                              (points: ckpt.file_written, ckpt.before_rename, ckpt.after_rename)
  slow_write:ms=4000          every checkpoint file takes 4 s longer to write (a slow filesystem)
  hang_write:save_step=40     the checkpoint write of step 40 never finishes (a hung NFS mount)
  fail_write:save_step=40     the checkpoint write of step 40 fails with EIO (a failing disk)
  slow_list:ms=3000           every listing of a checkpoint directory takes 3 s longer (a slow store)
  slow_read:ms=9000:rank=0    every checkpoint file read (at resume, or retention's re-check) takes
                              9 s longer on rank 0 (a slow disk, a cold bucket)
  raise:step=20:rank=1        an uncaught exception (RuntimeError) right after step 20
  hold_gil:step=5             after step 5, block in C holding the GIL: no Python thread runs again

Every fault fires only on the first attempt (``restart=0``) unless it says otherwise
(``restart=N``, or ``restart=any``), so an injected crash does not turn into a crash loop.
``once=PATH`` fires a fault only if PATH does not exist yet (and creates it): once per run across
requeues, where torchrun's restart count starts from 0 again. An unknown kind or key is a
configuration error (exit 2): a misspelt fault must not pass for a run that survived it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import time

from train.ckpt import hooks
from train.errors import ConfigError
from train.runtime import env, warmstart

log = logging.getLogger(__name__)

_MATCH = ("rank", "restart", "once")  # every kind takes these
KINDS = {
    "crash": ("step", "idle"),
    "hang": ("step",),
    "slow": ("step", "ms"),
    "await_zygote": ("step",),
    "raise": ("step",),
    "hold_gil": ("step",),
    "kill": ("point", "save_step"),
    "slow_write": ("save_step", "ms"),
    "hang_write": ("save_step",),
    "fail_write": ("save_step",),
    "slow_list": ("ms",),
    "slow_read": ("ms",),
}
_SLOW_POINTS = (("slow_list", "ckpt.list"), ("slow_read", "ckpt.file_read"))
_STEP_KINDS = ("crash", "hang", "slow", "await_zygote", "raise", "hold_gil")

_faults: list[dict[str, str]] = []
_context: dict[str, int] = {}


def parse(spec: str) -> list[dict[str, str]]:
    """The faults of an FTJOB_FAULT value; ConfigError naming the first unknown kind or key."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, *pairs = item.split(":")
        if kind not in KINDS:
            raise ConfigError(f"FTJOB_FAULT: unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
        fault = {"kind": kind, "restart": "0"}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if key not in (*KINDS[kind], *_MATCH) or not eq:
                keys = ", ".join(f"{k}=" for k in (*KINDS[kind], *_MATCH))
                raise ConfigError(f"FTJOB_FAULT: {kind} takes no {pair!r}; its keys: {keys}")
            fault[key] = value
        faults.append(fault)
    return faults


def install(spec: str) -> None:
    """Arm the faults of ``spec`` in this process (the entry point calls it when FTJOB_FAULT is set)."""
    global _faults
    _faults = parse(spec)
    if _faults:
        hooks.install(_point, _context.update)  # the checkpoint package calls back at its points
        log.warning("fault injection armed: %s", spec)


def _matches(fault: dict[str, str], **ctx: int | str) -> bool:
    launch = env.launch()
    known = {"rank": launch.rank, "restart": launch.restart}
    for key, want in fault.items():
        if key in ("kind", "ms", "once", "idle") or want == "any":
            continue
        have = ctx.get(key, _context.get(key, known.get(key)))
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


def _hang(what: str) -> None:
    log.warning("fault injection: hanging %s", what)
    while True:
        time.sleep(3600)


def _point(name: str) -> None:
    for fault in _faults:
        kind = fault["kind"]
        if kind == "kill" and _matches(fault, point=name):
            _kill(f"at {name}")
        elif kind in ("slow_write", "hang_write", "fail_write") and name == "ckpt.file_written":
            if not _matches(fault):
                continue
            if kind == "hang_write":
                _hang("in the checkpoint write")
            if kind == "fail_write":
                raise OSError(errno.EIO, "fault injection: I/O error writing a checkpoint file")
            time.sleep(float(fault.get("ms", "1000")) / 1000)
        elif (kind, name) in _SLOW_POINTS and _matches(fault):
            time.sleep(float(fault.get("ms", "1000")) / 1000)


def _due(fault: dict[str, str], step: int, saving: bool) -> bool:
    if fault.get("idle") == "1":  # from its step on, at the first boundary no save is running at
        rest = {k: v for k, v in fault.items() if k not in ("step", "idle")}
        return not saving and step >= int(fault.get("step", "0")) and _matches(rest)
    return _matches(fault, step=step)


def after_step(step: int, saving: bool = False) -> None:
    """The step-boundary faults (nothing when none is installed). ``saving``: the step's agreement
    says a save is still running on some rank."""
    for fault in _faults:
        if fault["kind"] not in _STEP_KINDS or not _due(fault, step, saving):
            continue
        if fault["kind"] == "crash":
            _kill(f"after step {step}")
        elif fault["kind"] == "raise":
            raise RuntimeError(f"fault injection: exception after step {step}")
        elif fault["kind"] == "hang":
            _hang(f"after step {step}")
        elif fault["kind"] == "hold_gil":  # as a deadlock in a C destructor does
            log.warning("fault injection: holding the GIL after step %d", step)
            while True:
                ctypes.PyDLL(None).pause()  # PyDLL keeps the GIL during the call
        elif fault["kind"] == "slow":
            time.sleep(float(fault.get("ms", "100")) / 1000)
        elif fault["kind"] == "await_zygote":  # so that a test's next restart is surely warm
            deadline = time.monotonic() + 120
            while not warmstart.listening(warmstart.agent_pid()) and time.monotonic() < deadline:
                time.sleep(0.05)
