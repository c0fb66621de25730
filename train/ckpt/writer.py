"""Saves in the background: the step loop pays (at most) for a memory snapshot, a thread does the rest.

A snapshot may be deferred: a function that copies the state into staging buffers. The thread runs
it first; the training loop calls ``wait_staged()`` before it next mutates that state (the optimizer
step), so the copy overlaps the forward/backward in between. At most one save is in flight. A
failed background save is re-raised on the caller's next interaction (``check``, ``save`` or
``close``); the atomic commit guarantees it never damaged the checkpoints already on disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from train.ckpt.manager import CheckpointManager

log = logging.getLogger(__name__)


Files = dict[str, Any]
Snapshot = Files | Callable[[], Files]  # ready files, or a function that copies them out


class CheckpointWriteError(RuntimeError):
    pass


class CheckpointWriter:
    def __init__(self, manager: CheckpointManager, background: bool):
        self.manager, self.background = manager, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: int | None = None
        self._staged = threading.Event()
        self._staged.set()
        self.stall_s = 0.0  # time the caller spent blocked by the latest save, in save() and wait_staged()
        self._started: float | None = None  # monotonic start of the save in flight
        self.step_in_flight: int | None = None
        self.limit_s = float("inf")  # how long the save in flight may run before it counts as hung
        # What a save does with its files (default: the manager commits them); its return value is
        # kept in ``result`` (a sharded save writes one rank's part and returns its entries).
        self.commit: Callable[[int, Files, dict[str, Any]], Any] | None = None
        self.result: Any = None

    def _write(
        self, step: int, state: Snapshot, meta: dict[str, Any], precheck: Callable[[], object] | None
    ) -> None:
        try:
            t0 = time.perf_counter()
            try:
                files = state() if callable(state) else state
            finally:
                self._staged.set()
            if precheck is not None:
                precheck()
            if self.commit is not None:  # the caller commits, and says so (last_committed)
                self.result = self.commit(step, files, meta)
                return
            else:
                name = self.manager.save(step, files, meta)
                log.info(
                    "checkpoint %s committed (%.2fs)",
                    self.manager.storage.location(name),
                    time.perf_counter() - t0,
                )
            self.last_committed = step
        except BaseException as e:
            self._error = e

    @property
    def busy(self) -> bool:
        """A background save is still running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def running_for(self) -> float:
        """Seconds the save in flight has been running (0 when none is)."""
        started = self._started
        return time.monotonic() - started if started is not None and self.busy else 0.0

    def overdue(self) -> bool:
        """The save in flight has run past its ``limit_s``."""
        return self.running_for() > self.limit_s

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the save in flight; True if it is still running."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return True
            self._thread = None
        return False

    def fail(self, error: BaseException) -> None:
        """A failure of this writer's save found outside its thread (a sharded save's claim or
        commit on rank 0): reported like one raised in it."""
        self._error = error

    def take_error(self) -> BaseException | None:
        """The background failure, if any, now handled by the caller (not raised again)."""
        error, self._error = self._error, None
        return error

    def check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteError(f"background checkpoint save failed: {error!r}") from error

    def wait_staged(self) -> None:
        """Block until the latest snapshot has been copied out (call before mutating the state)."""
        if not self._staged.is_set():
            t0 = time.perf_counter()
            self._staged.wait()
            self.stall_s += time.perf_counter() - t0

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def save(
        self,
        step: int,
        snapshot: Callable[[], Snapshot | None],
        meta: dict[str, Any],
        precheck: Callable[[], object] | None = None,
        limit_s: float = float("inf"),
    ) -> None:
        """Take ``snapshot()`` (after the previous save is done with its buffers) and commit it;
        past ``limit_s`` it is overdue().

        ``snapshot`` may be collective; a rank that gets None from it has nothing to write.
        ``precheck`` runs on a rank that has something to write, before any write, in the
        background with the rest (it may ask the storage: a slow one must not hold the caller): if
        it raises, that is this save's failure, and nothing is written.
        """
        t0 = time.perf_counter()
        self.wait()
        self.result = None
        state = snapshot()
        if state is None:
            pass
        elif self.background:
            self._staged.clear()
            self._started, self.step_in_flight, self.limit_s = time.monotonic(), step, limit_s
            self._thread = threading.Thread(
                target=self._write, args=(step, state, meta, precheck), name=f"ckpt-save-{step}", daemon=True
            )
            self._thread.start()
        else:
            self._write(step, state, meta, precheck)
            self.check()
        self.stall_s = time.perf_counter() - t0

    def close(self, timeout: float | None = None) -> None:
        """Wait for the save in flight (at most ``timeout`` s: a hung storage must not hold the exit)."""
        if timeout is None:
            self.wait()
        elif not self.join(timeout):
            self.check()
        else:
            log.error(
                "abandoning the checkpoint save of step %s: still running after %.0fs",
                self.step_in_flight,
                timeout,
            )
