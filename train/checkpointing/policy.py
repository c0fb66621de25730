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
from dataclasses import dataclass
from pathlib import Path

from train.checkpointing.boundary import Agreement
from train.checkpointing.together import Limit
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


@dataclass(frozen=True)
class Disk:
    root: str
    free: int | None  # None: cannot be known (a bucket)
    held: int  # bytes in checkpoints
    newest: str  # the newest valid checkpoint, in words


class SavePolicy:
    """The durable tier's saves as seen by one rank (only a writing rank ever has anything to say)."""

    def __init__(self, writer: CheckpointWriter, cfg: CkptConfig, writes: bool):
        self.writer, self.manager, self.cfg, self.writes = writer, writer.manager, cfg, writes
        self.failures = 0  # consecutive
        self.gave_up = False
        self._committed = writer.last_committed
        self._size: int | None = None  # bytes of one checkpoint, known at the first save
        self._seen = Disk(writer.manager.storage.location(""), None, 0, "unknown")
        self._last_error = ""
        self.on_failure: Callable[[str], object] = lambda line: None  # each failed save, in one line

    # -- space (asked on the writer's thread: a slow store never holds the step loop) ---------------
    def _free(self) -> int | None:
        root = self.manager.storage.location("")
        return None if is_url(root) else free_bytes(Path(root))  # a bucket has no "free space"

    def _look(self) -> Disk:
        """Where checkpoints go, the free bytes there, the bytes its checkpoints hold and the
        newest valid one: one listing, remembered for the lines said on the main thread."""
        try:
            infos = self.manager.list()
            held = sum(i.size for i in infos)
            newest = next((f"step {i.step}" for i in infos if i.valid), "none")
        except OSError:  # the store that fails saves may not answer a listing either
            held, newest = 0, "unknown (the store does not answer)"
        self._seen = Disk(self.manager.storage.location(""), self._free(), held, newest)
        return self._seen

    def _space(self) -> str:
        disk, size = self._seen, self._size or 0
        need = (self.cfg.keep + 1) * size
        have = (
            "free space unknown"
            if disk.free is None
            else f"{_mb(disk.free)} free + {_mb(disk.held)} in checkpoints"
        )
        return (
            f"a checkpoint is {_mb(size)}; --ckpt.keep {self.cfg.keep} needs ({self.cfg.keep} + 1) x "
            f"{_mb(size)} = {_mb(need)} on {disk.root}; {have}"
        )

    def _newest(self) -> str:
        committed = self.writer.last_committed
        if committed is not None:
            return f"step {committed}"
        return self._seen.newest

    def before_save(self, size: int) -> None:
        """On the writer's thread, before anything is written: the first time, say what the run
        needs; every time, refuse a save that cannot fit (it would only fill the disk and fail)."""
        first, self._size = self._size is None, size
        disk = self._look()
        if first:
            short = disk.free is not None and disk.free + disk.held < (self.cfg.keep + 1) * size
            (log.warning if short else log.info)(
                "checkpoint space: %s%s",
                self._space(),
                "; not enough: saves will fail once the disk fills (free space, lower --ckpt.keep "
                "or move --run-dir)"
                if short
                else "",
            )
        if disk.free is not None and disk.free < size:
            raise OSError(errno.ENOSPC, f"only {_mb(disk.free)} free for a {_mb(size)} checkpoint")

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
            hung=self.writer.overdue(),
            disk_full=code == EXIT_DISK_FULL,
            storage_failed=code == EXIT_STORAGE,
        )

    def act(self, agreed: Agreement, hung_here: tuple[int | None, Limit] | None) -> None:
        """Every rank: raise if the job ends at this boundary. ``hung_here``: the step and limit of
        this rank's own save that is hung, if one is (then this rank says why; the others stay
        quiet)."""
        if agreed.hung:
            raise StorageError(
                f"the checkpoint save of step {hung_here[0]} has run longer than {hung_here[1]}: "
                "storage hung? ending this attempt"
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
