"""POSIX primitives under a checkpoint root: names that cannot leave it, locks a live writer
holds on its temporary, durable writes (fsync), and removing what may hold symlinks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from train.ckpt import hooks

TMP_PREFIX = ".tmp-"
DELETE_PREFIX = f"{TMP_PREFIX}delete-"
# "This filesystem cannot lock", as opposed to EWOULDBLOCK, "someone holds it".
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_held_locks: set[int] = set()


class Unreadable(Exception):
    """A checkpoint file refused unread: not a regular file, or not of the size asked for
    (``actual``: its size then)."""

    def __init__(self, reason: str, actual: int | None = None):
        super().__init__(reason)
        self.actual = actual


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: renames, creations)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain(name: str) -> str:
    # Names reach the filesystem joined to the root: one that is a path could leave it.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise Unreadable(f"{name!r} is not a plain name")
    return name


def lock(fd: int) -> bool | None:
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


def same(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def newest_mtime(path: Path) -> float:
    newest = os.stat(path, follow_symlinks=False).st_mtime
    with os.scandir(path) as entries:
        for entry in entries:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # does not follow symlinks inside
    else:
        path.unlink(missing_ok=True)  # a link or a stray file: the link itself, never its target


def write_file(
    dir_fd: int,
    file: str,
    data: bytes | memoryview | list[bytes | memoryview] | Iterable[bytes | memoryview],
    exclusive: bool = False,
) -> None:
    """A new file in the directory ``dir_fd``, durable when this returns (never through a link;
    ``exclusive``: never over a file already there, FileExistsError instead)."""

    def opener(path: str, flags: int) -> int:
        return os.open(path, flags | os.O_NOFOLLOW | (os.O_EXCL if exclusive else 0), 0o666, dir_fd=dir_fd)

    with open(plain(file), "wb", opener=opener) as f:
        for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
            f.write(piece)
        f.flush()
        hooks.point("ckpt.file_written")
        os.fsync(f.fileno())


class JoinedWrite:
    """Files written into another process's pending checkpoint (a sharded save: every rank writes
    its own shards into the one temporary directory rank 0 claimed and will commit). The directory
    must be this user's own, reached without a link."""

    def __init__(self, root: Path, tmp: str, create: bool = False):
        """``create``: make the directory if no rank has yet (its name is unguessable, agreed by
        the ranks; whoever makes it, it must be this user's)."""
        if not tmp.startswith(TMP_PREFIX):
            raise ValueError(f"{tmp!r} is not a pending checkpoint")
        if create:
            root.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(root / plain(tmp))
        self._fd = os.open(root / plain(tmp), DIR)
        if os.fstat(self._fd).st_uid != os.geteuid():
            os.close(self._fd)
            raise PermissionError(errno.EPERM, f"{root / tmp} is not this user's")

    def write(self, file: str, data: bytes | memoryview | list[bytes | memoryview]) -> None:
        write_file(self._fd, file, data)

    def write_stream(self, file: str, chunks: Iterable[bytes | memoryview]) -> None:
        """A new file of ``chunks`` as they come (a file from another node: never over one here),
        durable on return."""
        write_file(self._fd, file, chunks, exclusive=True)

    def open(self, file: str) -> int:
        """A read-only fd of a file written here (to read it back)."""
        return os.open(plain(file), os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalPendingWrite:
    def __init__(self, root: Path, name: str, tmp: str | None = None):
        """``tmp``: the temporary directory to commit, made by the ranks of a sharded save (it is
        locked here, as one this writer made)."""
        self.root, self.name = root, name
        self.tmp, self._fd = self._adopt(tmp) if tmp is not None else self._claim()

    def _adopt(self, tmp: str) -> tuple[Path, int]:
        path = self.root / plain(tmp)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        fd = os.open(path, DIR)
        try:
            if os.fstat(fd).st_uid != os.geteuid() or lock(fd) is False:
                raise OSError(errno.EPERM, f"{path} is not this job's to commit")
        except BaseException:
            os.close(fd)
            raise
        _held_locks.add(fd)
        return path, fd

    def _claim(self) -> tuple[Path, int]:
        # A cleaner may lock and delete a fresh directory in the instant before its writer locks
        # it: then the directory at that path is no longer the one locked, and we take another.
        for _ in range(5):
            tmp = self.root / f"{TMP_PREFIX}{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            fd = os.open(tmp, DIR)
            try:
                if lock(fd) is not False and same(tmp, os.fstat(fd)):
                    _held_locks.add(fd)
                    return tmp, fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise OSError(f"could not claim a temporary directory under {self.root}")

    def write(self, file: str, data: bytes | memoryview | list[bytes | memoryview]) -> None:
        """``data``: the bytes, or a list of pieces written one after the other."""
        write_file(self._fd, file, data)

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
