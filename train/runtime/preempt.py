"""Preemption: a signal only sets a flag; the training loop acts on it at the next step boundary.

No collective, I/O or lock ever runs inside the handler (a handler interrupts arbitrary code,
possibly a collective in progress). The loop ORs the flag across ranks in the all-reduce it already
does each step, so all ranks save the same step and exit with EXIT_PREEMPTED.
"""

from __future__ import annotations

import logging
import signal
import time

log = logging.getLogger("train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# How long torchrun's agent waits after its SIGTERM before it SIGKILLs the workers (torch 2.13's
# _stop_workers: 30 s, whatever TORCH_ELASTIC_SHUTDOWN_TIMEOUT says); the launcher's own stop gives more.
AGENT_GRACE_S = 30.0
_first_signal_at: float | None = None  # time.monotonic() of the first stop signal of this process


def grace_left(margin_s: float = 5.0) -> float | None:
    """Seconds left before torchrun's SIGKILL may come (less ``margin_s``); None: no stop signal."""
    if _first_signal_at is None:
        return None
    return max(0.0, _first_signal_at + AGENT_GRACE_S - margin_s - time.monotonic())


class StopSignals:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        global _first_signal_at
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        if _first_signal_at is None:
            _first_signal_at = time.monotonic()
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.requested:
            log.warning("stopped by %s", self.signal_name)
