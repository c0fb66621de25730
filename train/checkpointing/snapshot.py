"""A TrainState in a job of many ranks: checkpoint files taken between steps, and put back.

What a plain state object must not know lives here: the RNG states of every rank (gathered by
a collective, so every rank calls take()), the staging buffers the tensors are copied into
(reused from one save to the next), and when that copy may run. The tensors change only inside
``optimizer.step()``, so the copy is deferred: it runs in the background, overlapping the next
forward/backward, and must finish before the next optimizer step (the Checkpointer waits for it
in a hook on the optimizer's step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from train import rng
from train.runtime import comm
from train.state import MODEL_FILE, OPTIM_FILE, TRAIN_FILE, Files, TrainState

log = logging.getLogger("train")
CPU = torch.device("cpu")


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


class RngStreams:
    """Every rank's RNG streams for the train file, gathered beside the step loop: the gather is
    started at the save (in the order of every rank's collectives) and waited for by the writer,
    so the step loop never waits for the slowest rank to reach the save."""

    def __init__(self) -> None:
        self.capacity: int | None = None

    def start(self, device: torch.device) -> Callable[[], list[dict]]:
        """Collective: every rank calls it at every save; the result, called on any thread, gives
        each rank's capture()d state (ValueError if one cannot be read)."""
        mine = rng.pack(rng.capture(device))
        if self.capacity is None:  # the first save: pack()'s size is fixed for a build and device
            self.capacity = max(int(b) for b in comm.all_gather_bytes(str(len(mine)).encode(), device))
        wait = comm.all_gather_later(mine, self.capacity, device)
        return lambda: [rng.unpack(b) for b in wait()]


class Snapshots:
    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.stager = Stager()
        self.rng = RngStreams()

    def take(self, device: torch.device, writes: bool) -> Callable[[], Files] | None:
        """Collective: every rank calls it; a rank that ``writes`` gets a deferred copy of the
        checkpoint's files, the others None. What is cheap and changes outside the optimizer
        (step, scheduler, sampler, RNG) is copied now, the tensors when the function is called."""
        rng_states = self.rng.start(device)
        if not writes:
            return None
        files = self.state.state_dict()
        small = copy.deepcopy(files[TRAIN_FILE])
        weights = files[MODEL_FILE]
        # Buffers (e.g. BatchNorm statistics) may change during the forward pass, not only in
        # optimizer.step(): copy those now. They are small.
        buffers = {name for name, _ in self.state.model.named_buffers()}
        now = self.stager.stage({k: v for k, v in weights.items() if k in buffers}, MODEL_FILE)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        later = {k: v for k, v in weights.items() if k not in buffers}
        tensors = {MODEL_FILE: later, OPTIM_FILE: files[OPTIM_FILE]}

        def copy_tensors() -> Files:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                staged = self.stager.stage(tensors)
            if stream is not None:
                stream.synchronize()
            # Keep the model's own key order: a plain state dict, as load_state_dict expects.
            model = {**staged[MODEL_FILE], **now}
            staged[MODEL_FILE] = {k: model[k] for k in weights}
            return {**staged, TRAIN_FILE: {**small, "rng": rng_states()}}

        return copy_tensors


def check(state: TrainState, files: Files) -> None:
    """ValueError unless decoded checkpoint files fit ``state`` and hold RNG states, without
    touching it: a checkpoint whose checksums pass may still have been written by something
    else, and a half-done restore of it could not be undone."""
    state.check(files)
    saved = files[TRAIN_FILE].get("rng")
    if not isinstance(saved, list) or not saved:
        raise ValueError(f"{TRAIN_FILE} holds no RNG state")
    for streams in saved:  # every rank's, so that every rank comes to the same verdict
        rng.check(streams)


def restore(state: TrainState, files: Files, rank: int, world_size: int, device: torch.device = CPU) -> None:
    """``state`` and this rank's RNG streams from decoded checkpoint files (see check())."""
    state.load_state_dict(files)
    saved = files[TRAIN_FILE]["rng"]
    # Same world size: each rank continues its own random streams. A different world size
    # cannot be bit-exact anyway; ranks then reuse saved streams round-robin.
    rng.restore(saved[rank % len(saved)], device)
    if len(saved) != world_size:
        log.warning(
            "checkpoint was written by %d ranks, now %d: resuming, but not bit-exact", len(saved), world_size
        )
