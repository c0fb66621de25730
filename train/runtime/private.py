"""Directories only this user can enter, in places anyone can write to (/tmp, /dev/shm).

Another user may pre-create the name we would use, or plant a symlink there; in a sticky
directory nobody else can rename or replace ours once it is ours, so checking it once (lstat: a
real directory, our uid, no group/other bits) is enough. Standard library only: warmstart.py
imports this before torch.
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
