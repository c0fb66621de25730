"""Files between nodes, for the node-local tier of a sharded run: no node holds a whole replica
there, so each node keeps its partner's shards too (a ring: node n sends to node n+1).

Every transfer is point to point over a gloo group of its own (writer threads and resume threads
use it while the main thread's collectives run on the job's group), in chunks of ``CHUNK`` bytes:
a sender holds one chunk beyond its file, a receiver one chunk, written as it lands. Each wait is
for one chunk, so the group's timeout bounds a chunk's transfer, never a whole file's. Every file
travels with its manifest entry and is checked against it once written (size, xxh3 of every block).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from train.ckpt import codec
from train.ckpt import shards as fmt
from train.ckpt.fs import JoinedWrite
from train.runtime.dist import DistEnv

CHUNK = 16 << 20


@dataclass(frozen=True)
class Ring:
    """Who holds which shard files on the node-local tier (ranks are torchrun's: node n holds
    ranks [n*L, (n+1)*L)). Shard index = rank % shard count."""

    world: int
    per_node: int  # L, ranks a node
    shards: int  # the shard count: the world under fsdp, the shard group's size under hsdp

    def node_of(self, rank: int) -> int:
        return rank // self.per_node

    def writes(self, rank: int) -> bool:
        """Whether ``rank`` writes its shard on its node: no lower rank there holds the same one."""
        return rank - self.shards < self.node_of(rank) * self.per_node

    def held(self, node: int) -> set[int]:
        """The shard indices node ``node``'s own ranks hold."""
        return {q % self.shards for q in range(node * self.per_node, (node + 1) * self.per_node)}

    @property
    def nodes(self) -> int:
        return self.world // self.per_node

    def sends_to(self, rank: int) -> int | None:
        """The rank on the next node that keeps a copy of ``rank``'s shard (None: no need)."""
        if self.nodes < 2 or not self.writes(rank):
            return None
        partner = (rank + self.per_node) % self.world
        return None if rank % self.shards in self.held(self.node_of(partner)) else partner

    def receives_from(self, rank: int) -> int | None:
        sender = (rank - self.per_node) % self.world
        return sender if self.nodes > 1 and self.sends_to(sender) == rank else None


def group(env: DistEnv, timeout_s: float) -> dist.ProcessGroup | None:
    """Collective: the ring's own gloo group (None on one node: nothing crosses)."""
    if not env.multi_node:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def _chunks(pieces: codec.Pieces) -> Iterator[torch.Tensor]:
    """The bytes of ``pieces`` in chunks of CHUNK (the last shorter), as the receiver expects
    them: copied into one reused buffer (take each before asking for the next)."""
    buf = torch.empty(CHUNK, dtype=torch.uint8)
    flat, filled = buf.numpy(), 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while len(view):
            n = min(len(view), CHUNK - filled)
            flat[filled : filled + n] = view[:n]
            filled, view = filled + n, view[n:]
            if filled == CHUNK:
                yield buf
                filled = 0
    if filled:
        yield buf[:filled]


def _header(head: dict[str, Any], dst: int | None, src: int | None, pg: dist.ProcessGroup) -> dict:
    """Send ``head`` to ``dst`` while receiving ``src``'s (either may be None)."""
    raw = json.dumps(head).encode()
    out_len, in_len = torch.tensor([len(raw)]), torch.zeros(1, dtype=torch.long)
    _both(out_len if dst is not None else None, dst, in_len if src is not None else None, src, pg)
    got = torch.empty(int(in_len.item()) if src is not None else 0, dtype=torch.uint8)
    out = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if dst is not None else None
    _both(out, dst, got if src is not None else None, src, pg)
    return json.loads(bytes(got.numpy())) if src is not None else {}


def _both(out: torch.Tensor | None, dst: int | None, into: torch.Tensor | None, src: int | None, pg) -> None:
    works = []
    if out is not None and dst is not None:
        works.append(dist.isend(out, dst, group=pg))
    if into is not None and src is not None:
        works.append(dist.irecv(into, src, group=pg))
    for work in works:
        work.wait()


