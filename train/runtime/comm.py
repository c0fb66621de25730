"""Small collectives on raw bytes and flags, the only ones the job adds to the model's own.

Bytes travel as uint8 tensors (no pickle on the wire); every helper is a no-op without a group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


Buffer = bytes | bytearray | memoryview


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


def mean(value: torch.Tensor) -> torch.Tensor:
    """Global mean of a per-rank scalar (a detached copy)."""
    value = value.detach().clone()
    if _active():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
