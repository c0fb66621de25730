"""A sharded TrainState (FSDP2) as the rows each rank holds, and back.

Every tensor a checkpoint splits by rows has a key: ``model/<name>`` for the model's, and
``optim/<parameter index>/<state name>`` for the optimizer's per-parameter tensors (AdamW's
moments). A DTensor sharded on dim 0 holds the rows its chunk names; a plain tensor (DDP, or
something FSDP left whole) is held whole - and saved by one rank only. What is not split (the
step counts, parameter groups, scheduler, sampler, RNG) is the ``skeleton`` of the train file.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from train.state import TrainState

Rows = tuple[int, int]


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``t`` (its shard, or ``t`` itself), outside autograd: a
    checkpoint reads and writes data (and to_local() through autograd costs ~15 us a tensor, on
    the step loop's path at every save)."""
    if not isinstance(t, DTensor):
        return t
    with torch.no_grad():
        return t.to_local()


def is_split(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def rows(t: torch.Tensor) -> Rows:
    """Which rows of the whole tensor ``t`` this rank holds."""
    if not isinstance(t, DTensor):
        return (0, t.shape[0] if t.dim() else 1)  # a 0-d tensor: one row
    chunks = t.__create_chunk_list__()
    if not chunks or not chunks[0].sizes[0]:
        return (0, 0)  # more ranks than rows: this one holds none
    start = int(chunks[0].offsets[0])
    return (start, start + int(chunks[0].sizes[0]))


def params(state: TrainState) -> list[torch.Tensor]:
    """The optimizer's parameters, in the order its state dict numbers them."""
    return [p for group in state.optimizer.param_groups for p in group["params"]]


def split(state: TrainState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """({key: the live tensor, DTensor or plain}, the optimizer's state dict without them). A 0-d
    model tensor (a BatchNorm's batch count) is one of them too: one row, held whole."""
    tensors = {f"model/{name}": t for name, t in state.model.state_dict().items()}
    optim = state.optimizer.state_dict()
    skeleton = {"param_groups": copy.deepcopy(optim["param_groups"]), "state": {}}
    for index, per_param in optim["state"].items():
        kept = {}
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                tensors[f"optim/{index}/{name}"] = value
                kept[name] = None  # the shards hold it
            else:
                kept[name] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        skeleton["state"][index] = kept
    return tensors, skeleton


def optim_targets(state: TrainState, skeleton: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{key: the parameter each split optimizer tensor of ``skeleton`` has the shape and
    placement of}; ValueError if the skeleton does not fit this optimizer."""
    ours = params(state)
    out = {}
    for index, per_param in skeleton.get("state", {}).items():
        if not (str(index).isdigit() and int(index) < len(ours) and isinstance(per_param, dict)):
            raise ValueError(f"optimizer state for parameter {str(index)[:20]} does not fit")
        for name, value in per_param.items():
            if value is None:
                out[f"optim/{index}/{name}"] = ours[int(index)]
    return out


def like(target: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """``held`` (this rank's rows, on the host) as a tensor placed like ``target``."""
    held = held.to(local(target).device)
    if isinstance(target, DTensor):
        return DTensor.from_local(
            held,
            target.device_mesh,
            target.placements,
            run_check=False,
            shape=target.shape,
            stride=target.stride(),
        )
    return held
