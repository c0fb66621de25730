"""Everything a resumed run needs to continue bit-for-bit, as checkpoint files and back.

Files: ``model.safetensors`` (plain {name: tensor}, unwrapped), ``optim.safetensors`` and
``train.safetensors`` (step, scheduler, sampler, grad scaler, and the RNG states of every rank).
Which rank reads which copy, and who receives one, is train/resume.py's business: this object
only turns state into files and decoded files back into state.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from train import comm, rng
from train.ckpt.codec import deserialize
from train.errors import IncompatibleCheckpointError
from train.sampler import GlobalSampler

log = logging.getLogger("train")
CPU = torch.device("cpu")

MODEL_FILE, OPTIM_FILE, TRAIN_FILE = "model.safetensors", "optim.safetensors", "train.safetensors"
CKPT_FILES = frozenset({MODEL_FILE, OPTIM_FILE, TRAIN_FILE})  # exactly these, in every checkpoint


class Stager:
    """Copies nested state into reusable host buffers (pinned when the source is on CUDA)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def stage(self, obj: Any, path: str = "") -> Any:
        if isinstance(obj, torch.Tensor):
            buf = self.buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                self.buffers[path] = buf
            return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        if isinstance(obj, dict):
            return {k: self.stage(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.stage(v, f"{path}/{i}") for i, v in enumerate(obj))
        return obj


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


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
        self.stager = Stager()

    def nbytes(self) -> int:
        """Tensor bytes a checkpoint of this state holds (its files are ~0.1% larger)."""
        tensors = [*self.model.state_dict().values()]
        for per_param in self.optimizer.state.values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def snapshot(self, device: torch.device, writes: bool) -> Callable[[], dict[str, Any]] | None:
        """Collective: every rank calls it; a rank that ``writes`` gets a deferred copy, the others None.

        What is cheap and mutable outside the optimizer (step, scheduler, sampler, RNG) is captured
        now. The tensors (weights, optimizer moments) change only inside ``optimizer.step()``, so
        the returned function may copy them later - in the background, overlapping the next
        forward/backward - as long as it finishes before the next optimizer step.
        """
        rng_states = comm.all_gather_bytes(_to_bytes(rng.capture(device)), device)
        if not writes:
            return None
        small = copy.deepcopy(
            {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            }
        )
        small["rng"] = [torch.load(io.BytesIO(b), weights_only=True) for b in rng_states]
        weights = self.model.state_dict()
        # Buffers (e.g. BatchNorm statistics) may change during the forward pass, not only in
        # optimizer.step(): copy those now. They are small.
        buffers = {name for name, _ in self.model.named_buffers()}
        now = self.stager.stage({k: v for k, v in weights.items() if k in buffers}, MODEL_FILE)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        later = {k: v for k, v in weights.items() if k not in buffers}
        tensors = {MODEL_FILE: later, OPTIM_FILE: self.optimizer.state_dict()}

        def copy_tensors() -> dict[str, Any]:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                files = self.stager.stage(tensors)
            if stream is not None:
                stream.synchronize()
            # Keep the model's own key order: a plain state dict, as load_state_dict expects.
            model = {**files[MODEL_FILE], **now}
            files[MODEL_FILE] = {k: model[k] for k in weights}
            return {**files, TRAIN_FILE: small}

        return copy_tensors

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
        if not isinstance(train, dict) or not {"step", "scheduler", "sampler", "rng"} <= train.keys():
            raise ValueError(f"{TRAIN_FILE} lacks step, scheduler, sampler or rng state")
        if not train["rng"]:
            raise ValueError(f"{TRAIN_FILE} holds no RNG state")

    def targets(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors a checkpoint's files may be decoded straight into, per file: the model's own
        (a restore overwrites every one of them). Not the optimizer's: it may have no state yet."""
        return {MODEL_FILE: self.model.state_dict()}

    def restore(
        self, blobs: dict[str, bytes | memoryview], rank: int, world_size: int, device: torch.device = CPU
    ) -> None:
        self.load({file: deserialize(file, data) for file, data in blobs.items()}, rank, world_size, device)

    def load(self, objects: dict[str, Any], rank: int, world_size: int, device: torch.device = CPU) -> None:
        """Restore from the decoded checkpoint files (see check())."""
        weights = objects[MODEL_FILE]
        try:
            self.model.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise IncompatibleCheckpointError(
                f"checkpoint weights do not fit this model ({first}); "
                "resume with the model config it was written with, or use a new --run-dir"
            ) from None
        self.optimizer.load_state_dict(objects[OPTIM_FILE])
        train = objects[TRAIN_FILE]
        self.scheduler.load_state_dict(train["scheduler"])
        self.sampler.load_state_dict(train["sampler"])
        if self.scaler is not None and train["scaler"] is not None:
            self.scaler.load_state_dict(train["scaler"])
        self.step = int(train["step"])
        # Same world size: each rank continues its own random streams. A different world size
        # cannot be bit-exact anyway; ranks then reuse saved streams round-robin.
        rng.restore(train["rng"][rank % len(train["rng"])], device)
        if len(train["rng"]) != world_size:
            log.warning(
                "checkpoint was written by %d ranks, now %d: resuming, but not bit-exact",
                len(train["rng"]),
                world_size,
            )
