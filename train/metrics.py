"""What a run reports: metrics.jsonl (rank 0), log lines carrying the rank, a progress bar on a TTY.

metrics.jsonl is appended to across restarts. Each row has ``kind``: "train" (one per optimizer
step), "val", "checkpoint" (the step loop's stall for a save), or "resume". After a resume the
steps since the checkpoint appear again; for any step, the last row written is the one the final
model went through.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("train")


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s.%(msecs)03d [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int, log_interval: int):
        self.enabled, self.log_interval = enabled, log_interval
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self._write_failed = False
        interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True) if interactive else None

    def _write(self, row: dict) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk must not take the training down; checkpoints say so
            if not self._write_failed:
                log.warning("metrics.jsonl: row not written (%s); carrying on", e.strerror or e)
            self._write_failed = True

    def event(self, kind: str, **fields: object) -> None:
        self._write({"kind": kind, "time": time.time(), **fields})

    def train_step(
        self, step: int, loss: float, lr: float, samples: int, step_time: float, world_size: int, restart: int
    ) -> None:
        if not self.enabled:
            return
        self._write(
            {
                "kind": "train",
                "step": step,
                "loss": loss,
                "lr": lr,
                "samples": samples,
                "world_size": world_size,
                "restart": restart,
                "time": time.time(),
                "step_time": step_time,
            }
        )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif step % self.log_interval == 0:
            log.info("step %d loss %.4f lr %.2e %.1f ms/step", step, loss, lr, step_time * 1e3)

    def val(self, step: int, loss: float) -> None:
        if self.enabled:
            self.event("val", step=step, val_loss=loss)
            log.info("step %d validation loss %.4f", step, loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
