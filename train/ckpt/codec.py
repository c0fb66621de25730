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
import math
from dataclasses import dataclass
from typing import Any

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


_SCALARS = (type(None), bool, int, float, str)


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    # The skeleton is read from the file: every node is checked, as it would be by a parser.
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"skeleton node {str(node)[:60]} is not a one-key object")
    ((kind, value),) = node.items()
    if kind == "t":
        if not isinstance(value, str) or value not in tensors:
            raise ValueError(f"skeleton refers to a tensor {str(value)[:60]!r} the file does not hold")
        return tensors[value]
    if kind == "d":
        if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], _SCALARS) for p in value
        ):
            raise ValueError("skeleton dict is not a list of [key, node] pairs")
        return {k: _unflatten(v, tensors) for k, v in value}
    if kind in ("l", "u"):
        if not isinstance(value, list):
            raise ValueError("skeleton list is not a list")
        items = [_unflatten(v, tensors) for v in value]
        return items if kind == "l" else tuple(items)
    if kind == "v" and isinstance(value, _SCALARS):
        return value
    raise ValueError(f"unknown skeleton node {str(kind)[:20]!r}")


def _is_flat(obj: Any) -> bool:
    return isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


Pieces = list[bytes | memoryview]  # a file as the parts written one after the other


def serialize(file: str, obj: Any) -> bytes:
    return b"".join(encode(file, obj))


def encode(file: str, obj: Any) -> Pieces:
    """The file's bytes as pieces: a small header, then views of each tensor's own memory - so
    writing a checkpoint never builds a second copy of the state in memory."""
    if file.endswith(".pt"):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return [buf.getvalue()]
    if _is_flat(obj):
        return _safetensors_pieces(obj, None)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, "", tensors)
    return _safetensors_pieces(tensors, {SKELETON: json.dumps(skeleton)})


def _safetensors_pieces(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Pieces:
    """The safetensors layout (what safetensors.torch.save writes, readable by it): an 8-byte
    header length, the JSON header padded to 8 bytes, the tensors' bytes back to back."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    views, offset = [], 0
    for name, tensor in tensors.items():
        flat = tensor.detach().reshape(-1)
        if flat.device.type != "cpu" or not flat.is_contiguous():
            flat = flat.contiguous().cpu()
        data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        views.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return [len(raw).to_bytes(8, "little") + raw, *views]


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
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


# Far below safetensors' own 100 MiB: a header is parsed as JSON before anything is checked, and
# parsing costs ~24x its size in memory. 16 MiB describes ~150k tensors.
_MAX_HEADER = 16 << 20
_MAX_DIM = 1 << 40  # no real tensor has a longer side; a zero-size shape must not make torch allocate


def _header(data: bytes | bytearray | memoryview, size: int) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, where the data section starts); ValueError unless well-formed."""
    if len(data) < 8 or size < 8:
        raise ValueError(f"{min(len(data), size)} bytes: too short for a safetensors header")
    header_len = header_length(data[:8], size)
    if len(data) < 8 + header_len:
        raise ValueError(f"{len(data)} bytes: the header needs {8 + header_len}")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (ValueError, RecursionError):
        raise ValueError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("header metadata is not a map of strings")
    return header, metadata, 8 + header_len


def header_length(first8: bytes | bytearray | memoryview, size: int) -> int:
    """The JSON header's length, from a file's first 8 bytes; ValueError if a file of ``size``
    bytes cannot hold it."""
    header_len = int.from_bytes(first8, "little")
    if header_len > _MAX_HEADER:
        raise ValueError(f"header length {header_len} is over the {_MAX_HEADER} bytes a header may have")
    if header_len > size - 8:
        raise ValueError(f"header length {header_len} does not fit in {size} bytes")
    return header_len


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_dim(x: object) -> bool:
    return _is_int(x) and 0 <= x <= _MAX_DIM


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: list[int]
    start: int  # offsets in the file (not in the data section)
    end: int


Buffer = bytes | bytearray | memoryview


def layout(head: Buffer, size: int | None = None) -> tuple[list[Entry], dict[str, str]]:
    """Where each tensor of a safetensors file lies, from the file's first bytes (at least its
    header; ``size``: the whole file's, default len(head)), in file order, and the header's
    metadata. As strict as safetensors itself: the tensors tile the data section exactly, in
    order, so none overlaps another or reads outside the file."""
    size = len(head) if size is None else size
    header, metadata, base = _header(head, size)
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name[:60]!r}: entry is not an object")
        dtype = _DTYPES.get(info["dtype"]) if isinstance(info.get("dtype"), str) else None
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise ValueError(f"tensor {name[:60]!r}: unknown dtype {str(info.get('dtype'))[:20]!r}")
        # Bounded like torch's own sizes, so that checking the product below stays cheap.
        if not (isinstance(shape, list) and len(shape) <= 64 and all(_is_dim(d) for d in shape)):
            raise ValueError(f"tensor {name[:60]!r}: shape is not a list of sizes")
        if math.prod(d for d in shape if d) > _MAX_DIM:  # also when a zero makes it empty
            raise ValueError(f"tensor {name[:60]!r}: shape {str(shape)[:60]} is out of range")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise ValueError(f"tensor {name[:60]!r}: data_offsets is not [start, end]")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort(key=lambda e: e[:2])
    at, data_size = 0, size - base
    for start, end, name, dtype, shape in entries:
        if start != at or end < start or end > data_size:
            raise ValueError(f"tensor {name[:60]!r}: data_offsets [{start}, {end}] out of order or range")
        if math.prod(shape) * dtype.itemsize != end - start:
            raise ValueError(
                f"tensor {name[:60]!r}: shape {str(shape)[:60]} does not take {end - start} bytes"
            )
        at = end
    if at != data_size:
        raise ValueError(f"tensors cover {at} of the {data_size} bytes of data")
    return [Entry(name, dtype, shape, base + a, base + b) for a, b, name, dtype, shape in entries], metadata


def _tensors_over(data: bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors blob as views of ``data``: no copy (it must be writable,
    since optimizer state loaded this way is updated in place)."""
    entries, metadata = layout(data)
    tensors = {}
    for e in entries:
        count = (e.end - e.start) // e.dtype.itemsize
        flat = (
            torch.frombuffer(data, dtype=e.dtype, count=count, offset=e.start)
            if count
            else torch.empty(0, dtype=e.dtype)
        )
        tensors[e.name] = flat.view(e.shape)
    return tensors, metadata


def assemble(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Any:
    """What a safetensors file's tensors and metadata stand for: the object it was encoded from."""
    if SKELETON not in metadata:
        return tensors
    return _unflatten(json.loads(metadata[SKELETON]), tensors)


def deserialize(file: str, data: bytes | bytearray | memoryview) -> Any:
    if file.endswith(".pt"):
        # weights_only: a checkpoint is data, never code, even if someone else wrote it.
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if isinstance(data, bytes):  # immutable: tensors over it could not be updated in place
        data = bytearray(data)
    return assemble(*_tensors_over(data))
