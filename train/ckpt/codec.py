"""File formats: safetensors for everything, so loading a checkpoint never unpickles anything.

A flat {name: tensor} dict (the model) is stored as plain safetensors. Any other structure of
dicts, lists, tuples, tensors and JSON scalars (optimizer state, RNG states, scheduler) is stored as
safetensors too: its tensors under their path, its shape as JSON in the header's metadata. This is
also the fast path: safetensors loads at memory speed where torch.load's unpickler is several times
slower. ``*.pt`` files are still read (weights_only) and written for callers that ask for them.
"""

from __future__ import annotations

import io
import json
from typing import Any

import safetensors
import safetensors.torch
import torch

SKELETON = "ftjob.skeleton"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"t": path}
    if isinstance(obj, dict):
        return {"d": [[k, _flatten(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"l" if isinstance(obj, list) else "u": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '/'} in a checkpoint")


def _unflatten(node: dict, tensors: dict[str, torch.Tensor]) -> Any:
    ((kind, value),) = node.items()
    if kind == "t":
        return tensors[value]
    if kind == "d":
        return {k: _unflatten(v, tensors) for k, v in value}
    if kind in ("l", "u"):
        items = [_unflatten(v, tensors) for v in value]
        return items if kind == "l" else tuple(items)
    return value


def _is_flat(obj: Any) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def serialize(file: str, obj: Any) -> bytes:
    if file.endswith(".pt"):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    if _is_flat(obj):
        return safetensors.torch.save(obj)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, "", tensors)
    return safetensors.torch.save(tensors, metadata={SKELETON: json.dumps(skeleton)})


def deserialize(file: str, data: bytes) -> Any:
    if file.endswith(".pt"):
        # weights_only: a checkpoint is data, never code, even if someone else wrote it.
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    tensors = safetensors.torch.load(data)
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    if SKELETON not in metadata:
        return tensors
    return _unflatten(json.loads(metadata[SKELETON]), tensors)
