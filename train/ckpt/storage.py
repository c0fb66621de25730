"""Where checkpoint directories live, and what "committed" means there.

A checkpoint is a named set of files. A write is staged under a temporary name and becomes visible
all at once on ``commit()``; until then readers never see it. On a local filesystem the commit is a
directory rename (after fsyncing every file), made durable by fsyncing the parent directory. An
object store has no rename: its commit point is the manifest, written last, and readers already
treat a checkpoint without a valid manifest as absent, so the manager above works with either.

What is under the root is untrusted: another user, a stale job or a tamperer may have put anything
there. So reads open only regular files, relative to their checkpoint directory, never through a
symlink and never blocking (a FIFO), and refuse before allocating a file whose size is not the one
expected; a checkpoint directory that is a symlink is not listed (so never deleted through). A
pending write holds an exclusive flock on its temporary directory until commit or abort, and
clean_temporaries() leaves alone what it cannot lock: a writer that still runs (another attempt's,
even a stale one) keeps its temporary. Where the filesystem has no flock, only temporaries untouched
for an hour are removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import xxhash

from train.ckpt import hooks
from train.ckpt.fs import (
    DELETE_PREFIX,
    DIR,
    TMP_PREFIX,
    JoinedWrite,
    LocalPendingWrite,
    Unreadable,
    fsync_path,
    lock,
    newest_mtime,
    plain,
    remove,
)

__all__ = [
    "DELETE_PREFIX",
    "INVALID_TAG",
    "TMP_PREFIX",
    "LocalStorage",
    "Storage",
    "Unreadable",
    "fsync_path",
]

READ_CHUNK = 4 << 20
IOV_MAX = 1024  # destinations one preadv takes (Linux's limit)
INVALID_TAG = ".invalid-"
UNLOCKED_MAX_AGE_S = 3600.0
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
log = logging.getLogger(__name__)


OnChunk = Callable[[memoryview], object]  # a piece of a file read, in order
Into = Callable[[int], memoryview | None] | None  # where the bytes from an offset on may be read to


class PendingWrite(Protocol):
    def write(self, file: str, data: bytes | memoryview | list[bytes | memoryview]) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def names(self) -> list[str]: ...
    def set_aside_names(self) -> list[str]: ...
    def begin(self, name: str) -> PendingWrite: ...
    def read(
        self,
        name: str,
        file: str,
        on_chunk: Callable[[memoryview], object] | None = None,
        size: int | None = None,
        limit: int | None = None,
    ) -> bytes | memoryview: ...
    def stream(self, name: str, file: str, size: int, on_chunk: OnChunk, into: Into = None) -> None: ...
    def size(self, name: str, file: str) -> int | None: ...
    def delete(self, name: str) -> None: ...
    def set_aside(self, name: str) -> str: ...
    def clean_temporaries(self) -> list[str]: ...
    def location(self, name: str) -> str: ...


def check_size(actual: int, size: int | None, limit: int | None) -> None:
    """Unreadable unless ``actual`` is ``size`` (if given) and at most ``limit`` (if given)."""
    if size is not None and actual != size:
        raise Unreadable(f"{actual} bytes, expected {size}", actual)
    if limit is not None and actual > limit:
        raise Unreadable(f"{actual} bytes, more than the {limit} allowed", actual)


class RangedReads:
    """read_range() for a storage that has read_into()."""

    def read_into(self, name: str, file: str, offset: int, views: list[memoryview]) -> None:
        raise NotImplementedError

    def read_range(
        self, name: str, file: str, offset: int, length: int, into: memoryview | None = None
    ) -> memoryview:
        """``length`` bytes of the file from ``offset`` (a sharded checkpoint's reader takes only
        the rows it needs), into the start of ``into`` if given (a buffer reused from one read to
        the next costs no fresh pages); Unreadable if the file ends before."""
        view = into[:length] if into is not None else memoryview(np.empty(length, dtype=np.uint8))
        self.read_into(name, file, offset, [view])
        return view


class LocalStorage(RangedReads):
    def __init__(self, root: str | Path):
        # Created on first write: ranks that never write need not see this path at all.
        self.root = Path(root)
        self._owners: set[int] | None = None
        self._warned: set[str] = set()

    def owners(self) -> set[int]:
        """The uids whose entries count as this job's: this process's, and the owner a file it
        creates under the root gets (NFS with root squashing maps root to another uid)."""
        if self._owners is None:
            owners = {os.getuid()}
            probe = self.root / f".owner-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    owners.add(os.fstat(fd).st_uid)
                finally:
                    os.close(fd)
                    os.unlink(probe)
            self._owners = owners
        return self._owners

    def _foreign(self, name: str, uid: int) -> bool:
        """Whether an entry of ``uid`` is someone else's; says so once per entry and process."""
        if uid in self.owners():
            return False
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "%s belongs to uid %d, not to this job (uid %s): ignored, never read or deleted",
                self.root / name,
                uid,
                "/".join(map(str, sorted(self.owners()))),
            )
        return True

    def _dirs(self) -> Iterator[str]:
        """Real directories under the root that are this job's; symlinks to one are not, and
        another user's (planted in a shared root) are neither listed nor deleted."""
        try:
            with os.scandir(self.root) as entries:
                found = [
                    e.name
                    for e in entries
                    if e.is_dir(follow_symlinks=False)
                    and not self._foreign(e.name, e.stat(follow_symlinks=False).st_uid)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return
        yield from found

    def names(self) -> list[str]:
        hooks.point("ckpt.list")
        return sorted(n for n in self._dirs() if not n.startswith(TMP_PREFIX) and INVALID_TAG not in n)

    def set_aside_names(self) -> list[str]:
        return sorted(n for n in self._dirs() if not n.startswith(TMP_PREFIX) and INVALID_TAG in n)

    def begin(self, name: str, tmp: str | None = None) -> LocalPendingWrite:
        """A new checkpoint ``name``, written into a temporary directory of its own, or into
        ``tmp`` (a sharded save's, whose ranks write into it: see join())."""
        self.root.mkdir(parents=True, exist_ok=True)
        return LocalPendingWrite(self.root, plain(name), tmp)

    def _open(self, name: str, file: str) -> tuple[int, os.stat_result]:
        """A read-only fd of a regular file in checkpoint ``name``, and its fstat."""
        try:
            dir_fd = os.open(self.root / plain(name), DIR)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Unreadable(f"{name} is not a directory (a symlink?)") from None
            raise
        try:
            # lstat first: opening a device or FIFO at all may have effects; fstat after, for the
            # file actually opened.
            if not stat.S_ISREG(os.stat(plain(file), dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise Unreadable("not a regular file")
            try:
                fd = os.open(file, _FILE, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENXIO):
                    raise Unreadable("not a regular file") from None
                raise
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise Unreadable("not a regular file")
        if st.st_uid not in self.owners():
            os.close(fd)
            raise Unreadable(f"it belongs to uid {st.st_uid}, not to this job")
        return fd, st

    def digest(self, name: str, file: str, size: int) -> str:
        """xxh3_64 of the file, read in pieces through one small buffer (verifying a checkpoint
        just written must not hold a second copy of it in memory); Unreadable as read() is."""
        fd, st = self._open(name, file)
        try:
            if st.st_size != size:
                raise Unreadable(f"{st.st_size} bytes, expected {size}", actual=st.st_size)
            hasher, buf = xxhash.xxh3_64(), bytearray(READ_CHUNK)
            with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
                while n := f.readinto(buf):
                    hasher.update(memoryview(buf)[:n])
            return hasher.hexdigest()
        finally:
            os.close(fd)

    def read(
        self,
        name: str,
        file: str,
        on_chunk: Callable[[memoryview], object] | None = None,
        size: int | None = None,
        limit: int | None = None,
    ) -> memoryview:
        """The whole file. ``on_chunk`` sees each piece as soon as it is read (in order), so a
        checksum can run alongside the rest of the read. ``size``: the size it must have, and
        ``limit``: the most it may have; otherwise Unreadable, before allocating anything."""
        fd, st = self._open(name, file)
        with open(fd, "rb", buffering=0) as f:
            check_size(st.st_size, size, limit)
            # Into uninitialised, writable memory: the fastest read, and loaded tensors can be
            # views of it instead of copies.
            view = memoryview(np.empty(st.st_size, dtype=np.uint8))
            got = 0
            while got < len(view):
                n = f.readinto(view[got : got + READ_CHUNK])
                if not n:
                    break
                if on_chunk is not None:
                    on_chunk(view[got : got + n])
                got += n
        return view[:got]

    def stream(self, name: str, file: str, size: int, on_chunk: OnChunk, into: Into = None) -> None:
        """The file's bytes in order, through one reused buffer of READ_CHUNK bytes: never the whole
        file in memory. ``into(offset)``: where the bytes from ``offset`` on may be read straight to
        (a writable view, filled from its start), or None (the buffer); ``on_chunk`` then gets a
        view of that memory. Unreadable as read() is, and if the file ends early."""
        hooks.point("ckpt.file_read")
        fd, st = self._open(name, file)
        with open(fd, "rb", buffering=0) as f:
            check_size(st.st_size, size, None)
            buf = memoryview(np.empty(max(min(READ_CHUNK, size), 1), dtype=np.uint8))
            got = 0
            while got < size:
                dest = into(got) if into is not None else None
                target = dest if dest is not None and len(dest) else buf
                n = f.readinto(target[: min(len(target), size - got)])
                if not n:
                    raise Unreadable(f"{got} of {size} bytes", actual=got)
                on_chunk(target[:n])
                got += n

    def read_into(self, name: str, file: str, offset: int, views: list[memoryview]) -> None:
        """The file's bytes from ``offset`` on, scattered over ``views`` in order (one system call
        for many destinations: each byte is copied once, straight where it is kept); Unreadable if
        the file ends before they are full."""
        fd, st = self._open(name, file)
        try:
            length = sum(len(v) for v in views)
            if offset + length > st.st_size:
                raise Unreadable(f"{st.st_size} bytes, read up to {offset + length}", actual=st.st_size)
            todo, i, got = [v for v in views if len(v)], 0, 0
            while i < len(todo):
                n = os.preadv(fd, todo[i : i + IOV_MAX], offset + got)
                if not n:
                    raise Unreadable(f"{offset + got} of {st.st_size} bytes", actual=offset + got)
                got += n
                while i < len(todo) and n >= len(todo[i]):  # skip what is full, go on inside a partial one
                    n -= len(todo[i])
                    i += 1
                if n:
                    todo[i] = todo[i][n:]
        finally:
            os.close(fd)

    def join(self, tmp: str) -> JoinedWrite:
        """Write into the pending checkpoint ``tmp`` of a sharded save (made by whichever rank
        comes first; one rank commits it: begin(name, tmp))."""
        return JoinedWrite(self.root, tmp, create=True)

    def size(self, name: str, file: str) -> int | None:
        try:
            fd, st = self._open(name, file)
        except FileNotFoundError:
            return None
        os.close(fd)
        return st.st_size

    def delete(self, name: str) -> None:
        path = self.root / plain(name)
        foreign = sorted(
            e.name for e in os.scandir(path) if e.stat(follow_symlinks=False).st_uid not in self.owners()
        )
        if foreign:  # another user's file: never deleted (OSError: the caller keeps the checkpoint)
            raise PermissionError(
                errno.EPERM, f"{path} holds {foreign[0]!r} of another user; not deleting it"
            )
        # Rename first so a crash mid-delete leaves a temporary (cleaned later), never a torn
        # directory under a checkpoint's name.
        doomed = self.root / f"{DELETE_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / plain(name), doomed)
        remove(doomed)

    def set_aside(self, name: str) -> str:
        """Move an invalid checkpoint out of the way (kept for inspection, ignored by names())."""
        target = f"{name}{INVALID_TAG}{int(time.time())}-{uuid.uuid4().hex[:6]}"
        os.rename(self.root / plain(name), self.root / target)
        return target

    def clean_temporaries(self) -> list[str]:
        """Remove what crashed writes and deletes left behind; the temporary of a write still in
        progress (in any process) stays. Returns the names removed."""
        removed = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            if not entry.name.startswith(TMP_PREFIX):
                continue
            if self._foreign(entry.name, entry.stat(follow_symlinks=False).st_uid):
                continue
            path = self.root / entry.name
            # A delete's temporary was renamed from a committed checkpoint: nobody writes to it.
            if entry.name.startswith(DELETE_PREFIX) or not entry.is_dir(follow_symlinks=False):
                remove(path)
            elif not self._remove_abandoned(path):
                continue
            removed.append(entry.name)
        return removed

    @staticmethod
    def _remove_abandoned(path: Path) -> bool:
        try:
            fd = os.open(path, DIR)
        except OSError:
            return False  # gone already, or no longer a directory
        try:
            locked = lock(fd)
            if locked is False:
                return False
            if locked is None:
                try:
                    if time.time() - newest_mtime(path) < UNLOCKED_MAX_AGE_S:
                        return False
                except FileNotFoundError:
                    return False
            shutil.rmtree(path, ignore_errors=True)  # still holding the lock: no writer can claim it
            return True
        finally:
            os.close(fd)

    def location(self, name: str) -> str:
        return str(self.root / name)
