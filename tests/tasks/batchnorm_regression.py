"""tiny_regression's task with a BatchNorm between its layers: buffers the forward changes (running
statistics) and a 0-d one (the batch count), which a checkpoint must keep exactly. No ModuleList:
under --parallel.mode fsdp the whole model is one FSDP unit, its buffers left whole."""

from __future__ import annotations

from torch import nn

from tests.tasks import tiny_regression
from train.config import Config
from train.task import Task


def build(cfg: Config) -> Task:
    task = tiny_regression.build(cfg)
    hidden = tiny_regression.HIDDEN
    task.model = nn.Sequential(
        nn.Linear(tiny_regression.IN_FEATURES, hidden),
        nn.BatchNorm1d(hidden),
        nn.Tanh(),
        nn.Linear(hidden, 1),
    )
    return task