def exchange(
    pg: dist.ProcessGroup,
    dst: int | None,
    outgoing: tuple[str, dict[str, Any], codec.Pieces] | None,
    src: int | None,
    into: JoinedWrite | None,
) -> tuple[str, dict[str, Any]] | None:
    """Send ``outgoing`` (file, its entry, its bytes; None: this rank has nothing, and its receiver
    is told so) to ``dst`` while receiving ``src``'s file into ``into``. Returns the file received
    and its entry; OSError if the sender had nothing or the file is not what its entry says."""
    head = {"file": outgoing[0], "entry": outgoing[1]} if outgoing else {"error": "nothing to send"}
    got = _header(head, dst, src, pg)
    sending = outgoing is not None and dst is not None
    send = _chunks(outgoing[2]) if outgoing is not None and sending else iter(())
    problem = ""
    if src is not None:
        problem = got.get("error") or fmt.entry_problem(got.get("entry"), got.get("file"))
    size = int(got["entry"]["size"]) if src is not None and not problem else 0
    buf = torch.empty(min(size, CHUNK), dtype=torch.uint8)
    counts = (
        -(-int(outgoing[1]["size"]) // CHUNK) if outgoing is not None and sending else 0,
        -(-size // CHUNK),
    )

    def received() -> Iterator[memoryview]:
        for i in range(max(counts)):
            piece = buf[: min(CHUNK, size - i * CHUNK)] if i < counts[1] else None
            out = next(send) if i < counts[0] else None
            _both(out, dst, piece, src if piece is not None else None, pg)
            if piece is not None:
                yield memoryview(piece.numpy())

    chunks = received()
    try:
        if src is None or into is None or problem:
            return None
        into.write_stream(got["file"], chunks)
        fmt.read_back(into, got["file"], got["entry"])
        return got["file"], got["entry"]
    finally:
        for _ in chunks:  # whatever failed here, the partners' transfers run to their end
            pass
        if problem:
            raise OSError(f"rank {src} sent no shard for this node to keep ({problem})")


def send_file(pg: dist.ProcessGroup, dst: int, path: os.PathLike, entry: dict[str, Any] | None) -> None:
    """Resume: a file of this node's copy to ``dst``, read a chunk at a time (``entry`` None: the
    file cannot be had here, and ``dst`` is told so)."""
    try:
        if entry is None:
            raise OSError(f"{os.path.basename(path)}: no entry for it")
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below, after the header)
    except OSError as e:
        _header({"error": str(e)}, dst, None, pg)
        raise
    with f:
        size = os.fstat(f.fileno()).st_size
        _header({"file": os.path.basename(path), "entry": entry, "size": size}, dst, None, pg)
        while chunk := f.read(CHUNK):
            _both(torch.frombuffer(bytearray(chunk), dtype=torch.uint8), dst, None, None, pg)


def receive_file(pg: dist.ProcessGroup, src: int, into: JoinedWrite) -> tuple[str, dict[str, Any]]:
    """Resume: a file from ``src`` into ``into``, checked against the entry it came with."""
    got = _header({}, None, src, pg)
    problem = got.get("error") or fmt.entry_problem(got.get("entry"), got.get("file"))
    sent = got.get("size")
    size = sent if isinstance(sent, int) and not isinstance(sent, bool) and sent >= 0 else 0
    buf = torch.empty(CHUNK, dtype=torch.uint8)

    def received() -> Iterator[memoryview]:
        for at in range(0, size, CHUNK):
            piece = buf[: min(CHUNK, size - at)]
            _both(None, None, piece, src, pg)
            yield memoryview(piece.numpy())

    chunks = received()
    try:
        if problem:
            raise OSError(f"rank {src} sent no usable {str(got.get('file'))[:60]}: {problem}")
        into.write_stream(got["file"], chunks)
    finally:
        for _ in chunks:  # whatever failed here, the sender sends its file to its end
            pass
    fmt.read_back(into, got["file"], got["entry"])
    return got["file"], got["entry"]
