"""Checkpoint naming, (de)serialisation and the manifest that makes a checkpoint verifiable."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from train.ckpt.codec import deserialize, serialize

FORMAT_VERSION = 1
__all__ = ["deserialize", "serialize"]  # re-exported: the manager reads and writes through these
MANIFEST = "manifest.json"
_NAME = re.compile(r"step_(\d{8,})")


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

    def feed(self, chunk: memoryview) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-checksum")  # in order
        self.fed += len(chunk)
        self._pool.submit(self._hasher.update, chunk)

    def digest_of(self, data: bytes | memoryview) -> str:
        """The checksum of ``data``: from the pieces fed, if they were all of it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        return self._hasher.hexdigest() if self.fed == len(data) else checksum(data)


def build(step: int, blobs: dict[str, bytes], meta: dict[str, Any]) -> bytes:
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "time": time.time(),
        "torch": torch.__version__,
        "files": {f: {"size": len(b), "xxh3_64": checksum(b)} for f, b in sorted(blobs.items())},
        **meta,
    }
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


@dataclass
class Problem(Exception):
    """Why a checkpoint is not valid, in words for a log line."""

    reason: str

    def __str__(self) -> str:
        return self.reason


def parse(raw: bytes | None, expected_step: int) -> dict:
    if raw is None:
        raise Problem("no manifest.json (incomplete write)")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Problem("manifest.json is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise Problem("manifest.json has no file list")
    if manifest.get("format") != FORMAT_VERSION:
        raise Problem(f"manifest format {manifest.get('format')!r}, this build reads {FORMAT_VERSION}")
    for file, entry in manifest["files"].items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("xxh3_64"), str)
        ):
            raise Problem(f"manifest.json entry for {file!r} lacks size or checksum")
    if manifest.get("step") != expected_step:
        raise Problem(f"manifest says step {manifest.get('step')!r}, directory says {expected_step}")
    return manifest


def check_file(manifest: dict, file: str, data: bytes, hashing: BackgroundChecksum | None = None) -> None:
    """``hashing``: what was fed ``data`` while it was read, if anything."""
    entry = manifest["files"][file]
    digest = hashing.digest_of(data) if hashing is not None else checksum(data)
    if len(data) != entry["size"]:
        raise Problem(f"{file}: {len(data)} bytes, manifest says {entry['size']} (truncated or torn)")
    if digest != entry["xxh3_64"]:
        raise Problem(f"{file}: checksum mismatch (corrupt)")
