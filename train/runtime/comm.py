"""Small collectives on raw bytes and flags, the only ones the job adds to the model's own.

Bytes travel as uint8 tensors (no pickle on the wire); every helper is a no-op without a group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


Buffer = bytes | bytearray | memoryview
_LENGTH = 8  # all_gather_later's frame: each rank's length, then its data padded to the capacity


def _as_tensor(data: Buffer, device: torch.device) -> torch.Tensor:
    if not len(data):  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8, device=device)
    writable = bytearray(data) if isinstance(data, bytes) else data
    return torch.frombuffer(writable, dtype=torch.uint8).to(device)


def all_gather_bytes(data: bytes, device: torch.device) -> list[bytes]:
    if not _active():
        return [data]
    world = dist.get_world_size()
    length = torch.tensor([len(data)], dtype=torch.long, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    size = int(max(t.item() for t in lengths))
    mine = torch.zeros(size, dtype=torch.uint8, device=device)
    mine[: len(data)] = _as_tensor(data, device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [bytes(p[: int(n.item())].cpu().numpy()) for p, n in zip(parts, lengths, strict=True)]


def all_gather_later(data: bytes, capacity: int, device: torch.device) -> Callable[[], list[bytes]]:
    """Start gathering every rank's ``data`` (all ranks give the same ``capacity``, at least its
    length) and return what waits for it: the gather runs in the order of this rank's collectives,
    its wait may come later and on another thread. Data longer than ``capacity`` arrives as b"",
    which its reader must refuse (the collective itself cannot fail on one rank alone)."""
    if not _active():
        return lambda: [data]
    length = len(data) if len(data) <= capacity else -1
    framed = bytearray(_LENGTH + capacity)
    framed[:_LENGTH] = length.to_bytes(_LENGTH, "little", signed=True)
    if length >= 0:
        framed[_LENGTH : _LENGTH + length] = data
    mine = _as_tensor(framed, device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    work = dist.all_gather(parts, mine, async_op=True)

    def wait() -> list[bytes]:
        work.wait()
        out = []
        for part in parts:
            raw = part.cpu().numpy().tobytes()
            n = int.from_bytes(raw[:_LENGTH], "little", signed=True)
            out.append(raw[_LENGTH : _LENGTH + n] if n >= 0 else b"")
        return out

    return wait


def mean(value: torch.Tensor) -> torch.Tensor:
    """Global mean of a per-rank scalar (a detached copy)."""
    value = value.detach().clone()
    if _active():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
