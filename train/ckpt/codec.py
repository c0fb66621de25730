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


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _tensors_over(data: bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors blob as views of ``data``: no copy (it must be writable,
    since optimizer state loaded this way is updated in place)."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = (end - start) // dtype.itemsize
        flat = (
            torch.frombuffer(data, dtype=dtype, count=count, offset=base + start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.view(info["shape"])
    return tensors, metadata


def deserialize(file: str, data: bytes | bytearray | memoryview) -> Any:
    if file.endswith(".pt"):
        # weights_only: a checkpoint is data, never code, even if someone else wrote it.
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if isinstance(data, bytes):  # immutable: tensors over it could not be updated in place
        data = bytearray(data)
    tensors, metadata = _tensors_over(data)
    if SKELETON not in metadata:
        return tensors
    return _unflatten(json.loads(metadata[SKELETON]), tensors)
