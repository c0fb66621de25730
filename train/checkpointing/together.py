"""Work that takes as long as the storage makes it take, done by some ranks while all wait together.

A rank that waits for a slow peer inside one long collective (the first all-gather after a 9-second
read, a broadcast whose sender is still reading) fails when the process group's timeout runs out:
``--dist.init-timeout-s`` at resume, a limit that has nothing to do with the checkpoint's size, so a
big enough checkpoint on slow enough storage would fail every start, forever. Here the work runs on
a thread and every rank's main thread meets the others in short polls (one tiny all-reduce each)
until no rank has work left. The only limit is the caller's, for work that hangs: past it, every
rank ends the attempt together (StorageError, exit 147, retryable). That limit grows with the bytes
(Limit): a fixed one would fail every start of a big enough checkpoint on slow enough storage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from train.errors import StorageError

T = TypeVar("T")
POLL_S = 0.2  # the longest a finished rank waits to learn that the others are done too
_poll_groups: dict[int, dist.ProcessGroup] = {}  # per default group (a process may build several)
RATE_FLAG = "--ckpt.slowest-mb-s"


@dataclass(frozen=True)
class Limit:
    """How long work on ``nbytes`` of checkpoint may run before it counts as hung: a floor (the
    option ``flag``) plus the bytes at the slowest rate storage is still waited for (``mb_s``,
    0: the floor alone)."""

    floor_s: float
    flag: str
    nbytes: int
    mb_s: float

    @property
    def seconds(self) -> float:
        return self.floor_s + (self.nbytes / (self.mb_s * 1e6) if self.mb_s > 0 else 0.0)

    def __str__(self) -> str:
        rate = f" + {self.nbytes / 1e6:.0f} MB at {RATE_FLAG} {self.mb_s:g}" if self.mb_s > 0 else ""
        return f"{self.seconds:.0f}s ({self.flag} {self.floor_s:g}{rate})"


def _group(device: torch.device) -> dist.ProcessGroup | None:
    """The group the polls use: on a GPU a gloo one over the CPU, so that a poll never queues
    behind (or beside) an NCCL transfer the work thread runs. Built once, by every rank."""
    if device.type == "cpu":
        return None
    world = id(dist.group.WORLD)
    if world not in _poll_groups:
        _poll_groups[world] = dist.new_group(backend="gloo")
    return _poll_groups[world]


def run(work: Callable[[], T] | None, limit: Limit, what: str) -> T | None:
    """Collective: ``work()`` (None: nothing for this rank) on a thread; returns its result once
    every rank's work is done. Raises StorageError on every rank if any rank's work runs past
    ``limit``."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["result"] = work() if work is not None else None
        except BaseException as e:  # re-raised on the main thread, once every rank is done
            box["error"] = e

    thread = threading.Thread(target=body, name=f"ftjob {what}", daemon=True)
    thread.start()
    active = dist.is_initialized() and dist.get_world_size() > 1
    group = _group(_device()) if active else None
    started, wait = time.monotonic(), 0.005
    while True:
        thread.join(wait)  # returns at once when this rank is done: the all-reduce paces it then
        wait = min(wait * 2, POLL_S)
        busy = thread.is_alive()
        overdue = busy and time.monotonic() - started > limit.seconds
        flags = torch.tensor([int(busy), int(overdue)], dtype=torch.int32)
        if active:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if not flags[0]:
            break
        if flags[1]:
            raise StorageError(
                f"{what} still running after {limit}: storage hung? ending this attempt"
                if overdue
                else f"another rank's {what} ran past {limit} (see its log)",
                echo=overdue,
            )
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")  # type: ignore[return-value]


def _device() -> torch.device:
    """Where the default group's collectives run: the polls go to a gloo group unless that is CPU."""
    backend = dist.get_backend()
    return torch.device("cpu") if backend == "gloo" else torch.device("cuda")
