"""Run torchrun as a child, pass the scheduler's stop signals on to it, and wait for everything it started.

SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (and SIGHUP, sent on as SIGTERM) go to torchrun and to its
workers: they save at the next step boundary and exit 143. Once every worker has ended, torchrun
gets a few seconds to follow and is then stopped: its own signal handling can lose track of a
worker's exit for minutes, longer than SLURM's KillWait or a pod's grace period. The first stop signal is
passed on once and later ones are dropped (torchrun cuts its graceful shutdown short when signalled
again), except SIGINT: a repeated Ctrl-C is passed on each time. torchrun runs in a process group
of its own, so a Ctrl-C at the terminal reaches it once, through here. Where torchrun is signalled
directly as well (Slurm signals every process of a step) and exits early anyway, this waits for the
workers it left behind: their own record of the save is what decides the exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from train.runtime import env

AFTER_WORKERS_S = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


class QuietStop:
    """Passes torchrun's stderr on, except what it prints when the job stopped it on purpose.

    On a permanent error a worker stops its torchrun with SIGTERM, so that it does not restart the
    group into the same error; torchrun then dies of a SignalException (or, on another node, of the
    loss of the rendezvous that stopped torchrun hosted), with a traceback and C++ store warnings
    that say nothing the job's one line has not said. ``quiet()`` tells whether the job recorded
    such an error. Anything else, tracebacks included, goes through unchanged; a line is written as
    soon as it is known not to start a traceback (a progress bar's carriage returns are not held)."""

    START = b"Traceback (most recent call last):"
    _CHAINED = (b"Traceback", b"The above exception", b"During handling")
    # How torchrun ends once the job stopped it, or once another node's torchrun stopped first.
    _STOPPED = (b"SignalException", b"RendezvousConnectionError", b"RendezvousClosedError")
    # torch's C++ store client logs every failed read of a store that went away with a stack trace.
    _CPP_WARNING = b"TCPStore.cpp"
    _CPP_TRACE = (b"Exception raised from", b"frame #", b"<omitting python frames>")

    def __init__(self, write: Callable[[bytes], object], quiet: Callable[[], bool]):
        self._write, self._quiet = write, quiet
        self._held: list[bytes] = []  # a traceback's lines, until its last one says what it is
        self._in_cpp_warning = False  # dropping a C++ store warning's stack trace
        self._partial = b""  # a line's start that may be a traceback's
        self._midline = False  # the start of the current line has been written already

    def feed(self, data: bytes) -> None:
        *lines, last = (self._partial + data).split(b"\n")
        self._partial = b""
        for line in lines:
            self._line(line + b"\n")
        if not last:
            return
        if self._held or (not self._midline and self.START.startswith(last[: len(self.START)])):
            self._partial = last
        else:
            self._write(last)
            self._midline = True

    def _line(self, line: bytes) -> None:
        if self._in_cpp_warning:
            if not line.strip() or line.startswith(self._CPP_TRACE):
                return
            self._in_cpp_warning = False
        if self._midline:
            self._midline = False
            self._write(line)
        elif self._held:
            self._held.append(line)
            ended = line.strip() and not line[:1].isspace() and not line.startswith(self._CHAINED)
            if ended:
                block, self._held = self._held, []
                if not (any(s in line for s in self._STOPPED) and self._quiet()):
                    self._write(b"".join(block))
        elif line.startswith(self.START):
            self._held = [line]
        elif line.startswith(b"[W") and self._CPP_WARNING in line and self._quiet():
            self._in_cpp_warning = True
        else:
            self._write(line)

    def close(self) -> None:
        self._write(b"".join(self._held) + self._partial)
        self._held, self._partial = [], b""


def _to_stderr(data: bytes) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()


def _tee(source, copy: Path, quiet: Callable[[], bool]) -> threading.Thread:
    """torchrun's stderr to ours (see QuietStop) and, all of it, to a file: its closing summary is
    the only witness of a worker that died of a signal (the OOM killer's SIGKILL) while its peers
    only saw the connection drop."""

    def pump() -> None:
        shown = QuietStop(_to_stderr, quiet)
        with copy.open("wb") as out:
            while chunk := source.read1(1 << 16):
                shown.feed(chunk)
                out.write(chunk)
                out.flush()
        shown.close()

    thread = threading.Thread(target=pump, name="torchrun-stderr", daemon=True)
    thread.start()
    return thread


class Supervisor:
    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        stderr_copy: Path,
        grace_s: float,
        stopped_on_purpose: Callable[[], bool] = lambda: False,
    ):
        self.command, self.env, self.stderr_copy, self.grace_s = command, env, stderr_copy, grace_s
        self._stopped_on_purpose = stopped_on_purpose
        self.stop_signal: int | None = None  # the first stop signal received
        self._child: subprocess.Popen | None = None
        self._workers: list[int] = []
        self._forwarded = False

    def _on_signal(self, number: int, _frame) -> None:
        number = signal.SIGTERM if number == signal.SIGHUP else number
        if self.stop_signal is not None and number != signal.SIGINT:
            return  # passed on already
        self.stop_signal = self.stop_signal or number
        self._forward(number)

    def _forward(self, number: int) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        name = signal.Signals(number).name
        print(f"launch: got {name}; torchrun (pid {child.pid}) passes it to the workers, which save and stop",
              file=sys.stderr, flush=True)  # fmt: skip
        self._workers = self._workers or env.children(child.pid)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(number)
        # The workers get it from here too: torchrun's own handler can be raised inside its poll
        # of a worker and leave that worker's exit unseen for minutes (its 30 s + 90 s of stop).
        for pid in self._workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)
        self._forwarded = True

    def _wait(self, child: subprocess.Popen) -> int:
        """torchrun's exit code; once a stop signal was passed on and every worker has ended,
        torchrun gets AFTER_WORKERS_S to follow, then is killed (its record says nothing the
        workers' records do not)."""
        workers_gone_at = None
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=0.2)
            if not (self._forwarded and self._workers) or any(env.alive(pid) for pid in self._workers):
                continue
            workers_gone_at = workers_gone_at or time.monotonic()
            if time.monotonic() - workers_gone_at > AFTER_WORKERS_S:
                print(f"launch: every worker has ended; torchrun (pid {child.pid}) did not follow in "
                      f"{AFTER_WORKERS_S:.0f} s: stopping it", file=sys.stderr, flush=True)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                return child.wait()

    def run(self) -> int:
        """torchrun's exit code."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self._child = subprocess.Popen(
                self.command, env=self.env, stderr=subprocess.PIPE, process_group=0
            )
            tee = _tee(self._child.stderr, self.stderr_copy, self._stopped_on_purpose)
            if self.stop_signal is not None and not self._forwarded:  # it came while torchrun started
                self._forward(self.stop_signal)
            rc = self._wait(self._child)  # signal handlers run meanwhile
            tee.join(timeout=5)
            if self.stop_signal is not None:
                deadline = time.monotonic() + self.grace_s
                for pid in self._workers:
                    while env.alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.2)
            return rc
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
