"""Directories only this user can enter, in places anyone can write to (/tmp, /dev/shm), and
files read and written where someone else might have been first (a run dir).

Another user may pre-create the name we would use, or plant a symlink there; in a sticky
directory nobody else can rename or replace ours once it is ours, so checking it once (lstat: a
real directory, our uid, no group/other bits) is enough. Files are opened without following links,
read only if regular and only up to a limit, and written under a fresh name, then renamed. Standard
library only: warmstart.py imports this before torch.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


class Untrusted(Exception):
    """The directory is not private to this user."""


def private_dir(path: Path, create: bool) -> Path:
    """``path``, made (0700) if asked; raises Untrusted unless it is a real directory (not a
    symlink) that this user owns and nobody else can enter."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise Untrusted(f"{path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Untrusted(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise Untrusted(f"{path} belongs to uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o077:
        raise Untrusted(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; others may enter it")
    return path


# -- files in a directory someone else may write to (a run dir, a shared checkpoint root) ----------
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_regular(path: Path, limit: int, tail: bool = False) -> bytes | None:
    """At most ``limit`` bytes of a regular file (its last ones if ``tail``), never through a
    symlink and never blocking (a FIFO); None if it is missing or not a regular file."""
    try:
        fd = os.open(path, _READ)
    except OSError:  # missing, a symlink (ELOOP), a FIFO with no writer, not ours to read
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if tail and st.st_size > limit:
            f.seek(st.st_size - limit)
        return f.read(limit)


def append_fd(path: Path, mode: int = 0o644) -> int:
    """A file opened for appending, never through a symlink (OSError if ``path`` is one)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def write_replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``path`` replaced at once by ``data``: written to a fresh name beside it (O_EXCL, so never
    into a file or link someone planted there), then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def others_can_write(path: Path) -> str:
    """Why users other than this one could add or replace entries in directory ``path`` ("": they
    cannot, or it does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    if st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"its mode is {stat.S_IMODE(st.st_mode):o} (group or others may write)"
    return ""


def trusted_tree(path: Path, create: bool = False) -> Path:
    """``path``, made (0700) if asked, once nobody else could swap it or what it holds: it is a
    real directory of this user's that others cannot write, and every directory above it is this
    user's or root's and, where others may write it, sticky (/tmp). Raises Untrusted otherwise.
    For caches the job loads code or data from (compiled kernels, a prepared corpus)."""
    path = Path(os.path.abspath(path))
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    _own_dir(path)
    for parent in path.parents:
        st = os.stat(parent)  # the directory a link leads to is what another user could swap
        if st.st_uid not in (os.getuid(), 0):
            raise Untrusted(f"{parent} belongs to uid {st.st_uid}, who could replace {path}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise Untrusted(f"{parent} has mode {stat.S_IMODE(st.st_mode):o}: others could replace {path}")
    return path


def _own_dir(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise Untrusted(f"{path} is not a directory of uid {os.getuid()}'s that only it can write")
