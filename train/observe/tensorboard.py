"""TensorBoard scalars (``--log.tensorboard true``, rank 0): loss, lr, throughput, checkpoint
stalls, restarts. metrics.jsonl stays the record; this is a view of it for TensorBoard users.

A resumed attempt re-runs the steps after its checkpoint. Its writer starts with a purge step (the
first step it will log again), so TensorBoard drops what the failed attempt logged from there on:
one line per scalar, no zig-zag back in time."""

from __future__ import annotations

from pathlib import Path


class Scalars:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # the tensorboard extra

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def add(self, step: int, **scalars: float) -> None:
        """``tag=value`` pairs; ``__`` in a name becomes ``/`` (train__loss -> train/loss)."""
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag.replace("__", "/"), value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
