"""A second task for the bring-your-own-model API: a small MLP regressing a fixed random function.

``--task tests.tasks.tiny_regression:build`` (run from the repository root, or with it on
PYTHONPATH). The data comes from a generator seeded by ``cfg.seed`` so every rank builds the same
samples; the model's initial weights come from torch's global RNG, which the job seeds identically
on every rank before calling ``build``. There is no ``sample_fn``: nothing is printed at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import Config
from train.task import Batch, Task

IN_FEATURES = 8
HIDDEN = 32
TRAIN_SAMPLES = 512
VAL_SAMPLES = 128
NOISE = 0.05


def _make_data(gen: torch.Generator, n: int, weight: torch.Tensor) -> list[Batch]:
    x = torch.randn(n, IN_FEATURES, generator=gen)
    y = torch.tanh(x @ weight) + NOISE * torch.randn(n, 1, generator=gen)
    return [(x[i], y[i]) for i in range(n)]


def mse_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def build(cfg: Config) -> Task:
    gen = torch.Generator().manual_seed(cfg.seed)
    weight = torch.randn(IN_FEATURES, 1, generator=gen)
    train_data = _make_data(gen, TRAIN_SAMPLES, weight)
    val_data = _make_data(gen, VAL_SAMPLES, weight)
    model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    return Task(model=model, train_data=train_data, loss_fn=mse_loss, val_data=val_data)
