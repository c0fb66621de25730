"""A file's bytes from one rank to a group of others, in chunks, decoded as they land.

Both sides cut a file of known size into the same fixed chunks. A Sender broadcasts each chunk
built from the tensors its rank decoded the file into (the resume sends only what its reader
verified and kept), a few chunks in flight: the sender never holds the file whole either. A
receiver cycles through a few chunk buffers: each chunk that lands is handed on (to a
train.ckpt.decoder, which copies its bytes into the tensors that will hold them) and checksummed
on a thread while the next arrives. So receiving costs little more than the wire, and never holds
a whole file. Only the chunk travels on a GPU backend (one reusable CHUNK-sized device buffer).

A sender that cannot build a chunk still sends every chunk (zeros for what it does not have), so
the receivers' collectives line up; their checksum then fails, and the caller decides again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from train.ckpt import manifest as mf

log = logging.getLogger(__name__)
CHUNK = 16 << 20  # small enough to start sending early, big enough for gloo's full speed
WINDOW = 2  # chunks in flight on a CPU backend
RING = WINDOW + 2  # host chunks a side: in flight, being checksummed or built, free


class _Chunks:
    def __init__(
        self,
        size: int,
        device: torch.device,
        src: int,
        group: dist.ProcessGroup,
        staging: torch.Tensor | None = None,
    ):
        """``staging``: a device buffer of at least min(CHUNK, size) bytes to use (on a GPU backend;
        else one is made)."""
        self.size, self.device, self.src, self.group = size, device, src, group
        self.done = 0  # bytes broadcast (sent, or handed to the backend)
        self._flying: deque = deque()
        if device.type != "cpu" and staging is None:
            staging = torch.empty(min(CHUNK, size), dtype=torch.uint8, device=device)
        self._staging = staging if device.type != "cpu" else None

    def _broadcast(self, view: np.ndarray, then: Callable[[], object] | None = None) -> None:
        """``view`` from the source to the group: on gloo in place, a few chunks in flight (a
        Sender's and a receiver's); on a GPU backend received through the device chunk (a Sender
        there broadcasts its device chunk itself)."""
        host = torch.from_numpy(view)
        if self._staging is None:
            self._flying.append((dist.broadcast(host, self.src, group=self.group, async_op=True), then))
            while len(self._flying) > WINDOW:
                self._land()
        else:
            chunk = self._staging[: host.numel()]
            dist.broadcast(chunk, self.src, group=self.group)
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


class Image(Protocol):
    """A file this rank decoded, able to give back any of its bytes (train.ckpt.decoder.Decoder)."""

    @property
    def on_host(self) -> bool: ...

    def copy_out(self, at: int, into: torch.Tensor) -> None: ...


class _Ring:
    """RING host chunks, made on first use and reused for every file (pinned for a GPU's copies)."""

    def __init__(self, nbytes: int, pinned: bool):
        self.nbytes, self.pinned = nbytes, pinned
        self.chunks: list[torch.Tensor] = []

    def get(self, index: int, n: int) -> torch.Tensor:
        if not self.chunks:
            self.chunks = [
                torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(RING)
            ]
        return self.chunks[index % RING][:n]


class Sender(_Chunks):
    """Sends one file, every chunk built from where this rank decoded it (``Image.copy_out``): from
    the tensors that keep its bytes, so that no copy of it is ever whole in memory here. On a GPU
    backend a file the rank holds on the GPU is built straight into the device chunk (nothing of it
    on the host), one it holds on the host in a pinned host chunk copied over once."""

    def send(self, image: Image | None, ring: _Ring) -> None:
        on_device = self._staging is not None and image is not None and not image.on_host
        index, failed = 0, False
        while self.done < self.size:
            n = min(CHUNK, self.size - self.done)
            # A host chunk is refilled only once its broadcast landed (WINDOW < RING), or once its
            # copy to the device returned (a copy from pinned memory without non_blocking waits).
            chunk = self._staging[:n] if on_device and self._staging is not None else ring.get(index, n)
            try:
                if image is None:
                    raise ValueError("this rank holds no decoded copy of it")
                image.copy_out(self.done, chunk)
            except Exception as e:  # never leave the receivers waiting: zeros, their checksum refuses them
                if not failed:
                    why = f"{type(e).__name__}: {e}"
                    log.warning("could not send a checkpoint file from byte %d: %s", self.done, why)
                failed = True
                chunk.zero_()
            if self._staging is None:
                self._broadcast(chunk.numpy())
            else:
                staged = self._staging[:n]
                if not on_device:
                    staged.copy_(chunk)
                dist.broadcast(staged, self.src, group=self.group)
                self.done += n
            index += 1
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

        chunks._broadcast(view, then=landed)
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


def send_files(
    images: dict[str, Image], sizes: dict[str, int], device: torch.device, src: int, group: dist.ProcessGroup
) -> None:
    """A checkpoint's files, in ``sizes``' order (the receivers take them so), from this rank's
    decoded copy of each; one device chunk and one ring of host chunks for them all."""
    largest = min(CHUNK, max(sizes.values(), default=0))
    ring = _Ring(largest, pinned=device.type == "cuda")
    staging = torch.empty(largest, dtype=torch.uint8, device=device) if device.type != "cpu" else None
    for file, size in sizes.items():
        Sender(size, device, src, group, staging).send(images.get(file), ring)
