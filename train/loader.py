"""Batches prepared by DataLoader workers (``--data.workers N``), in exactly the order the global
sampler gives: a pure function of (seed, cursor), so resume stays bit-exact and every sample is
used once per epoch, whatever the workers had prefetched when a rank died.

The workers are handed the micro-batches' indices from the cursor the attempt resumed at, in step
order; the step loop takes ``accum_steps`` of them per step, as it would have built them itself.
Batches prefetched but not consumed are simply dropped with the workers: the cursor, saved in
each checkpoint, says where the next attempt starts. The workers' own random seeds come from a
generator of this loader's (seeded by seed and cursor), never from the training streams, which
therefore stay what they are without workers. Workers are children of the trainer: they end with
it (torch's worker loop exits once its parent is gone), also on a warm restart.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from train.sampler import BatchPlan, GlobalSampler
from train.task import Batch, stack


class _MicroBatches(Sampler[list[int]]):
    """This rank's micro-batch index lists, step after step, from ``sampler``'s cursor on."""

    def __init__(self, sampler: GlobalSampler, plan: BatchPlan, rank: int):
        self.sampler, self.plan, self.rank = copy.deepcopy(sampler), plan, rank

    def __iter__(self) -> Iterator[list[int]]:
        walk = copy.deepcopy(self.sampler)
        while True:
            yield from walk.step_indices(self.plan, self.rank)
            walk.advance(self.plan)

    def __len__(self) -> int:  # endless: the step loop decides when to stop
        return 2**62


class _Items(Dataset):
    def __init__(self, data):
        self.data = data

    def __getitem__(self, index: int):
        return self.data[index]

    def __len__(self) -> int:
        return len(self.data)


class Batches:
    """``next()``: the next micro-batch, on ``device``."""

    def __init__(
        self,
        data,
        sampler: GlobalSampler,
        plan: BatchPlan,
        rank: int,
        device: torch.device,
        workers: int,
        collate_fn: Callable[[list], Batch] | None = None,
    ):
        generator = torch.Generator().manual_seed(sampler.seed * 1_000_003 + sampler.cursor)
        self.device = device
        self.loader = DataLoader(
            _Items(data),
            batch_sampler=_MicroBatches(sampler, plan, rank),
            num_workers=workers,
            collate_fn=collate_fn or stack,
            pin_memory=device.type == "cuda",
            prefetch_factor=2,
            generator=generator,
            multiprocessing_context="fork",
        )
        self._it = iter(self.loader)

    def next(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=True) for t in next(self._it))

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers now (not whenever the iterator is collected)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()
