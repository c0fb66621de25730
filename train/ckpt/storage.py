"""Where checkpoint directories live, and what "committed" means there.

A checkpoint is a named set of files. A write is staged under a temporary name and becomes visible
all at once on ``commit()``; until then readers never see it. On a local filesystem the commit is a
directory rename (after fsyncing every file), made durable by fsyncing the parent directory. An
object store has no rename: its commit point is the manifest, written last, and readers already
treat a checkpoint without a valid manifest as absent, so the manager above works with either.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from train import faults

TMP_PREFIX = ".tmp-"
READ_CHUNK = 4 << 20
INVALID_TAG = ".invalid-"


class PendingWrite(Protocol):
    def write(self, file: str, data: bytes | memoryview) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def names(self) -> list[str]: ...
    def begin(self, name: str) -> PendingWrite: ...
    def read(
        self, name: str, file: str, on_chunk: Callable[[memoryview], object] | None = None
    ) -> bytes | memoryview: ...
    def size(self, name: str, file: str) -> int | None: ...
    def delete(self, name: str) -> None: ...
    def set_aside(self, name: str) -> str: ...
    def clean_temporaries(self) -> list[str]: ...
    def location(self, name: str) -> str: ...


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: renames, creations)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalPendingWrite:
    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)

    def write(self, file: str, data: bytes | memoryview) -> None:
        with open(self.tmp / file, "wb") as f:
            f.write(data)
            f.flush()
            faults.point("ckpt.file_written")
            os.fsync(f.fileno())

    def commit(self) -> None:
        fsync_path(self.tmp)
        faults.point("ckpt.before_rename")
        final = self.root / self.name
        # rename() onto an existing non-empty directory fails on POSIX: a committed checkpoint is
        # never replaced by a commit.
        os.rename(self.tmp, final)
        faults.point("ckpt.after_rename")
        fsync_path(self.root)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class LocalStorage:
    def __init__(self, root: str | Path):
        # Created on first write: ranks that never write need not see this path at all.
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(TMP_PREFIX) and INVALID_TAG not in p.name
        )

    def begin(self, name: str) -> _LocalPendingWrite:
        self.root.mkdir(parents=True, exist_ok=True)
        return _LocalPendingWrite(self.root, name)

    def read(
        self, name: str, file: str, on_chunk: Callable[[memoryview], object] | None = None
    ) -> memoryview:
        """The whole file. ``on_chunk`` sees each piece as soon as it is read (in order), so a
        checksum can run alongside the rest of the read."""
        # Into uninitialised, writable memory: the fastest read, and loaded tensors can be views
        # of it instead of copies.
        with open(self.root / name / file, "rb", buffering=0) as f:
            view = memoryview(np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8))
            got = 0
            while got < len(view):
                n = f.readinto(view[got : got + READ_CHUNK])
                if not n:
                    break
                if on_chunk is not None:
                    on_chunk(view[got : got + n])
                got += n
        return view[:got]

    def size(self, name: str, file: str) -> int | None:
        try:
            return (self.root / name / file).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        # Rename first so a crash mid-delete leaves a temporary (cleaned later), never a torn
        # directory under a checkpoint's name.
        doomed = self.root / f"{TMP_PREFIX}delete-{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / name, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def set_aside(self, name: str) -> str:
        """Move an invalid checkpoint out of the way (kept for inspection, ignored by names())."""
        target = f"{name}{INVALID_TAG}{int(time.time())}-{uuid.uuid4().hex[:6]}"
        os.rename(self.root / name, self.root / target)
        return target

    def set_aside_names(self) -> list[str]:
        return (
            sorted(p.name for p in self.root.iterdir() if INVALID_TAG in p.name) if self.root.is_dir() else []
        )

    def clean_temporaries(self) -> list[str]:
        """Remove what crashed writes left behind. Call only when no write is in flight."""
        removed = []
        for p in self.root.iterdir() if self.root.is_dir() else ():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def location(self, name: str) -> str:
        return str(self.root / name)
