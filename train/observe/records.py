"""The run's own record, ``<run-dir>/metrics.jsonl``: one format, written by the job, read by resume,
the recovery report and its plot (report.py, plot.py) through this module.

Append-only across attempts and restarts; one JSON object per line, each with ``kind`` and ``time``:

- ``start``   an attempt began (rank 0): restart (torchrun's count, 0 again after a requeue),
              world_size, warm (forked from the zygote), step (where it resumes from; 0: fresh);
- ``resume``  what it resumed from: step, path, lost_steps, skipped (newer ones that did not verify);
- ``train``   one optimizer step: step, loss, lr, samples (the global cursor), world_size, restart,
              step_time;
- ``val``     step, val_loss;
- ``checkpoint`` a save handed to the writer: step, stall_s (what the loop paid), tier ("local" for
              the node-local tier);
- ``checkpoint_skipped`` / ``checkpoint_failed``: step, and why;
- ``end``     how an attempt ended, one row per rank that could say (a SIGKILLed rank cannot): code,
              class, cause, reason, secondary (it failed because another rank did), rank, restart.

After a resume the steps since the checkpoint appear again; for any step the last row written is
the one the final model went through. A line torn by a kill is skipped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from train.runtime import private

FILE = "metrics.jsonl"
LIMIT = 256 << 20  # ~1M rows; resume reads only the tail it needs (last_step)


def path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE


def read(run_dir: str | Path, limit: int = LIMIT) -> list[dict]:
    """Every row, in the order written, of the file's last ``limit`` bytes; torn, malformed or
    foreign lines skipped, whatever they hold. A symlink, FIFO or other non-regular file reads as
    no rows (a copied run dir, or one another user can write to, may hold anything)."""
    data = private.read_regular(path(run_dir), limit, tail=True)
    if data is None:
        return []
    lines = data.split(b"\n")
    if len(data) == limit:  # the first line may be cut
        lines = lines[1:]
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except Exception:  # not JSON, a 5000-digit number (ValueError), deep nesting (RecursionError)
            continue
        if _well_formed(row):
            rows.append(row)
    return rows


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _well_formed(row: object) -> bool:
    """A copied run dir may hold anything: readers rely on a kind, a time, and a train row's step."""
    if not (isinstance(row, dict) and isinstance(row.get("kind"), str) and _number(row.get("time"))):
        return False
    return row["kind"] != "train" or (isinstance(row.get("step"), int) and _number(row.get("loss")))


def append(run_dir: str | Path, kind: str, **fields: object) -> None:
    """One row from any process (the ending of a rank): one O_APPEND write, so rows of ranks that
    end at the same moment do not interleave."""
    line = (json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n").encode()
    fd = private.append_fd(path(run_dir))
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def last_step(rows: list[dict]) -> int:
    return max((int(r["step"]) for r in rows if r["kind"] == "train"), default=0)


@dataclass
class Attempt:
    """The rows from one ``start`` row to the next (rows before any start: an attempt of its own)."""

    start: dict | None
    rows: list[dict] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]

    @property
    def steps(self) -> list[dict]:
        return self.of("train")

    @property
    def ends(self) -> list[dict]:
        return self.of("end")


def attempts(rows: list[dict]) -> list[Attempt]:
    out: list[Attempt] = []
    for row in rows:
        if row["kind"] == "start":
            out.append(Attempt(row))
        elif not out:
            out.append(Attempt(None, [row]))
        else:
            out[-1].rows.append(row)
    return out
