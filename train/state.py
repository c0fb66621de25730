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
        self._model_bytes: int | None = None

    def state_dict(self) -> Files:
        """The live state, not copies: the tensors are the model's and the optimizer's own."""
        return {
            MODEL_FILE: self.model.state_dict(),
            OPTIM_FILE: self.optimizer.state_dict(),
            TRAIN_FILE: self.train_state(),
        }

    def train_state(self) -> dict[str, Any]:
        """What the train file holds: the step, scheduler, sampler and grad scaler (live)."""
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
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
        if self._model_bytes is None:  # the model's tensors keep their sizes; its state_dict() is not free
            self._model_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        optim = [v for per_param in self.optimizer.state.values() for v in per_param.values()]
        tensors = [t for t in optim if isinstance(t, torch.Tensor)]
        return self._model_bytes + sum(t.numel() * t.element_size() for t in tensors)

    def targets(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors a checkpoint's files may be decoded straight into, per file: the model's own
        (a restore overwrites every one of them). Not the optimizer's: it may have no state yet."""
        return {MODEL_FILE: self.model.state_dict()}

    def device_for(self, file: str) -> torch.device:
        """Where a checkpoint file's tensors that have no target (targets()) are best decoded: the
        optimizer's on the parameters' device (load_state_dict moves them there anyway: decoded on
        the host, a GPU rank would hold the whole file there first), the rest (RNG states, which
        must be host tensors) on the host."""
        if file == OPTIM_FILE:
            return next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return torch.device("cpu")

    def check(self, objects: dict[str, Any]) -> None:
        """Raise ValueError unless decoded checkpoint files fit this state - every part that
        load_state_dict() will take, without touching anything: a checkpoint whose checksums pass
        may still have been written by something else, and a half-done restore of it could not be
        undone. IncompatibleCheckpointError if it fits but is another run's data (seed, dataset)."""
        weights, optim, train = objects[MODEL_FILE], objects[OPTIM_FILE], objects[TRAIN_FILE]
        mine = self.model.state_dict()
        if not isinstance(weights, dict) or weights.keys() != mine.keys():
            raise ValueError("the weights' names differ from this model's")
        for name, tensor in mine.items():
            _like(weights[name], tensor, f"weight {name}")
        self._check_optimizer(optim)
        if not isinstance(train, dict) or not {"step", "scheduler", "sampler"} <= train.keys():
            raise ValueError(f"{TRAIN_FILE} lacks step, scheduler or sampler state")
        if not _is_int(train["step"]) or train["step"] < 0:
            raise ValueError(f"{TRAIN_FILE}: step {str(train['step'])[:20]} is not a step")
        _like(train["scheduler"], self.scheduler.state_dict(), "the scheduler state")
        if self.scaler is not None and train.get("scaler") is not None:
            scaler = train["scaler"]
            if not (isinstance(scaler, dict) and all(isinstance(v, (int, float)) for v in scaler.values())):
                raise ValueError("the grad scaler state is not a map of numbers")
        self.sampler.check(train["sampler"])

    def _check_optimizer(self, optim: Any) -> None:
        if not isinstance(optim, dict) or not isinstance(optim.get("param_groups"), list):
            raise ValueError(f"{OPTIM_FILE} holds no optimizer state")
        ours = self.optimizer.state_dict()["param_groups"]
        if len(optim["param_groups"]) != len(ours):
            raise ValueError("the optimizer's parameter groups differ")
        for theirs, mine in zip(optim["param_groups"], ours, strict=True):
            _like(theirs, mine, "an optimizer parameter group")  # params: the same count of indices
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = optim.get("state", {})
        if not isinstance(state, dict):
            raise ValueError("the optimizer state is not a map")
        for index, per_param in state.items():
            if not (str(index).isdigit() and int(index) < len(params) and isinstance(per_param, dict)):
                raise ValueError(f"optimizer state for parameter {str(index)[:20]} does not fit")
            for key, value in per_param.items():
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    raise ValueError(
                        f"optimizer state {str(key)[:40]} of parameter {index} is not a float tensor"
                    )
                if value.dim() and value.shape != params[int(index)].shape:
                    raise ValueError(f"optimizer state {key} of parameter {index} has the wrong shape")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def fits(theirs: Any, mine: Any, what: str) -> None:
    """ValueError unless ``theirs`` (decoded from a checkpoint) has the structure of ``mine``."""
    _like(theirs, mine, what)


def _like(theirs: Any, mine: Any, what: str) -> None:
    """ValueError unless ``theirs`` has the structure of ``mine``: the same keys, lengths, kinds
    of scalar (a number for a number), tensor shapes and dtypes."""
    if isinstance(mine, torch.Tensor):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            got = (
                f"{tuple(theirs.shape)} {theirs.dtype}"
                if isinstance(theirs, torch.Tensor)
                else type(theirs).__name__
            )
            raise ValueError(f"{what} is {got}, this job's is {tuple(mine.shape)} {mine.dtype}")
    elif isinstance(mine, dict):
        if not isinstance(theirs, dict) or set(map(str, theirs)) != set(map(str, mine)):
            raise ValueError(f"{what} does not have this job's fields")
        by_name = {str(k): v for k, v in theirs.items()}
        for key, value in mine.items():
            _like(by_name[str(key)], value, f"{what} ({key})")
    elif isinstance(mine, (list, tuple)):
        if not isinstance(theirs, (list, tuple)) or len(theirs) != len(mine):
            raise ValueError(f"{what} does not have this job's length")
        for a, b in zip(theirs, mine, strict=True):
            _like(a, b, what)
    elif isinstance(mine, bool) or mine is None or isinstance(mine, str):
        if type(theirs) is not type(mine):
            raise ValueError(f"{what} is a {type(theirs).__name__}, this job's a {type(mine).__name__}")
    elif isinstance(mine, (int, float)) and (
        isinstance(theirs, bool) or not isinstance(theirs, (int, float))
    ):
        raise ValueError(f"{what} is a {type(theirs).__name__}, not a number")
