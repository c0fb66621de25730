"""Which samples a step uses: a pure function of (seed, global sample cursor, world size).

A single global cursor walks a seeded permutation per epoch. Each optimizer step takes the next
``global_batch_size`` positions and splits them across micro-batches and ranks. Because the cursor
counts samples rather than steps, the data position survives a change of world size too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.errors import ConfigError, IncompatibleCheckpointError


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch_size: int
    accum_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.accum_steps


def plan_batches(global_batch_size: int, world_size: int, micro_batch_size: int | None) -> BatchPlan:
    if global_batch_size % world_size:
        raise ConfigError(
            f"--global-batch-size {global_batch_size} is not divisible by world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    per_rank = global_batch_size // world_size
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"--micro-batch-size {micro} does not divide the per-rank batch {per_rank} "
            f"(= {global_batch_size} / {world_size} ranks); pick a divisor of {per_rank}"
        )
    return BatchPlan(world_size, micro, per_rank // micro)


class GlobalSampler:
    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ConfigError("the dataset has no samples; use more data or a shorter --data.seq-len")
        self.num_samples = num_samples
        self.seed = seed
        self.cursor = 0
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def sample_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        return int(self._permutation(epoch)[offset])

    def step_indices(self, plan: BatchPlan, rank: int) -> list[list[int]]:
        """This rank's micro-batches for the step starting at the current cursor."""
        micro, world = plan.micro_batch_size, plan.world_size
        return [
            [self.sample_at(self.cursor + m * world * micro + rank * micro + j) for j in range(micro)]
            for m in range(plan.accum_steps)
        ]

    def advance(self, plan: BatchPlan) -> None:
        self.cursor += plan.global_batch_size

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed, "num_samples": self.num_samples}

    def check(self, state: object) -> None:
        """ValueError unless ``state`` is a sampler state; IncompatibleCheckpointError if it is
        another dataset's or seed's (restarting will not help: resume with the same ones)."""
        fields = ("cursor", "seed", "num_samples")
        if not isinstance(state, dict) or not all(
            isinstance(state.get(k), int) and not isinstance(state.get(k), bool) for k in fields
        ):
            raise ValueError("the sampler state is not a cursor, a seed and a sample count")
        if state["cursor"] < 0:
            raise ValueError(f"the sampler cursor {state['cursor']} is negative")
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise IncompatibleCheckpointError(
                f"sampler state is for {state['num_samples']} samples / seed {state['seed']}, "
                f"this run has {self.num_samples} / {self.seed}; resume with the same data and --seed"
            )

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise IncompatibleCheckpointError(
                f"sampler state is for {state['num_samples']} samples / seed {state['seed']}, "
                f"this run has {self.num_samples} / {self.seed}; resume with the same data and --seed"
            )
        self.cursor = int(state["cursor"])
