"""When a failing durable save stops the job, and the space a run's checkpoints need.

A failed save costs nothing on disk: the writer removes its own temporary and every committed
checkpoint stays. Training goes on and the next interval tries again, until ``--ckpt.max-failures``
saves in a row have failed (or the final or preemption save fails): then the writer gives up, and
through the step's agreement (boundary.py) every rank stops: exit 6 for a full disk (permanent:
free space first), 147 otherwise (retryable). A save still running after ``--ckpt.save-timeout-s``
is hung storage: the attempt ends with 147 without waiting for it.

Before the first save, and with every failure, the writer says in one line how much space the
checkpoints need ((keep + 1) x one checkpoint: retention deletes only after a commit) and how
much there is.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from train.checkpointing.boundary import Agreement
from train.ckpt.objstore import is_url
from train.ckpt.writer import CheckpointWriter
from train.config import CkptConfig
from train.errors import EXIT_DISK_FULL, EXIT_STORAGE, DiskFullError, StorageError

log = logging.getLogger("train")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def free_bytes(path: Path) -> int | None:
    """Free space where ``path`` is (or will be created), None where that cannot be known."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


class SavePolicy:
    """The durable tier's saves as seen by one rank (only a writing rank ever has anything to say)."""

    def __init__(self, writer: CheckpointWriter, cfg: CkptConfig, writes: bool):
        self.writer, self.manager, self.cfg, self.writes = writer, writer.manager, cfg, writes
        self.failures = 0  # consecutive
        self.gave_up = False
        self._committed = writer.last_committed
        self._size: int | None = None  # bytes of one checkpoint, known at the first save
        self._last_error = ""
        self.on_failure: Callable[[str], object] = lambda line: None  # each failed save, in one line

    # -- space ---------------------------------------------------------------------------------------
    def _free(self) -> int | None:
        root = self.manager.storage.location("")
        return None if is_url(root) else free_bytes(Path(root))  # a bucket has no "free space"

    def _disk(self) -> tuple[str, int | None, int]:
        """(where checkpoints go, free bytes there or None, bytes held by its checkpoints): read once."""
        try:
            held = sum(i.size for i in self.manager.list())
        except OSError:
            held = 0
        return self.manager.storage.location(""), self._free(), held

    def _space(self, disk: tuple[str, int | None, int] | None = None) -> str:
        root, free, existing = disk or self._disk()
        size = self._size or 0
        need = (self.cfg.keep + 1) * size
        have = "free space unknown" if free is None else f"{_mb(free)} free + {_mb(existing)} in checkpoints"
        return (
            f"a checkpoint is {_mb(size)}; --ckpt.keep {self.cfg.keep} needs ({self.cfg.keep} + 1) x "
            f"{_mb(size)} = {_mb(need)} on {root}; {have}"
        )

    def _newest(self) -> str:
        try:
            step = next((i.step for i in self.manager.list() if i.valid), None)
        except OSError:  # the store that failed the save may not answer a listing either
            step = self.writer.last_committed
            return f"step {step} (as last committed; the store does not answer)" if step else "unknown"
        return f"step {step}" if step is not None else "none"

    def before_save(self, size: int) -> None:
        """On the writer, before a save is handed to its thread: the first time, say what the run
        needs; every time, refuse a save that cannot fit (it would only fill the disk and fail)."""
        first, self._size = self._size is None, size
        if first:
            disk = self._disk()
            _, free, existing = disk
            short = free is not None and free + existing < (self.cfg.keep + 1) * size
            (log.warning if short else log.info)(
                "checkpoint space: %s%s",
                self._space(disk),
                "; not enough: saves will fail once the disk fills (free space, lower --ckpt.keep "
                "or move --run-dir)"
                if short
                else "",
            )
        else:
            free = self._free()
        if free is not None and free < size:
            raise OSError(errno.ENOSPC, f"only {_mb(free)} free for a {_mb(size)} checkpoint")

    # -- the boundary ---------------------------------------------------------------------------------
    def report(self, final: bool = False) -> Agreement:
        """This rank's word on the durable saves (``final``: a failure now is the last save's)."""
        if not self.writes:
            return Agreement()
        # "Still saving" first, then the error: a save that ends (and fails) in between is then
        # seen as failed now, never as neither busy nor failed (its error would surface later,
        # unhandled, from the writer).
        busy = self.writer.busy
        error = self.writer.take_error()
        if self.writer.last_committed != self._committed:
            self._committed, self.failures = self.writer.last_committed, 0
        code = 0
        if error is not None:
            self.failures += 1
            code = self._failed(error, final)
            self.gave_up = bool(code)
        return Agreement(
            saving=busy,
            hung=self.writer.running_for() > self.cfg.save_timeout_s,
            disk_full=code == EXIT_DISK_FULL,
            storage_failed=code == EXIT_STORAGE,
        )

    def act(self, agreed: Agreement, hung_here: int | None) -> None:
        """Every rank: raise if the job ends at this boundary. ``hung_here``: the step of this
        rank's own save that is hung, if one is (then this rank says why; the others stay quiet)."""
        if agreed.hung:
            raise StorageError(
                f"the checkpoint save of step {hung_here} has run longer than "
                f"--ckpt.save-timeout-s {self.cfg.save_timeout_s:g}: storage hung? ending this attempt"
                if hung_here is not None
                else "a checkpoint save is hung (see the writing rank's log)",
                echo=hung_here is not None,
            )
        if agreed.disk_full:
            raise DiskFullError(self._give_up_line() if self.gave_up else "", echo=self.gave_up)
        if agreed.storage_failed:
            raise StorageError(
                self._give_up_line() if self.gave_up else "a rank cannot write checkpoints (see its log)",
                echo=self.gave_up,
            )

    # -- failures -------------------------------------------------------------------------------------
    def _failed(self, error: BaseException, final: bool) -> int:
        """Log one line; return the exit code if the job gives up now, else 0."""
        cause = getattr(error, "__cause__", None) or error
        full = isinstance(cause, OSError) and cause.errno in _FULL
        self._last_error = f"{type(cause).__name__}: {cause}"
        gives_up = final or self.failures >= self.cfg.max_failures
        then = (
            "the job stops"
            if gives_up
            else f"retrying at the next interval ({self.failures} of {self.cfg.max_failures} failures in "
            "a row before the job stops)"
        )
        self.on_failure(self._last_error)
        log.error(
            "checkpoint save failed: %s; %s%s; newest checkpoint: %s",
            self._last_error,
            f"{self._space()}; " if full else "",
            then,
            self._newest(),
        )
        if not gives_up:
            return 0
        return EXIT_DISK_FULL if full else EXIT_STORAGE

    def _give_up_line(self) -> str:
        what = (
            "the final/preemption save"
            if self.failures < self.cfg.max_failures
            else (f"{self.failures} checkpoint saves in a row")
        )
        return (
            f"{what} failed ({self._last_error}); the newest checkpoint is "
            f"{self._newest()}; {self._space()}; free space, lower "
            "--ckpt.keep or move --run-dir, then start again: it resumes from there"
        )
