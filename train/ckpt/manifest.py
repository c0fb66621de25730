"""Checkpoint naming, (de)serialisation and the manifest that makes a checkpoint verifiable."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from train.ckpt.codec import Pieces, deserialize, encode, serialize

FORMAT_VERSION = 1
__all__ = ["deserialize", "encode", "serialize"]  # re-exported: the manager reads and writes through these
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 16 << 20  # far above any real manifest; a bigger one is not ours
_NAME = re.compile(r"step_(\d{8,})")
# What a manifest may list: a file in the checkpoint directory itself, never a path, never hidden.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def name_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class BackgroundChecksum:
    """checksum() of data fed in pieces, computed on a thread while the caller reads on
    (xxhash releases the GIL): verifying costs little more than reading."""

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_64()
        self._pool: ThreadPoolExecutor | None = None  # started by the first piece
        self.fed = 0

    def feed(self, chunk: memoryview) -> Future:
        """Done once ``chunk`` is hashed (until then, its memory must not change)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-checksum")  # in order
        self.fed += len(chunk)
        return self._pool.submit(self._hasher.update, chunk)

    def digest(self) -> str:
        """The checksum of every piece fed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        return self._hasher.hexdigest()

    def digest_of(self, data: bytes | memoryview) -> str:
        """The checksum of ``data``: from the pieces fed, if they were all of it."""
        digest = self.digest()
        return digest if self.fed == len(data) else checksum(data)


def entry(data: bytes | memoryview | Pieces) -> dict[str, Any]:
    """A file's manifest entry: its size and checksum, from its bytes or from its pieces in order."""
    pieces = data if isinstance(data, list) else [data]
    hasher = xxhash.xxh3_64()
    for piece in pieces:
        hasher.update(piece)
    return {"size": sum(len(piece) for piece in pieces), "xxh3_64": hasher.hexdigest()}


def build(step: int, blobs: dict[str, bytes | memoryview | Pieces], meta: dict[str, Any]) -> bytes:
    return build_from(step, {f: entry(b) for f, b in blobs.items()}, meta)


def build_from(
    step: int, entries: dict[str, dict[str, Any]], meta: dict[str, Any], compact: bool = False
) -> bytes:
    """The manifest of files already written elsewhere, from their entries (see entry());
    ``compact``: no indentation (a sharded checkpoint's layout is big)."""
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "time": time.time(),
        "torch": torch.__version__,
        "files": dict(sorted(entries.items())),
        **meta,
    }
    if compact:
        return json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


@dataclass
class Problem(Exception):
    """Why a checkpoint is not valid, in words for a log line."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def plain_file_name(file: object) -> bool:
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    return isinstance(file, str) and file != MANIFEST and FILE_NAME.fullmatch(file) is not None


def _show(x: object) -> str:
    # Untrusted values end up in log lines: keep them short.
    text = repr(x)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # json.loads keeps the last of duplicate keys; two readers could then disagree on a manifest.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Problem(f"manifest.json has {_show(key)} twice")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse(raw: bytes | None, expected_step: int, files: frozenset[str] | set[str] | None = None) -> dict:
    """The manifest, checked; ``files``: the exact set of files it must list, if given."""
    if raw is None:
        raise Problem("no manifest.json (incomplete write)")
    if len(raw) > MANIFEST_LIMIT:
        raise Problem(f"manifest.json is {len(raw)} bytes, more than a manifest may be ({MANIFEST_LIMIT})")
    try:
        manifest = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, huge ints, deep nesting
        raise Problem("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise Problem("manifest.json has no file list")
    if not _is_int(manifest.get("format")) or manifest["format"] != FORMAT_VERSION:
        raise Problem(f"manifest format {_show(manifest.get('format'))}, this build reads {FORMAT_VERSION}")
    folded: set[str] = set()
    for file, entry in manifest["files"].items():
        if not plain_file_name(file):
            raise Problem(f"manifest.json lists {_show(file)}, which is not a plain file name")
        if file.casefold() in folded:  # one file on a case-insensitive filesystem
            raise Problem(f"manifest.json lists {file!r} twice")
        folded.add(file.casefold())
        if not (
            isinstance(entry, dict)
            and _is_int(entry.get("size"))
            and entry["size"] >= 0
            and isinstance(entry.get("xxh3_64"), str)
        ):
            raise Problem(f"manifest.json entry for {file!r} lacks size or checksum")
    if not _is_int(manifest.get("step")) or manifest["step"] != expected_step:
        raise Problem(f"manifest says step {_show(manifest.get('step'))}, directory says {expected_step}")
    if files is not None:
        listed = set(manifest["files"])
        if extra := sorted(listed - files):
            raise Problem(f"manifest.json lists unexpected file {extra[0]!r}")
        if missing := sorted(files - listed):
            raise Problem(f"manifest.json does not list expected file {missing[0]!r}")
    return manifest


def check_file(manifest: dict, file: str, data: bytes, hashing: BackgroundChecksum | None = None) -> None:
    """``hashing``: what was fed ``data`` while it was read, if anything."""
    entry = manifest["files"][file]
    digest = hashing.digest_of(data) if hashing is not None else checksum(data)
    if len(data) != entry["size"]:
        raise Problem(f"{file}: {len(data)} bytes, manifest says {entry['size']} (truncated or torn)")
    if digest != entry["xxh3_64"]:
        raise Problem(f"{file}: checksum mismatch (corrupt)")
