"""Sharded checkpoints: each rank's rows of every tensor in a file of its own, and a layout in the
manifest that says which rows each file holds, so that a rank of any later shape reads only the
byte ranges it needs. Knows nothing about training: tensors are named by plain keys.

A shard file is plain safetensors ({key: this file's rows}). Its manifest entry carries, besides
the whole file's size and checksum, the xxh3 of every ``BLOCK_BYTES`` block: a reader of a few
rows verifies the blocks it reads, never the whole file. The layout (``manifest["layout"]``):

    {"block_bytes": 4194304,
     "tensors": {key: {"shape": [...], "dtype": "F32", "pieces": [[file, first row, end row], ...]}}}

The pieces of a tensor tile its rows [0, shape[0]) in order; a file may hold no rows of a tensor.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from train.ckpt import codec
from train.ckpt import manifest as mf
from train.ckpt.fs import JoinedWrite
from train.ckpt.manager import READ
from train.ckpt.storage import LocalStorage, Unreadable

BLOCK_BYTES = 4 << 20
LAYOUT = "layout"
MODEL = "model/"  # the keys of the model's weights start so (the optimizer's: "optim/")
WINDOW_BLOCKS = 16  # a reader holds at most this many blocks of a file at once


def shard_file(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def is_sharded(manifest: dict) -> bool:
    return LAYOUT in manifest


def dtype_name(dtype: torch.dtype) -> str:
    return codec._NAMES[dtype]


def rows_of(shape: list[int]) -> int:
    """Rows of a tensor of ``shape``: a 0-d tensor is one row of one element (held whole)."""
    return shape[0] if shape else 1


def row_bytes(shape: list[int], dtype: torch.dtype) -> int:
    return math.prod(shape[1:]) * dtype.itemsize


# -- writing -------------------------------------------------------------------------------------
def _blocks(pieces: codec.Pieces) -> Iterator[memoryview]:
    """The bytes of ``pieces`` cut at every BLOCK_BYTES boundary (views, no copies)."""
    at = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while len(view):
            n = min(len(view), BLOCK_BYTES - at % BLOCK_BYTES)
            yield view[:n]
            view, at = view[n:], at + n


def entry_of(pieces: codec.Pieces) -> dict[str, Any]:
    whole, blocks, block, filled = xxhash.xxh3_64(), [], xxhash.xxh3_64(), 0
    for part in _blocks(pieces):
        whole.update(part)
        block.update(part)
        filled += len(part)
        if filled == BLOCK_BYTES:
            blocks.append(block.hexdigest())
            block, filled = xxhash.xxh3_64(), 0
    size = sum(len(memoryview(p).cast("B")) for p in pieces)
    if filled or not size:
        blocks.append(block.hexdigest())
    return {"size": size, "xxh3_64": whole.hexdigest(), "blocks": blocks}


def encoded(file: str, tensors: dict[str, Any]) -> tuple[dict[str, Any], codec.Pieces]:
    """A file's manifest entry and its bytes (views of ``tensors``, not copies)."""
    pieces = codec.encode(file, tensors)
    return entry_of(pieces), pieces


