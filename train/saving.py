"""The job's checkpoint policy around the background writer: when ranks wait, when a failure stops.

Only the writers write (rank 0, or one rank per node: train/replicas.py), but every rank must
agree on each step boundary, and none may sit inside a collective while a writer waits for its
disk: the other ranks' collective would time out (at ``--dist.timeout-s``) and turn a slow save
into a failed job. So every wait for a save is a loop of short waits, each followed by a tiny
all-reduce that all ranks enter within ``POLL_S``.

What each rank learns at a boundary, from the writers: a save is still running; a save has been
running longer than ``--ckpt.save-timeout-s`` (hung storage: the attempt ends, exit 147,
retryable); a writer gives up on saving (after ``--ckpt.max-failures`` failed saves in a row, or a
failed final or preemption save): exit 6 for a full disk (permanent: free space first), 147
otherwise.

A failed save costs nothing on disk: the writer removes its own temporary and every committed
checkpoint stays. Training goes on and the next interval tries again. Before the first save, and
with every failure, rank 0 says in one line how much space the checkpoints need ((keep + 1) x one
checkpoint: retention deletes only after a commit) and how much there is.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from train.ckpt.manager import CheckpointManager
from train.ckpt.objstore import is_url
from train.ckpt.writer import CheckpointWriter
from train.config import CkptConfig
from train.dist import DistEnv
from train.errors import EXIT_DISK_FULL, EXIT_STORAGE, DiskFullError, StorageError

if TYPE_CHECKING:
    from train.local_tier import LocalTier

log = logging.getLogger("train")
POLL_S = 0.2
# Any writer: still saving (durable), gave up (disk full), gave up (other failure), hung, still
# saving (node-local tier).
FLAGS = 5
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
    def __init__(
        self,
        writer: CheckpointWriter,
        manager: CheckpointManager,
        cfg: CkptConfig,
        env: DistEnv,
        writes: bool,
        tier: LocalTier | None = None,
    ):
        self.writer, self.manager, self.cfg, self.env, self.writes = writer, manager, cfg, env, writes
        self.tier = tier
        self.local_busy = False  # the node-local save in flight on some writer (every rank knows)
        self.failures = 0  # consecutive (on a writer)
        self._gave_up = False
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
        """A writer, before a save is handed to its thread: the first time, say what the run needs;
        every time, refuse a save that cannot fit (it would only fill the disk and fail)."""
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
    def local_flags(self, final: bool = False, error: BaseException | None = None) -> list[float]:
        """This rank's contribution to the boundary all-reduce (summed: > 0 means "some writer")."""
        if not self.writes:
            return [0.0] * FLAGS
        # "Still saving" first, then the error: a save that ends (and fails) in between is then
        # seen as failed now, never as neither busy nor failed (its error would surface later,
        # unhandled, from the writer).
        busy, in_flight = self.writer.busy, self.writer.in_flight
        error = error or self.writer.take_error()
        tier = self.tier.manager if self.tier is not None else None
        if error is not None and tier is not None and self.writer.error_from is tier:
            self.tier.failed(error)  # type: ignore[union-attr]  # never the job's failure
            error = None
        if self.writer.last_committed != self._committed:
            self._committed, self.failures = self.writer.last_committed, 0
        code = 0
        if error is not None:
            self.failures += 1
            code = self._failed(error, final)
            self._gave_up = bool(code)
        overdue = self.writer.running_for() > self.cfg.save_timeout_s
        local = busy and tier is not None and in_flight is tier
        return [
            float(busy and not local),
            float(code == EXIT_DISK_FULL),
            float(code == EXIT_STORAGE),
            float(overdue),
            float(local),
        ]

    def act(self, flags: list[float]) -> bool:
        """Every rank, on the all-reduced flags: raise if the job stops here; else whether a writer
        is still saving a durable checkpoint (``local_busy``: a node-local one)."""
        busy, full, failing, overdue, self.local_busy = (x > 0 for x in flags)
        mine = self.writes and (self._gave_up or self.writer.running_for() > self.cfg.save_timeout_s)
        if overdue:
            raise StorageError(
                f"the checkpoint save of step {self.writer.step_in_flight} has run longer than "
                f"--ckpt.save-timeout-s {self.cfg.save_timeout_s:g}: storage hung? ending this attempt"
                if mine
                else "a checkpoint save is hung (see the writing rank's log)",
                echo=mine,
            )
        if full:
            raise DiskFullError(self._give_up_line() if mine else "", echo=mine)
        if failing:
            raise StorageError(
                self._give_up_line() if mine else "a rank cannot write checkpoints (see its log)", echo=mine
            )
        return busy

    def settle(self, final: bool = False) -> None:
        """Collective: return once every writer's save in flight (of either tier) is done, in short
        waits every rank shares (see the module docstring)."""
        while True:
            if self.writes:
                self.writer.join(POLL_S)
            flags = torch.tensor(self.local_flags(final), dtype=torch.float32, device=self.env.device)
            if self.env.backend:
                dist.all_reduce(flags)
            if not self.act(flags.tolist()) and not self.local_busy:
                return

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
