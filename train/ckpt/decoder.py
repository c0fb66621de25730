"""A checkpoint file deserialised while its bytes arrive, so that it never exists whole in memory.

Fed a safetensors file in order, piece by piece (from the network, say), a ``Decoder`` parses the
header as soon as it is complete and then copies each tensor's bytes straight to where the tensor
will live: into the caller's own tensor of that name, dtype and shape (the model's parameters,
which a restore overwrites anyway; on any device), or else into one fresh host block that holds
the rest. Memory: the header and that block, never a second copy of the file. Given a ``device``
(a GPU), the rest is made there instead - every tensor but 0-d ones (an optimizer's step counts,
which stay on the host) - so that the host holds only the pieces in flight, not a whole file a
rank (the optimizer's moments are two thirds of a checkpoint).

Bytes land before anything can check them: the file's checksum is known only once the last piece
has arrived. A caller that gives targets must be ready to overwrite them again if the file then
fails to verify. A malformed file never raises from ``feed`` (the sender goes on sending, and the
caller's pieces must keep arriving); ``result`` raises ValueError with the reason.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from train.ckpt.codec import Entry, assemble, deserialize, header_length, layout

_ALIGN = 64  # each fresh tensor starts on a cache line, whatever its offset in the file


class Decoder:
    def __init__(
        self,
        file: str,
        size: int,
        targets: Mapping[str, torch.Tensor] | None = None,
        device: torch.device | None = None,
    ):
        self.file, self.size = file, size
        self._targets = targets or {}
        self._device = device if device is not None and device.type != "cpu" else None
        self._whole = None if file.endswith(".safetensors") else np.empty(size, np.uint8)
        self._head = bytearray()
        self._fed = 0
        self._places: list[tuple[int, int, torch.Tensor]] | None = None  # (start, end, bytes) in file order
        self._next = 0
        self._tensors: dict[str, torch.Tensor] = {}
        self._metadata: dict[str, str] = {}
        self._error = ""

    def feed(self, piece: torch.Tensor) -> None:
        """The file's next bytes (a 1-D uint8 tensor on any device; not kept after the call)."""
        at = self._fed
        self._fed += piece.numel()
        if self._error or self._fed > self.size:
            self._error = self._error or f"more than the {self.size} bytes announced"
            return
        if self._whole is not None:  # not safetensors (a .pt file): kept whole, decoded at the end
            self._whole[at : self._fed] = piece.cpu().numpy()
            return
        try:
            if self._places is None:
                used = self._take_header(piece)
                piece, at = piece[used:], at + used
            if self._places is not None:
                self._place(piece, at)
        except ValueError as e:
            self._error = str(e)

    def result(self) -> Any:
        """The file's object (its tensors are the targets it used, and views of the fresh block)."""
        if not self._error and self._fed != self.size:
            self._error = f"{self._fed} of {self.size} bytes arrived"
        if self._error:
            raise ValueError(self._error)
        if self._whole is not None:
            return deserialize(self.file, self._whole)
        if self._places is None:
            raise ValueError("the header never completed")
        return assemble(self._tensors, self._metadata)

    @property
    def on_host(self) -> bool:
        """Every byte copy_out() gives back is in host memory (none in a device's tensors)."""
        return all(held.device.type == "cpu" for _, _, held in self._places or [])

    def copy_out(self, at: int, into: torch.Tensor) -> None:
        """The file's bytes from offset ``at`` into ``into`` (1-D uint8, any device), taken from
        where they were decoded to - the header kept here, the tensors that hold the rest - so that
        a rank can pass a file on without keeping it whole. For a file that decoded; its tensors
        must not have changed since (a receiver's checksum would catch it). Thread-safe: reads only."""
        end = at + into.numel()
        if self._whole is not None:
            into.copy_(torch.from_numpy(self._whole[at:end]))
            return
        places = self._places
        if places is None or end > self.size:
            raise ValueError(f"bytes [{at}, {end}) of {self.file} were never decoded")
        head = len(self._head)
        if at < head:
            n = min(head, end) - at
            into[:n].copy_(torch.frombuffer(self._head, dtype=torch.uint8, count=n, offset=at))
        # The tensors tile the rest of the file exactly (codec.layout): no gap to fill.
        i = max(bisect.bisect_right(places, at, key=lambda p: p[0]) - 1, 0)
        while i < len(places) and places[i][0] < end:
            start, stop, held = places[i]
            a, b = max(start, at), min(stop, end)
            if a < b:
                into[a - at : b - at].copy_(held[a - start : b - start])
            i += 1

    def _take_header(self, piece: torch.Tensor) -> int:
        """Bytes of ``piece`` that belong to the header; sets up the places once it is complete."""
        head, used = self._head, 0
        while self._places is None and used < piece.numel():
            # 8 bytes of length first, then the JSON header they announce
            want = 8 if len(head) < 8 else 8 + header_length(head[:8], self.size)
            take = min(want - len(head), piece.numel() - used)
            head += piece[used : used + take].cpu().numpy().tobytes()
            used += take
            if len(head) == want and (want > 8 or header_length(head, self.size) == 0):
                entries, self._metadata = layout(head, self.size)
                self._prepare(entries)
        return used

    def _prepare(self, entries: list[Entry]) -> None:
        def target_for(e: Entry) -> torch.Tensor | None:
            target = self._targets.get(e.name)
            fits = (
                target is not None
                and target.dtype == e.dtype
                and list(target.shape) == e.shape
                and target.is_contiguous()
            )
            return target if fits else None

        targets = [target_for(e) for e in entries]
        if self._device is not None:  # made on the device, one tensor each (no host block)
            device = self._device
            targets = [
                t if t is not None or not e.shape else torch.empty(e.shape, dtype=e.dtype, device=device)
                for e, t in zip(entries, targets, strict=True)
            ]
        fresh = sum(_aligned(e.end - e.start) for e, t in zip(entries, targets, strict=True) if t is None)
        block, at, places = np.empty(fresh, np.uint8), 0, []
        for e, tensor in zip(entries, targets, strict=True):
            nbytes = e.end - e.start
            if tensor is None and nbytes:
                count = nbytes // e.dtype.itemsize
                tensor = torch.frombuffer(block, dtype=e.dtype, count=count, offset=at).view(e.shape)
                at += _aligned(nbytes)
            elif tensor is None:
                tensor = torch.empty(e.shape, dtype=e.dtype)
            self._tensors[e.name] = tensor
            if nbytes:
                places.append((e.start, e.end, tensor.view(-1).view(torch.uint8)))
        self._places = places

    def slot(self, at: int) -> memoryview | None:
        """Host memory the file's bytes from offset ``at`` on belong in, up to the end of their
        tensor, if they can be read straight there (then feed() gets a view of it and copies
        nothing): the rest of a host tensor the header placed. None before the header is known,
        between tensors, or for a tensor on a device."""
        places = self._places
        if places is None or self._next >= len(places) or at != self._fed:
            return None
        start, stop, into = places[self._next]
        if not start <= at < stop or into.device.type != "cpu":
            return None
        return memoryview(into[at - start :].numpy())

    def _place(self, piece: torch.Tensor, at: int) -> None:
        end, places = at + piece.numel(), self._places
        while self._next < len(places) and places[self._next][0] < end:
            start, stop, into = places[self._next]
            a, b = max(start, at), min(stop, end)
            dest, src = into[a - start : b - start], piece[a - at : b - at]
            if a < b and dest.data_ptr() != src.data_ptr():  # else read there already (slot())
                dest.copy_(src)
            if stop > end:
                break
            self._next += 1


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN
