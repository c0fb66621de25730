"""The one rule that picks the checkpoint to load, for a plain loop (``CheckpointManager.load_latest``)
and for a job of many ranks that list their copies and must all pick the same one
(train/checkpointing/plan.py). Pure: it reads nothing, so every reader that applies it to the same
list gets the same answer.

The newest usable step wins, wherever it is. On equal steps, the copy of the lowest holder (a
rank; a plain loop is holder 0), then of its first tier (say node-local before durable). A copy that
failed when read is excluded and the rule applied again: the next copy of the same step, or the
next older step. A copy written by another job (another model or data) at least as new as the
newest usable one stops the choice: resuming it would be wrong, and quietly training on from an
older state would lose the newer one without a word.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Listed:
    """One copy of a checkpoint as listed (its manifest and file sizes; nothing read yet)."""

    step: int
    holder: int  # who can read it: a rank of the job, or 0
    tier: int  # its place in the holder's order of preference on equal steps
    location: str
    usable: bool = True  # its manifest and sizes check out
    compatible: bool = True  # written by this job, as far as its manifest says


class Incompatible(Exception):
    """The newest copy was written by another job."""

    def __init__(self, listed: Listed):
        super().__init__(listed.location)
        self.listed = listed


def newest(listed: Iterable[Listed], excluded: Collection[tuple[int, str]] = ()) -> Listed | None:
    """The copy to load, None if there is none; ``excluded``: (holder, location) of copies that
    failed when read. Raises Incompatible (see the module docstring)."""
    candidates = [c for c in listed if c.usable and (c.holder, c.location) not in excluded]
    good = [c for c in candidates if c.compatible]
    step = max((c.step for c in good), default=-1)
    foreign = [c for c in candidates if not c.compatible and c.step >= step]
    if foreign:
        raise Incompatible(max(foreign, key=lambda c: c.step))
    at_step = [c for c in good if c.step == step]
    return min(at_step, key=lambda c: (c.holder, c.tier)) if at_step else None
