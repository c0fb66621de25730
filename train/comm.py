"""Small collectives on raw bytes and flags, the only ones the job adds to the model's own.

Bytes travel as uint8 tensors (no pickle on the wire); every helper is a no-op without a group.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from train.ckpt.buffers import host_buffer


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


Buffer = bytes | bytearray | memoryview


def _as_tensor(data: Buffer, device: torch.device) -> torch.Tensor:
    if not len(data):  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8, device=device)
    writable = bytearray(data) if isinstance(data, bytes) else data
    return torch.frombuffer(writable, dtype=torch.uint8).to(device)


CHUNK = (
    64 << 20
)  # bytes per broadcast: bounds the device memory a transfer takes (a whole file on a GPU would not)


def broadcast_bytes(
    data: Buffer | None, device: torch.device, src: int = 0, group: dist.ProcessGroup | None = None
) -> Buffer:
    """``src``'s bytes on every rank. A receiver gets them in host memory that the transfer writes
    straight into (gloo: no second copy; nccl: through one reusable CHUNK-sized device buffer), as a
    writable memoryview, so tensors loaded from it can be views of it. ``src`` is a global rank,
    also within ``group``."""
    if not _active():
        assert data is not None
        return data
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(length, src, group=group)
    size, sending = int(length.item()), dist.get_rank() == src
    if sending:
        host = np.frombuffer(bytearray(data) if isinstance(data, bytes) else data, dtype=np.uint8)  # type: ignore[arg-type]
    else:
        host = host_buffer(size)
    staging = (
        torch.empty(min(CHUNK, size), dtype=torch.uint8, device=device) if device.type != "cpu" else None
    )
    for start in range(0, size, CHUNK):
        piece = torch.from_numpy(host[start : start + CHUNK])
        if staging is None:
            dist.broadcast(piece, src, group=group)  # in place: straight into (or out of) the host buffer
            continue
        chunk = staging[: piece.numel()]
        if sending:
            chunk.copy_(piece)
        dist.broadcast(chunk, src, group=group)
        if not sending:
            piece.copy_(chunk)
    return data if sending else memoryview(host)  # type: ignore[return-value]


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