def write_shard(target: JoinedWrite, file: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write ``tensors`` as ``file`` (durable), read it back, and return its manifest entry;
    OSError if what reads back is not what was written."""
    pieces = codec.encode(file, tensors)
    entry = entry_of(pieces)
    target.write(file, pieces)
    read_back(target, file, entry)
    return entry


def read_back(target: JoinedWrite, file: str, entry: dict[str, Any]) -> None:
    """OSError unless ``file`` as written reads back block for block as ``entry`` says."""
    fd = target.open(file)
    try:
        if os.fstat(fd).st_size != entry["size"]:
            raise OSError(f"{file}: {os.fstat(fd).st_size} bytes written, {entry['size']} meant")
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            for i, expected in enumerate(entry["blocks"]):
                if xxhash.xxh3_64_hexdigest(f.read(BLOCK_BYTES)) != expected:
                    raise OSError(f"{file}: block {i} did not read back as written")
    finally:
        os.close(fd)


def layout(
    pieces: dict[str, dict[str, tuple[int, int]]], shapes: dict[str, tuple[list[int], torch.dtype]]
) -> dict:
    """The manifest's layout from what each file holds ({file: {key: (first row, end row)}}).
    Compact: files are named once and pieces refer to them by index (a 7B model's AdamW state
    in 256 shards is ~230k pieces, and a manifest is at most manifest.MANIFEST_LIMIT)."""
    files = sorted(pieces)
    index = {file: i for i, file in enumerate(files)}
    tensors: dict[str, Any] = {}
    for key, (shape, dtype) in sorted(shapes.items()):
        held = sorted(
            (rows, file) for file, keys in pieces.items() if (rows := keys.get(key)) and rows[1] > rows[0]
        )
        tensors[key] = {
            "shape": list(shape),
            "dtype": dtype_name(dtype),
            "pieces": [[index[file], start, end] for (start, end), file in held],
        }
    return {"block_bytes": BLOCK_BYTES, "files": files, "tensors": tensors}


# -- checking ------------------------------------------------------------------------------------
def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def entry_problem(entry: object, file: object) -> str:
    """ "" if ``entry`` is a well-formed entry of a plain file name ``file`` (untrusted: from
    another node), with one block checksum per BLOCK_BYTES; else what is wrong."""
    if not (file == mf.MANIFEST or mf.plain_file_name(file)):
        return f"{str(file)[:60]!r} is not a plain file name"
    blocks = entry.get("blocks") if isinstance(entry, dict) else None
    size = entry.get("size") if isinstance(entry, dict) else None
    if not (
        _is_int(size)
        and size >= 0
        and isinstance(blocks, list)
        and len(blocks) == max(1, -(-size // BLOCK_BYTES))
        and all(isinstance(b, str) for b in blocks)
    ):
        return f"{file}: its block checksums do not match its size"
    return ""


def check_blocks(manifest: dict, file: str) -> None:
    """manifest.Problem unless ``file``'s entry has one block checksum per BLOCK_BYTES of it."""
    entry = manifest["files"].get(file)
    if entry is None:
        raise mf.Problem(f"it holds no {file}")
    problem = entry_problem(entry, file)
    if problem:
        raise mf.Problem(problem)


def check(manifest: dict) -> dict[str, list[tuple[str, int, int]]]:
    """{key: [(file, first row, end row), ...]} from the layout; manifest.Problem unless it is
    well-formed (untrusted: every field's type checked) and agrees with the files listed."""
    lay = manifest.get(LAYOUT)
    if not (
        isinstance(lay, dict)
        and lay.get("block_bytes") == BLOCK_BYTES
        and isinstance(lay.get("tensors"), dict)
        and isinstance(lay.get("files"), list)
        and all(isinstance(f, str) and f in manifest["files"] for f in lay["files"])
    ):
        raise mf.Problem(f"the layout is not one this build reads (block_bytes {BLOCK_BYTES})")
    files, out = lay["files"], {}
    for file in files:
        check_blocks(manifest, file)
    for key, spec in lay["tensors"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        pieces = spec.get("pieces") if isinstance(spec, dict) else None
        if not (
            isinstance(shape, list)
            and all(_is_int(d) and d >= 0 for d in shape)
            and isinstance(spec.get("dtype"), str)
            and spec["dtype"] in codec._DTYPES
            and isinstance(pieces, list)
        ):
            raise mf.Problem(f"layout entry {str(key)[:60]!r} is malformed")
        at, resolved = 0, []
        for piece in pieces:
            if not (
                isinstance(piece, list)
                and len(piece) == 3
                and all(map(_is_int, piece))
                and 0 <= piece[0] < len(files)
                and piece[1] == at
                and piece[2] > at
            ):
                raise mf.Problem(
                    f"layout of {str(key)[:60]!r}: pieces do not tile its rows from the files listed"
                )
            resolved.append((files[piece[0]], piece[1], piece[2]))
            at = piece[2]
        if at != rows_of(shape):
            raise mf.Problem(f"layout of {str(key)[:60]!r}: pieces cover {at} of {rows_of(shape)} rows")
        out[key] = resolved
    return out


# -- reading -------------------------------------------------------------------------------------
@dataclass
class _Op:
    offset: int  # in the file
    length: int
    dest: memoryview  # where those bytes go


def _runs(ops: list[_Op], size: int) -> Iterator[tuple[int, int, int]]:
    """(first byte, end byte, first block) of each window of consecutive whole blocks that hold
    ``ops``' bytes (in file order), at most WINDOW_BLOCKS blocks each."""
    first = count = 0
    for op in ops:
        for block in range(op.offset // BLOCK_BYTES, (op.offset + op.length - 1) // BLOCK_BYTES + 1):
            if count and block < first + count:
                continue  # already in the window
            if count and block == first + count and count < WINDOW_BLOCKS:
                count += 1
                continue
            if count:
                yield first * BLOCK_BYTES, min(size, (first + count) * BLOCK_BYTES), first
            first, count = block, 1
    if count:
        yield first * BLOCK_BYTES, min(size, (first + count) * BLOCK_BYTES), first


def _check_pieces(
    file: str, entry: dict, first_block: int, lo: int, hi: int, pieces: list[memoryview]
) -> None:
    """Each block of [lo, hi), read as consecutive ``pieces``, against its manifest checksum."""
    hasher, block, at = xxhash.xxh3_64(), first_block, lo
    end = min(hi, (block + 1) * BLOCK_BYTES)
    for piece in pieces:
        pos = 0
        while pos < len(piece):
            take = min(len(piece) - pos, end - at)
            hasher.update(piece[pos : pos + take])
            pos, at = pos + take, at + take
            if at == end:
                if hasher.hexdigest() != entry["blocks"][block]:
                    raise mf.Problem(f"{file}: checksum mismatch in block {block} (corrupt)")
                hasher.reset()
                block, end = block + 1, min(hi, (block + 2) * BLOCK_BYTES)


class ShardReader:
    """Rows of a sharded checkpoint's tensors, read by byte range and verified by block."""

    def __init__(self, storage: LocalStorage, name: str, manifest: dict):
        self.pieces = check(manifest)
        self.storage, self.name, self.manifest = storage, name, manifest
        self.tensors = manifest[LAYOUT]["tensors"]
        self._headers: dict[str, dict[str, codec.Entry]] = {}
        self.bytes_read = 0

    def _read(self, file: str, first_block: int, blocks: int, into: memoryview | None = None) -> memoryview:
        """Whole blocks of ``file`` (into ``into``, if given), each checked against the manifest;
        manifest.Problem if not."""
        check_blocks(self.manifest, file)
        entry = self.manifest["files"][file]
        start = first_block * BLOCK_BYTES
        length = min(entry["size"], (first_block + blocks) * BLOCK_BYTES) - start
        try:
            data = self.storage.read_range(self.name, file, start, length, into)
        except FileNotFoundError:
            raise mf.Problem(f"{file} is missing") from None
        except Unreadable as e:
            raise mf.Problem(f"{file}: {e} (truncated or torn)") from None
        READ.add(len(data))
        self.bytes_read += len(data)
        for i in range(blocks):
            part = data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES]
            if len(part) and xxhash.xxh3_64_hexdigest(part) != entry["blocks"][first_block + i]:
                raise mf.Problem(f"{file}: checksum mismatch in block {first_block + i} (corrupt)")
        return data

    def _header(self, file: str) -> dict[str, codec.Entry]:
        if file not in self._headers:
            size = self.manifest["files"][file]["size"]
            head = self._read(file, 0, 1)
            need = 8 + codec.header_length(head[:8], size) if size >= 8 else 8
            if need > len(head):
                head = self._read(file, 0, -(-need // BLOCK_BYTES))
            try:
                entries, _ = codec.layout(head, size)
            except ValueError as e:
                raise mf.Problem(f"{file} is not a safetensors file: {e}") from None
            self._headers[file] = {e.name: e for e in entries}
        return self._headers[file]

    def read_rows(self, wants: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """{key: rows [first, end) of it} -> {key: a new host tensor of those rows}."""
        out: dict[str, torch.Tensor] = {}
        ops: dict[str, list[_Op]] = {}
        for key, (first, end) in wants.items():
            spec = self.tensors.get(key)
            if spec is None:
                raise mf.Problem(f"it holds no {key!r}")
            dtype, shape = codec._DTYPES[spec["dtype"]], spec["shape"]
            if not 0 <= first <= end <= rows_of(shape):
                raise mf.Problem(f"{key}: rows {first}..{end} of {rows_of(shape)}")
            # Every piece is checked against its file's own header before anything is allocated:
            # a layout's shapes are untrusted, the headers' sizes are bounded by the files'.
            wanted = [
                (file, start, stop) for file, start, stop in self.pieces[key] if start < end and stop > first
            ]
            for file, start, stop in wanted:
                held = self._header(file).get(key)
                if held is None or held.dtype != dtype or held.shape != [stop - start, *shape[1:]]:
                    raise mf.Problem(f"{file}: its {key} is not the rows {start}..{stop} the layout says")
            out[key] = torch.empty([end - first, *shape[1:]], dtype=dtype)
            dest = memoryview(out[key].view(torch.uint8).numpy()).cast("B") if out[key].numel() else None
            per_row = row_bytes(shape, dtype)
            for file, start, stop in wanted:
                lo, hi = max(first, start), min(end, stop)
                held = self._header(file)[key]
                part = dest[(lo - first) * per_row : (hi - first) * per_row]
                ops.setdefault(file, []).append(
                    _Op(held.start + (lo - start) * per_row, (hi - lo) * per_row, part)
                )
        for file, file_ops in ops.items():
            self._fill(file, sorted(file_ops, key=lambda op: op.offset))
        return {
            key: t.reshape(()) if not self.tensors[key]["shape"] and t.numel() == 1 else t
            for key, t in out.items()
        }

    def _fill(self, file: str, ops: list[_Op]) -> None:
        """``ops`` (in file order) from the blocks that hold them: read straight into their
        destinations, the bytes between them into one reused scratch buffer, then every block
        checked over its pieces where they landed. Each byte is copied once (a window copied out
        again would double the memory traffic of a resume). A block that fails leaves bytes in the
        destinations: they are fresh tensors, restored from only once every rank checked its own."""
        check_blocks(self.manifest, file)
        entry = self.manifest["files"][file]
        ops = [op for op in ops if op.length]
        for a, b in itertools.pairwise(ops):
            if b.offset < a.offset + a.length:  # layout() keeps a file's tensors apart: never here
                raise mf.Problem(f"{file}: overlapping reads")
        scratch: memoryview | None = None
        for lo, hi, first_block in _runs(ops, entry["size"]):
            pieces: list[memoryview] = []
            gaps = hi - lo - sum(max(0, min(hi, op.offset + op.length) - max(lo, op.offset)) for op in ops)
            if gaps and scratch is None:  # a window's gaps never exceed the window
                scratch = memoryview(np.empty(WINDOW_BLOCKS * BLOCK_BYTES, dtype=np.uint8))
            at, used = lo, 0
            for op in ops:
                a, b = max(lo, op.offset), min(hi, op.offset + op.length)
                if a >= b:
                    continue
                if a > at:
                    pieces.append(scratch[used : used + a - at])
                    used += a - at
                pieces.append(op.dest[a - op.offset : b - op.offset])
                at = b
            if at < hi:
                pieces.append(scratch[used : used + hi - at])
            try:
                self.storage.read_into(self.name, file, lo, pieces)
            except FileNotFoundError:
                raise mf.Problem(f"{file} is missing") from None
            except Unreadable as e:
                raise mf.Problem(f"{file}: {e} (truncated or torn)") from None
            READ.add(hi - lo)
            self.bytes_read += hi - lo
            _check_pieces(file, entry, first_block, lo, hi, pieces)

    def read_file(self, file: str) -> Any:
        """A small file of the checkpoint (not a shard), whole, checked and decoded."""
        check_blocks(self.manifest, file)
        entry = self.manifest["files"][file]
        data = self._read(file, 0, max(1, -(-entry["size"] // BLOCK_BYTES)))
        if xxhash.xxh3_64_hexdigest(data) != entry["xxh3_64"]:
            raise mf.Problem(f"{file}: checksum mismatch (corrupt)")
        try:
            return mf.deserialize(file, data)
        except Exception as e:
            raise mf.Problem(f"{file} does not deserialise: {str(e)[:200]}") from None
