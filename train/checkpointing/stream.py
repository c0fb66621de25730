"""A file's bytes from one rank to a group of others, in chunks, decoded as they land.

Both sides cut a file of known size into the same fixed chunks. A Sender broadcasts each chunk as
soon as it has it: from a file read whole (the resume sends only what its reader verified), or
from a read still under way (``progress``), so that reading and sending overlap. A receiver cycles through a
few chunk buffers: each chunk that lands is handed on (to a train.ckpt.decoder, which copies
its bytes into the tensors that will hold them) and checksummed on a thread while the next
arrives. So receiving costs little more than the sender's read, and never holds a whole file.
Only the chunk travels on a GPU backend (one reusable CHUNK-sized device buffer).

A sender whose read fails half way still sends every chunk (zeros for what it does not have), so
the receivers' collectives line up; their checksum then fails, and the caller decides again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch
import torch.distributed as dist

from train.ckpt import manifest as mf

CHUNK = 16 << 20  # small enough to start sending early, big enough for gloo's full speed
WINDOW = 2  # chunks in flight on a CPU backend
RING = WINDOW + 2  # a receiver's host chunks: in flight, being checksummed, free


class _Chunks:
    def __init__(self, size: int, device: torch.device, src: int, group: dist.ProcessGroup):
        self.size, self.device, self.src, self.group = size, device, src, group
        self.done = 0  # bytes broadcast (sent, or handed to the backend)
        self._flying: deque = deque()
        self._staging = (
            torch.empty(min(CHUNK, size), dtype=torch.uint8, device=device) if device.type != "cpu" else None
        )

    def _broadcast(self, view: np.ndarray, sending: bool, then: Callable[[], object] | None = None) -> None:
        host = torch.from_numpy(view)
        if self._staging is None:  # gloo: in place, a few chunks in flight
            self._flying.append((dist.broadcast(host, self.src, group=self.group, async_op=True), then))
            while len(self._flying) > WINDOW:
                self._land()
        else:
            chunk = self._staging[: host.numel()]
            if sending:
                chunk.copy_(host)
            dist.broadcast(chunk, self.src, group=self.group)
            if not sending:
                host.copy_(chunk)
            if then is not None:
                then()
        self.done += len(view)

    def _land(self) -> None:
        work, then = self._flying.popleft()
        work.wait()
        if then is not None:
            then()

    def drain(self) -> None:
        while self._flying:
            self._land()


class Sender(_Chunks):
    """Feed it the file's pieces in order (``progress``), then ``finish`` with the whole file."""

    def __init__(self, size: int, device: torch.device, src: int, group: dist.ProcessGroup):
        super().__init__(size, device, src, group)
        self._read = 0
        self._parent: np.ndarray | None = None

    def progress(self, piece: memoryview) -> None:
        """A piece of the file, read into the buffer the whole file is read into (piece.obj)."""
        self._read += len(piece)
        parent = piece.obj if isinstance(piece.obj, np.ndarray) else None
        if parent is None or parent.ndim != 1 or parent.nbytes < self.size:
            return  # not a view of the file's buffer: everything goes at finish()
        self._parent = parent
        # Never past the size the receivers expect (a file that changed since it was listed).
        while self.done + CHUNK <= min(self._read, self.size):
            self._broadcast(parent[self.done : self.done + CHUNK], sending=True)

    def finish(self, data: bytes | memoryview | None) -> None:
        """Send the rest: from ``data`` (the file as read), or zeros where the read failed."""
        whole = np.frombuffer(data, dtype=np.uint8) if data is not None and len(data) == self.size else None
        if whole is None and self._parent is not None:
            whole = self._parent[: min(self._read, self.size)]
        zeros = None
        while self.done < self.size:
            end = min(self.done + CHUNK, self.size)
            if whole is not None and end <= len(whole):
                self._broadcast(whole[self.done : end], sending=True)
            else:
                zeros = zeros if zeros is not None else np.zeros(CHUNK, dtype=np.uint8)
                self._broadcast(zeros[: end - self.done], sending=True)
        self.drain()


def receive(
    size: int,
    device: torch.device,
    src: int,
    group: dist.ProcessGroup,
    on_chunk: Callable[[torch.Tensor], object],
) -> str:
    """The sender's file of ``size`` bytes, chunk by chunk: each handed in order to ``on_chunk``
    once it landed (a host uint8 tensor, reused after the call: copy out what is kept), and
    checksummed on a thread meanwhile. Returns the file's checksum (xxh3_64, as in a manifest).
    Memory: RING chunks, whatever the size."""
    count = -(-size // CHUNK)
    ring = [np.empty(min(CHUNK, size), dtype=np.uint8) for _ in range(min(RING, count))]
    hashed: list[Future | None] = [None] * len(ring)
    hashing = mf.BackgroundChecksum()
    chunks = _Chunks(size, device, src, group)
    for index, start in enumerate(range(0, size, CHUNK)):
        slot = index % len(ring)
        if hashed[slot] is not None:  # its previous chunk was handed on; wait until it is hashed
            hashed[slot].result()
        view = ring[slot][: min(CHUNK, size - start)]

        def landed(view: np.ndarray = view, slot: int = slot) -> None:
            hashed[slot] = hashing.feed(memoryview(view))
            on_chunk(torch.from_numpy(view))

        chunks._broadcast(view, sending=False, then=landed)
    chunks.drain()
    return hashing.digest()


class Forward:
    """Hands on each chunk as it lands here (``send``) to a group whose other members take the
    same file with receive(): a receiving node leader passing the file on to its node's ranks."""

    def __init__(self, device: torch.device, src: int, group: dist.ProcessGroup):
        self.device, self.src, self.group = device, src, group
        self._staging = torch.empty(CHUNK, dtype=torch.uint8, device=device) if device.type != "cpu" else None

    def send(self, chunk: torch.Tensor) -> None:
        if self._staging is None:
            dist.broadcast(chunk, self.src, group=self.group)
            return
        staged = self._staging[: chunk.numel()]
        staged.copy_(chunk)
        dist.broadcast(staged, self.src, group=self.group)


class Relay:
    """Sends a checkpoint's files, in ``sizes``' order, while a reader reads them in that order:
    hand it each piece read (``piece``), then ``finish`` with whatever the read produced."""

    def __init__(self, sizes: dict[str, int], device: torch.device, src: int, group: dist.ProcessGroup):
        self._senders = [(f, Sender(size, device, src, group)) for f, size in sizes.items()]
        self._current = 0

    def piece(self, file: str, piece: memoryview) -> None:
        names = [f for f, _ in self._senders]
        if file not in names[self._current :]:
            raise ValueError(f"{file} read out of the manifest's order")
        while names[self._current] != file:  # the previous file is read in full: send its tail
            self._senders[self._current][1].finish(None)
            self._current += 1
        self._senders[self._current][1].progress(piece)

    def finish(self, files: dict) -> None:
        for f, sender in self._senders[self._current :]:
            sender.finish(files.get(f))
        self._current = len(self._senders)
