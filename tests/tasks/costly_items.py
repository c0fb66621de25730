"""A task whose samples cost CPU time to prepare (make bench: the DataLoader workers row).

``--task tests.tasks.costly_items:build``: each item is computed on access - a few milliseconds of
arithmetic, as decoding, augmenting or tokenising would cost - from its index alone (no RNG), so
the data is the same in any process. A map-style dataset with its own collate function: the shape
a bring-your-own task hands over.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config
from train.task import Task

FEATURES = 64
SAMPLES = 4096
WORK = 60000  # Python-level operations per item: ~7 ms on this machine (an image decode, say)


class CostlyItems:
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[list[float], float]:
        acc, values = 0.0, []
        for k in range(WORK):  # pure Python: holds the GIL, as real preprocessing often does
            acc = math.sin(acc + index * 1e-3 + k * 1e-4)
            if k % (WORK // FEATURES) == 0 and len(values) < FEATURES:
                values.append(acc)
        return values, math.tanh(sum(values))


def collate(items: list[tuple[list[float], float]]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([v for v, _ in items], dtype=torch.float32)
    y = torch.tensor([[t] for _, t in items], dtype=torch.float32)
    return x, y


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def build(cfg: Config) -> Task:
    model = nn.Sequential(nn.Linear(FEATURES, 256), nn.Tanh(), nn.Linear(256, 1))
    return Task(model=model, train_data=CostlyItems(), loss_fn=mse_loss, collate_fn=collate)
