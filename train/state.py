"""Everything a resumed run needs to continue bit-for-bit, as a plain object: ``state_dict()``
gives the checkpoint's files as objects, ``load_state_dict()`` takes them back.

Files: ``model.safetensors`` (plain {name: tensor}, unwrapped), ``optim.safetensors`` and
``train.safetensors`` (step, scheduler, sampler, grad scaler). This object knows nothing of
ranks, collectives or staging: train/checkpointing/snapshot.py adds every rank's RNG states and
copies the tensors off the training loop's path; train/checkpointing/resume.py decides who reads
which copy.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from train.errors import IncompatibleCheckpointError
from train.sampler import GlobalSampler

log = logging.getLogger("train")

MODEL_FILE, OPTIM_FILE, TRAIN_FILE = "model.safetensors", "optim.safetensors", "train.safetensors"
CKPT_FILES = frozenset({MODEL_FILE, OPTIM_FILE, TRAIN_FILE})  # exactly these, in every checkpoint
Files = dict[str, Any]  # a checkpoint's files as objects, by file name


class TrainState:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sampler: GlobalSampler,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.sampler, self.scaler = sampler, scaler
        self.step = 0  # optimizer steps completed; the next step to run is step + 1

    def state_dict(self) -> Files:
        """The live state, not copies: the tensors are the model's and the optimizer's own."""
        return {
            MODEL_FILE: self.model.state_dict(),
            OPTIM_FILE: self.optimizer.state_dict(),
            TRAIN_FILE: {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            },
        }

    def load_state_dict(self, files: Files) -> None:
        """From decoded checkpoint files (see check())."""
        try:
            self.model.load_state_dict(files[MODEL_FILE], strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise IncompatibleCheckpointError(
                f"checkpoint weights do not fit this model ({first}); "
                "resume with the model config it was written with, or use a new --run-dir"
            ) from None
        self.optimizer.load_state_dict(files[OPTIM_FILE])
        train = files[TRAIN_FILE]
        self.scheduler.load_state_dict(train["scheduler"])
        self.sampler.load_state_dict(train["sampler"])
        if self.scaler is not None and train["scaler"] is not None:
            self.scaler.load_state_dict(train["scaler"])
        self.step = int(train["step"])

    def nbytes(self) -> int:
        """Tensor bytes a checkpoint of this state holds (its files are ~0.1% larger)."""
        tensors = [*self.model.state_dict().values()]
        for per_param in self.optimizer.state.values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def targets(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors a checkpoint's files may be decoded straight into, per file: the model's own
        (a restore overwrites every one of them). Not the optimizer's: it may have no state yet."""
        return {MODEL_FILE: self.model.state_dict()}

    def check(self, objects: dict[str, Any]) -> None:
        """Raise ValueError unless decoded checkpoint files fit this state, without touching it:
        a checkpoint whose checksums pass may still have been written by something else, and a
        half-done restore of it could not be undone."""
        weights, optim, train = objects[MODEL_FILE], objects[OPTIM_FILE], objects[TRAIN_FILE]
        mine = self.model.state_dict()
        if not isinstance(optim, dict):
            raise ValueError(f"{OPTIM_FILE} holds no optimizer state")
        if not isinstance(weights, dict) or weights.keys() != mine.keys():
            raise ValueError("the weights' names differ from this model's")
        for name, tensor in mine.items():
            if weights[name].shape != tensor.shape or weights[name].dtype != tensor.dtype:
                raise ValueError(
                    f"weight {name} is {tuple(weights[name].shape)}, the model's is {tuple(tensor.shape)}"
                )
        groups = [len(g["params"]) for g in self.optimizer.param_groups]
        if (
            not isinstance(optim, dict)
            or [len(g.get("params", ())) for g in optim.get("param_groups", ())] != groups
        ):
            raise ValueError("the optimizer's parameter groups differ")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for index, per_param in optim.get("state", {}).items():
            for key, value in per_param.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim()
                    and value.shape != params[int(index)].shape
                ):
                    raise ValueError(f"optimizer state {key} of parameter {index} has the wrong shape")
        if not isinstance(train, dict) or not {"step", "scheduler", "sampler"} <= train.keys():
            raise ValueError(f"{TRAIN_FILE} lacks step, scheduler or sampler state")
