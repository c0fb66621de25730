"""Hang watchdog: a rank whose steps stop completing dumps every thread's stack and exits.

torchrun then sees a failed worker, stops the others and restarts the group, which resumes from the
last checkpoint. Without it a dead peer or a stuck collective holds the job until the process-group
timeout. The timeout is explicit, or derived from observed step times with a floor.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator

from train.config import WatchdogConfig
from train.errors import EXIT_HANG
from train.runtime.exits import record_exit

log = logging.getLogger("train")


class Watchdog:
    def __init__(self, cfg: WatchdogConfig, rank: int, run_dir: str):
        self.cfg, self.rank, self.run_dir = cfg, rank, run_dir
        self._last = 0.0  # monotonic time of the last completed step; 0 = not armed
        self._step = 0
        self._times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)

    def timeout(self) -> float:
        if self.cfg.timeout_s > 0:
            return self.cfg.timeout_s
        typical = statistics.median(self._times) if self._times else 0.0
        return max(self.cfg.min_timeout_s, self.cfg.factor * typical)

    def progress(self, step: int, step_time: float) -> None:
        self._step = step
        self._times = ([*self._times, step_time])[-50:]
        self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not a step: checkpoint waits and evaluation may take longer than any step."""
        armed, self._last = self._last, 0.0
        try:
            yield
        finally:
            self._last = time.monotonic() if armed else 0.0

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            if self._last and time.monotonic() - self._last > self.timeout():
                log.error(
                    "rank %d made no progress for %.0fs after step %d (watchdog timeout %.0fs); "
                    "dumping stacks and exiting %d so the job restarts from its last checkpoint",
                    self.rank,
                    time.monotonic() - self._last,
                    self._step,
                    self.timeout(),
                    EXIT_HANG,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                # If torchrun's restarts run out, the launcher still reports "retryable".
                record_exit(self.run_dir, EXIT_HANG, f"no progress after step {self._step}")
                os._exit(EXIT_HANG)

    def __enter__(self) -> Watchdog:
        if self.cfg.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
