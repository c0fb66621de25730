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
HEADER_LIMIT = 1 << 20  # a file's name and manifest entry (a block checksum per 4 MiB: ~1 TB files)


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


def numbering_problem(placed: list[tuple[int, int, int]]) -> str:
    """Why Ring's numbering does not hold, or "": ``placed[rank]`` is that rank's (node, local
    rank, ranks on its node). torchrun numbers ranks node by node; a job whose nodes run different
    numbers of ranks, or a launcher that numbers them otherwise, would pair the wrong partners."""
    sizes = {size for _, _, size in placed}
    if len(sizes) > 1:
        return f"the nodes run different numbers of ranks ({', '.join(map(str, sorted(sizes)))})"
    for rank, (node, local_rank, size) in enumerate(placed):
        expected = (rank // size, rank % size)
        if (node, local_rank) != expected:
            return (
                f"rank {rank} is local rank {local_rank} of node {node}, not {expected[1]} of {expected[0]}"
            )
    return ""


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
    """Send ``head`` to ``dst`` while receiving ``src``'s (either may be None). What arrives is
    untrusted: {"error": ...} unless it is a JSON map of at most HEADER_LIMIT bytes."""
    raw = json.dumps(head).encode()
    out_len, in_len = torch.tensor([len(raw)]), torch.zeros(1, dtype=torch.long)
    _both(out_len if dst is not None else None, dst, in_len if src is not None else None, src, pg)
    length = int(in_len.item()) if src is not None else 0
    if not 0 <= length <= HEADER_LIMIT:
        raise OSError(f"rank {src} sent a header of {length} bytes")  # a peer speaking another protocol
    got = torch.empty(length, dtype=torch.uint8)
    out = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if dst is not None else None
    _both(out, dst, got if src is not None else None, src, pg)
    if src is None:
        return {}
    try:
        said = json.loads(bytes(got.numpy()))
    except ValueError:
        said = None
    return said if isinstance(said, dict) else {"error": "a malformed header"}


def _both(out: torch.Tensor | None, dst: int | None, into: torch.Tensor | None, src: int | None, pg) -> None:
    works = []
    if out is not None and dst is not None:
        works.append(dist.isend(out, dst, group=pg))
    if into is not None and src is not None:
        works.append(dist.irecv(into, src, group=pg))
    for work in works:
        work.wait()


def _size(head: dict) -> int:
    """The bytes a sender said it sends after its header (what a receiver must take, whatever it
    then makes of them: a rank that stops taking leaves its sender waiting)."""
    size = head.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else 0


def _problem(head: dict, expect: str) -> str:
    """ "" if ``head`` announces file ``expect`` with a well-formed entry of its stated size."""
    if head.get("error"):
        return str(head["error"])[:300]
    if head.get("file") != expect:
        return f"it sent {str(head.get('file'))[:60]!r}, not {expect!r}"
    problem = fmt.entry_problem(head.get("entry"), expect)
    if not problem and head["entry"]["size"] != _size(head):
        problem = f"{expect}: {_size(head)} bytes sent, its entry says {head['entry']['size']}"
    return problem


def _take(chunks: Iterator[memoryview], into: JoinedWrite | None, head: dict, expect: str, src: int) -> tuple:
    """Write what arrives as ``expect`` (new, never over a file there), check it against its entry;
    every chunk is taken whatever fails. OSError if the file is not the one expected, whole."""
    try:
        problem = _problem(head, expect)
        if problem:
            raise OSError(f"rank {src} sent no usable {expect} ({problem})")
        if into is None:
            raise OSError(f"{expect}: this rank has nowhere to write it")
        into.write_stream(expect, chunks)
    finally:
        for _ in chunks:  # the sender sends its file to its end
            pass
    fmt.read_back(into, expect, head["entry"])  # type: ignore[arg-type]
    return expect, head["entry"]


def _received(
    buf: torch.Tensor, size: int, src: int, pg, send: Iterator | None = None, dst=None, sends: int = 0
):
    """Chunks of ``size`` bytes from ``src`` as they land, sending ``sends`` chunks of ``send`` to
    ``dst`` beside them (a ring: both at once)."""
    for i in range(max(-(-size // CHUNK), sends)):
        piece = buf[: min(CHUNK, size - i * CHUNK)] if i * CHUNK < size else None
        out = next(send) if send is not None and i < sends else None
        _both(out, dst, piece, src if piece is not None else None, pg)
        if piece is not None:
            yield memoryview(piece.numpy())


def exchange(
    pg: dist.ProcessGroup,
    dst: int | None,
    outgoing: tuple[str, dict[str, Any], codec.Pieces] | None,
    src: int | None,
    expect: str | None,
    into: JoinedWrite | None,
) -> tuple[str, dict[str, Any]] | None:
    """Send ``outgoing`` (file, its entry, its bytes; None: this rank has nothing, and its receiver
    is told so) to ``dst`` while receiving ``src``'s file ``expect`` into ``into``. Returns the file
    received and its entry; OSError if the sender had nothing or the file is not what it should be."""
    sending = outgoing is not None and dst is not None
    head = (
        {"file": outgoing[0], "entry": outgoing[1], "size": outgoing[1]["size"]}
        if outgoing is not None
        else {"error": "it had nothing to send"}
    )
    got = _header(head, dst, src, pg)
    sends = -(-int(outgoing[1]["size"]) // CHUNK) if sending and outgoing is not None else 0
    send = _chunks(outgoing[2]) if sending and outgoing is not None else None
    size = _size(got) if src is not None else 0
    chunks = _received(torch.empty(min(size, CHUNK), dtype=torch.uint8), size, src, pg, send, dst, sends)
    if src is None or expect is None:
        for _ in chunks:
            pass
        return None
    return _take(chunks, into, got, expect, src)


def send_file(pg: dist.ProcessGroup, dst: int, path: os.PathLike, entry: dict[str, Any] | None) -> None:
    """Resume: a file of this node's copy to ``dst``, a chunk at a time (``entry`` None: the file
    cannot be had here, and ``dst`` is told so). A read that fails half-way still sends every
    chunk announced (zeros: the receiver's check fails), then raises."""
    try:
        if entry is None:
            raise OSError(f"{os.path.basename(path)}: no entry for it")
        f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below, after the header)
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        _header({"error": str(e)}, dst, None, pg)
        raise
    failed: OSError | None = None
    with f:
        _header({"file": os.path.basename(path), "entry": entry, "size": size}, dst, None, pg)
        buf = torch.zeros(CHUNK, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        for at in range(0, size, CHUNK):
            n, got = min(CHUNK, size - at), 0
            try:
                while failed is None and got < n:
                    read = f.readinto(view[got:n])
                    if not read:
                        raise OSError(f"{os.path.basename(path)}: ended at {at + got} of {size} bytes")
                    got += read
            except OSError as e:
                failed = e
            if got < n:
                buf[got:n] = 0
            _both(buf[:n], dst, None, None, pg)
    if failed is not None:
        raise failed


def receive_file(pg: dist.ProcessGroup, src: int, into: JoinedWrite | None, expect: str) -> tuple[str, dict]:
    """Resume: file ``expect`` from ``src`` into ``into`` (None: taken and dropped: this rank could
    not keep it), checked against the entry it came with."""
    got = _header({}, None, src, pg)
    size = _size(got)
    return _take(
        _received(torch.empty(min(size, CHUNK), dtype=torch.uint8), size, src, pg), into, got, expect, src
    )
