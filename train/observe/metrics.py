"""What a run reports: metrics.jsonl (rank 0; its rows: records.py), log lines carrying the
rank, and progress - a bar on a TTY, else a line every --log-interval steps - with loss,
throughput and the time left, counted from the step the attempt resumed at.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from train.observe import records
from train.observe.tensorboard import Scalars
from train.runtime import private

log = logging.getLogger("train")


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s.%(msecs)03d [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Metrics:
    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        max_steps: int,
        log_interval: int,
        batch: int = 0,
        tensorboard: bool = False,
    ):
        """``enabled``: this rank writes (rank 0); ``batch``: samples per step (for samples/s);
        ``tensorboard``: also write its scalars. Nothing is written before start()."""
        self.enabled, self.log_interval, self.max_steps, self.batch = enabled, log_interval, max_steps, batch
        self.run_dir, self.tensorboard = run_dir, enabled and tensorboard
        self.scalars = Scalars(run_dir, False, 0)
        self.file = None
        self.bar: tqdm | None = None
        self._write_failed = False
        self._since: tuple[int, float] | None = None  # (step, time) the rate is counted from

    def start(self, step: int, **fields: object) -> None:
        """The attempt trains from ``step`` on (0: a fresh run): its "start" row, and the views of
        the record that must know where it resumed (the progress bar, TensorBoard's purge)."""
        if self.enabled:
            self.file = os.fdopen(private.append_fd(records.path(self.run_dir)), "a")
            self.scalars = Scalars(self.run_dir, self.tensorboard, step)
            if sys.stderr.isatty():
                self.bar = tqdm(total=self.max_steps, initial=step, dynamic_ncols=True, unit="step")
        self.event("start", step=step, **fields)

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
        step = fields.get("step")
        if isinstance(step, int) and kind == "checkpoint":
            self.scalars.add(
                step, **{f"checkpoint__{fields.get('tier', 'durable')}_stall_s": fields["stall_s"]}
            )
        elif isinstance(step, int) and kind == "start":
            self.scalars.add(
                step, run__restart=fields.get("restart", 0), run__world_size=fields.get("world_size", 0)
            )

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
        now = time.monotonic()
        if self._since is None:  # the first step of an attempt (compile, warm-up): not in the rate
            self._since = (step, now)
        done, spent = step - self._since[0], now - self._since[1]
        rate = done / spent if done and spent > 0 else 0.0
        self.scalars.add(step, train__loss=loss, train__lr=lr, train__samples_per_s=rate * self.batch)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate * self.batch:.0f}")
        elif step % self.log_interval == 0:
            left = f", {_duration((self.max_steps - step) / rate)} left" if rate else ""
            log.info(
                "step %d/%d loss %.4f lr %.2e %.1f ms/step %.1f samples/s%s",
                step, self.max_steps, loss, lr, step_time * 1e3, rate * self.batch, left,
            )  # fmt: skip

    def val(self, step: int, loss: float) -> None:
        if self.enabled:
            self.event("val", step=step, val_loss=loss)
            self.scalars.add(step, val__loss=loss)
            log.info("step %d validation loss %.4f", step, loss)

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.scalars.close()
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
