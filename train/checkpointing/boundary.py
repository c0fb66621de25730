"""What every rank must agree on at a step boundary, carried by the all-reduce the step does anyway.

No rank acts alone on anything another rank must also act on: a stop signal that reached one rank,
a save still running on a writing rank, a writer that gave up. Each rank says what it knows (an
Agreement of its own), the all-reduce sums them, and every rank reads the same sum back: a field
is true when it was true on any rank. The step's loss travels in the same tensor, so agreeing
costs no extra collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.runtime.dist import DistEnv


@dataclass(frozen=True)
class Agreement:
    stop: bool = False  # a stop signal reached some rank: save this step and exit 143
    saving: bool = False  # a durable save is still running on some writer
    saving_local: bool = False  # a node-local save is still running on some writer
    hung: bool = False  # a save has run longer than --ckpt.save-timeout-s
    disk_full: bool = False  # a writer gave up saving for lack of space (exit 6)
    storage_failed: bool = False  # a writer gave up saving for another reason (exit 147)

    def __or__(self, other: Agreement) -> Agreement:
        return Agreement(*(a or b for a, b in zip(_values(self), _values(other), strict=True)))

    @property
    def busy(self) -> bool:
        """A save of either tier is still running somewhere."""
        return self.saving or self.saving_local


def _values(agreement: Agreement) -> tuple[bool, ...]:
    return tuple(getattr(agreement, f.name) for f in dataclasses.fields(Agreement))


def agree(mine: Agreement, env: DistEnv, loss: torch.Tensor | None = None) -> tuple[float, Agreement]:
    """Collective: (the mean of every rank's ``loss``, or 0.0 without one; what the ranks agree on)."""
    flags = torch.tensor([float(v) for v in _values(mine)], dtype=torch.float32)
    local = torch.zeros((), device=env.device) if loss is None else loss.detach()
    summed = torch.cat([local.reshape(1).float(), flags.to(env.device)])
    if env.backend:
        dist.all_reduce(summed)
    loss_mean = float(summed[0] / env.world_size)
    return loss_mean, Agreement(*(v > 0 for v in summed[1:].tolist()))
