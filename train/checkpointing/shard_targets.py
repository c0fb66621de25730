"""Where the ranks of a sharded save write their files before the commit, and how it commits.

- A directory (a shared filesystem): one temporary directory per save, named by the step and a
  token the ranks agreed at start, that every rank writes into and rank 0 renames at commit.
- A bucket: no rename there, and a checkpoint's commit point is its manifest (train/ckpt/
  objstore.py). Every rank uploads its shard straight into the step's prefix under a name that
  carries the attempt's token, so a rank never overwrites a file of a checkpoint that already
  exists there (a step saved again after a resume from an older one, with its manifest still in
  place until rank 0 has looked); rank 0 writes the train file only once it has taken the step,
  and the manifest last. What an aborted save uploaded is removed, and after a commit any file of
  the prefix the new manifest does not list (an earlier attempt's) goes too.

Either way each file is checked once written: read back block for block from a disk, its xxh3
streamed back from a bucket (no second copy in memory).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from typing import Any

from train.ckpt import codec, hooks
from train.ckpt import manifest as mf
from train.ckpt import shards as fmt
from train.ckpt.objstore import FsspecStorage
from train.ckpt.storage import INVALID_TAG, TMP_PREFIX, LocalStorage


class DirTarget:
    def __init__(self, storage: LocalStorage, token: str):
        self.storage, self.token = storage, token

    def shard_file(self, index: int, count: int) -> str:
        return fmt.shard_file(index, count)

    def _tmp(self, name: str) -> str:
        return f"{TMP_PREFIX}{name}-{self.token}"

    def join(self, name: str) -> Any:
        """Every writing rank: where its files of checkpoint ``name`` go (made by the first)."""
        return _DirWrite(self.storage.join(self._tmp(name)))

    def claim(self, name: str) -> Any:
        """Rank 0: the save of ``name`` to commit later (the directory is locked as its writer's)."""
        return self.storage.begin(name, self._tmp(name))

    def abort(self, name: str, files: list[str], claimed: bool = False) -> None:
        """Remove what this save wrote (its temporary directory, whoever made it)."""
        shutil.rmtree(self.storage.root / self._tmp(name), ignore_errors=True)

    def set_aside(self, name: str) -> str:
        """An invalid checkpoint of the step out of the way (this save writes elsewhere)."""
        return self.storage.set_aside(name)


class _DirWrite:
    def __init__(self, joined: Any):
        self.joined = joined

    def write(self, file: str, entry: dict[str, Any], pieces: codec.Pieces) -> None:
        self.joined.write(file, pieces)
        fmt.read_back(self.joined, file, entry)

    def close(self) -> None:
        self.joined.close()


class BucketTarget:
    def __init__(self, storage: FsspecStorage, token: str):
        self.storage, self.token = storage, token

    def shard_file(self, index: int, count: int) -> str:
        return f"shard-{index:05d}-of-{count:05d}.{self.token}.safetensors"

    def join(self, name: str) -> Any:
        return _BucketWrite(self.storage, name)

    def claim(self, name: str) -> Any:
        return _BucketPending(self, name)

    def set_aside(self, name: str) -> str:
        """An invalid checkpoint of the step out of the way, kept for inspection: its files, not
        those this save's ranks may already have uploaded beside them (named by its token)."""
        storage = self.storage
        old = sorted(
            (f for f in storage._objects().get(name, {}) if self.token not in f),
            key=lambda f: f == mf.MANIFEST,
        )
        target = f"{name}{INVALID_TAG}{int(time.time())}-{uuid.uuid4().hex[:6]}"
        for file in old:  # server-side copies, the manifest last; then the originals, manifest first
            storage.copy(name, file, target)
        storage._remove(name, old)
        return target

    def abort(self, name: str, files: list[str], claimed: bool = False) -> None:
        """This save's uploads - every file of its token, and the train file where rank 0 had
        ``claimed`` the step (no checkpoint of it was there) - never a committed checkpoint's."""
        with contextlib.suppress(OSError):
            doomed = [
                f
                for f in self.storage._objects().get(name, {})
                if self.token in f or (claimed and f in files and f != mf.MANIFEST)
            ]
            if doomed:
                self.storage._remove(name, doomed)


class _BucketWrite:
    def __init__(self, storage: FsspecStorage, name: str):
        self.storage, self.name = storage, name

    def write(self, file: str, entry: dict[str, Any], pieces: codec.Pieces) -> None:
        self.storage._upload(self.storage._path(self.name, file), pieces)
        hooks.point("ckpt.file_written")
        if self.storage.digest(self.name, file, entry["size"]) != entry["xxh3_64"]:
            raise OSError(f"{file}: the object uploaded does not read back as written")

    def close(self) -> None:
        pass


class _BucketPending:
    """Rank 0's part of a save to a bucket: the train file once the step is taken, the manifest
    at commit, then the prefix's files that manifest does not list removed."""

    def __init__(self, target: BucketTarget, name: str):
        self.target, self.name = target, name
        self._manifest: bytes | None = None
        self._wrote: list[str] = []

    def write(self, file: str, data: bytes | memoryview | list[bytes | memoryview]) -> None:
        pieces = data if isinstance(data, list) else [data]
        if file == mf.MANIFEST:
            self._manifest = b"".join(bytes(p) for p in pieces)
            return
        self._wrote.append(file)
        _BucketWrite(self.target.storage, self.name).write(file, fmt.entry_of(pieces), pieces)

    def commit(self) -> None:
        if self._manifest is None:
            raise ValueError("commit() before the manifest was written")
        storage = self.target.storage
        storage._upload(storage._path(self.name, mf.MANIFEST), [self._manifest])
        listed = set(mf.parse(self._manifest, mf.step_of(self.name) or -1)["files"]) | {mf.MANIFEST}
        with contextlib.suppress(OSError):  # an earlier attempt's files: debris, not the checkpoint
            stale = [f for f in storage._objects().get(self.name, {}) if f not in listed]
            if stale:
                storage._remove(self.name, stale)

    def abort(self) -> None:
        self.target.abort(self.name, self._wrote, claimed=True)
