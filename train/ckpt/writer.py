"""Saves in the background: the step loop pays for a memory snapshot, a thread does the rest.

At most one save is in flight. A failed background save is re-raised on the caller's next
interaction (``check``, ``save`` or ``close``); the atomic commit guarantees it never damaged the
checkpoints already on disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from train.ckpt.manager import CheckpointManager

log = logging.getLogger(__name__)


class CheckpointWriteError(RuntimeError):
    pass


class CheckpointWriter:
    def __init__(self, manager: CheckpointManager, background: bool):
        self.manager, self.background = manager, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: int | None = None
        self.last_stall_s = 0.0

    def _write(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        try:
            t0 = time.perf_counter()
            name = self.manager.save(step, state, meta)
            self.last_committed = step
            log.info("checkpoint %s committed (%.2fs)", name, time.perf_counter() - t0)
        except BaseException as e:
            self._error = e

    def check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteError(f"background checkpoint save failed: {error!r}") from error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def save(self, step: int, snapshot: Callable[[], dict[str, Any] | None], meta: dict[str, Any]) -> None:
        """Take ``snapshot()`` (after the previous save is done with its buffers) and commit it.

        ``snapshot`` may be collective; a rank that gets None from it has nothing to write.
        """
        t0 = time.perf_counter()
        self.wait()
        state = snapshot()
        if state is None:
            pass
        elif self.background:
            self._thread = threading.Thread(
                target=self._write, args=(step, state, meta), name=f"ckpt-save-{step}", daemon=True
            )
            self._thread.start()
        else:
            self._write(step, state, meta)
            self.check()
        self.last_stall_s = time.perf_counter() - t0

    def close(self) -> None:
        self.wait()
