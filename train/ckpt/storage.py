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
import fcntl
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

TMP_PREFIX = ".tmp-"
DELETE_PREFIX = f"{TMP_PREFIX}delete-"
READ_CHUNK = 4 << 20
INVALID_TAG = ".invalid-"
UNLOCKED_MAX_AGE_S = 3600.0
# "This filesystem cannot lock", as opposed to EWOULDBLOCK, "someone holds it".
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_held_locks: set[int] = set()


class Unreadable(Exception):
    """A checkpoint file refused unread: not a regular file, or not of the size asked for
    (``actual``: its size then)."""

    def __init__(self, reason: str, actual: int | None = None):
        super().__init__(reason)
        self.actual = actual


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


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: renames, creations)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(name: str) -> str:
    # Names reach the filesystem joined to the root: one that is a path could leave it.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise Unreadable(f"{name!r} is not a plain name")
    return name


def _lock(fd: int) -> bool | None:
    """Try to lock exclusively: True if locked, False if someone holds it, None if unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise
    return True


def _close_inherited_locks() -> None:
    # A forked child (a DataLoader worker) shares the lock; were it to outlive a killed writer,
    # the writer's temporary would look alive. Closing the child's copy leaves the parent's lock.
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _is(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _newest_mtime(path: Path) -> float:
    newest = os.stat(path, follow_symlinks=False).st_mtime
    with os.scandir(path) as entries:
        for entry in entries:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # does not follow symlinks inside
    else:
        path.unlink(missing_ok=True)  # a link or a stray file: the link itself, never its target


class _LocalPendingWrite:
    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.tmp, self._fd = self._claim()

    def _claim(self) -> tuple[Path, int]:
        # A cleaner may lock and delete a fresh directory in the instant before its writer locks
        # it: then the directory at that path is no longer the one locked, and we take another.
        for _ in range(5):
            tmp = self.root / f"{TMP_PREFIX}{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            fd = os.open(tmp, _DIR)
            try:
                if _lock(fd) is not False and _is(tmp, os.fstat(fd)):
                    _held_locks.add(fd)
                    return tmp, fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OSError(f"could not claim a temporary directory under {self.root}")

    def _open(self, path: str, flags: int) -> int:
        return os.open(path, flags | os.O_NOFOLLOW, 0o666, dir_fd=self._fd)

    def write(self, file: str, data: bytes | memoryview | list[bytes | memoryview]) -> None:
        """``data``: the bytes, or a list of pieces written one after the other."""
        with open(_plain(file), "wb", opener=self._open) as f:
            for piece in data if isinstance(data, list) else [data]:
                f.write(piece)
            f.flush()
            hooks.point("ckpt.file_written")
            os.fsync(f.fileno())

    def commit(self) -> None:
        os.fsync(self._fd)
        hooks.point("ckpt.before_rename")
        final = self.root / self.name
        # rename() onto an existing non-empty directory fails on POSIX: a committed checkpoint is
        # never replaced by a commit.
        os.rename(self.tmp, final)
        hooks.point("ckpt.after_rename")
        fsync_path(self.root)
        self._release()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._fd >= 0:
            _held_locks.discard(self._fd)
            os.close(self._fd)
            self._fd = -1


class LocalStorage:
    def __init__(self, root: str | Path):
        # Created on first write: ranks that never write need not see this path at all.
        self.root = Path(root)

    def _dirs(self) -> Iterator[str]:
        """Real directories under the root; symlinks to one are not."""
        try:
            with os.scandir(self.root) as entries:
                yield from [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return

    def names(self) -> list[str]:
        return sorted(n for n in self._dirs() if not n.startswith(TMP_PREFIX) and INVALID_TAG not in n)

    def set_aside_names(self) -> list[str]:
        return sorted(n for n in self._dirs() if not n.startswith(TMP_PREFIX) and INVALID_TAG in n)

    def begin(self, name: str) -> _LocalPendingWrite:
        self.root.mkdir(parents=True, exist_ok=True)
        return _LocalPendingWrite(self.root, _plain(name))

    def _open(self, name: str, file: str) -> tuple[int, os.stat_result]:
        """A read-only fd of a regular file in checkpoint ``name``, and its fstat."""
        try:
            dir_fd = os.open(self.root / _plain(name), _DIR)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Unreadable(f"{name} is not a directory (a symlink?)") from None
            raise
        try:
            # lstat first: opening a device or FIFO at all may have effects; fstat after, for the
            # file actually opened.
            if not stat.S_ISREG(os.stat(_plain(file), dir_fd=dir_fd, follow_symlinks=False).st_mode):
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

    def size(self, name: str, file: str) -> int | None:
        try:
            fd, st = self._open(name, file)
        except FileNotFoundError:
            return None
        os.close(fd)
        return st.st_size

    def delete(self, name: str) -> None:
        # Rename first so a crash mid-delete leaves a temporary (cleaned later), never a torn
        # directory under a checkpoint's name.
        doomed = self.root / f"{DELETE_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / _plain(name), doomed)
        _remove(doomed)

    def set_aside(self, name: str) -> str:
        """Move an invalid checkpoint out of the way (kept for inspection, ignored by names())."""
        target = f"{name}{INVALID_TAG}{int(time.time())}-{uuid.uuid4().hex[:6]}"
        os.rename(self.root / _plain(name), self.root / target)
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
            path = self.root / entry.name
            # A delete's temporary was renamed from a committed checkpoint: nobody writes to it.
            if entry.name.startswith(DELETE_PREFIX) or not entry.is_dir(follow_symlinks=False):
                _remove(path)
            elif not self._remove_abandoned(path):
                continue
            removed.append(entry.name)
        return removed

    @staticmethod
    def _remove_abandoned(path: Path) -> bool:
        try:
            fd = os.open(path, _DIR)
        except OSError:
            return False  # gone already, or no longer a directory
        try:
            locked = _lock(fd)
            if locked is False:
                return False
            if locked is None:
                try:
                    if time.time() - _newest_mtime(path) < UNLOCKED_MAX_AGE_S:
                        return False
                except FileNotFoundError:
                    return False
            shutil.rmtree(path, ignore_errors=True)  # still holding the lock: no writer can claim it
            return True
        finally:
            os.close(fd)

    def location(self, name: str) -> str:
        return str(self.root / name)
