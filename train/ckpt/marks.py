"""Which checkpoints were verified, as their files were then, so that a new process need not read
them in full again.

Retention keeps the newest ``keep`` checkpoints that verify; a new process (every restart) knew
none of them, so its first save re-read up to keep-1 whole checkpoints, inside the save. Instead a
checkpoint read back in full (right after its commit, or at resume) gets a mark: a digest of its
directory as stored - every file's name, size, mtime, inode and owner. A mark is believed only
while that digest still matches (a file rewritten, replaced, truncated or touched breaks it) and
only from the marks file this job's uid owns (another user cannot plant one). What it cannot see
is bit rot under an unchanged inode: the resume still verifies every byte it loads, and falls
back to an older checkpoint if one fails.

Local filesystems only (an object store's listing has no inode to stamp): elsewhere retention
verifies as before.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

import xxhash

from train.ckpt.fs import TMP_PREFIX, plain

MARKS = ".verified.json"
MAX_BYTES = 1 << 20
log = logging.getLogger(__name__)


class Marks:
    def __init__(self, root: Path, owners: Callable[[], set[int]]):
        """``owners``: the uids whose marks file counts (asked only when one is read)."""
        self.root, self._owners = root, owners
        self._marks: dict[str, str] | None = None

    def stamp(self, name: str) -> str:
        """The checkpoint directory as stored now (OSError if it cannot be listed)."""
        parts = []
        with os.scandir(self.root / plain(name)) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                parts.append(
                    f"{entry.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_uid}:{st.st_mode}"
                )
        return xxhash.xxh3_64("/".join(parts).encode()).hexdigest()

    def _load(self) -> dict[str, str]:
        if self._marks is None:
            self._marks = self._read()
        return self._marks

    def _read(self) -> dict[str, str]:
        try:
            fd = os.open(self.root / MARKS, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in self._owners() or st.st_size > MAX_BYTES:
                return {}
            data = json.loads(os.read(fd, MAX_BYTES + 1))
        except (OSError, ValueError, RecursionError):
            return {}
        finally:
            os.close(fd)
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def holds(self, name: str) -> bool:
        """Whether ``name`` was verified and is stored exactly as it was then."""
        want = self._load().get(name)
        try:
            return want is not None and want == self.stamp(name)
        except OSError:
            return False

    def update(self, verified: dict[str, bool], existing: list[str] | None = None) -> None:
        """Mark (True) or unmark (False) checkpoints; ``existing``: forget marks of any other name.
        Never raises: a mark that could not be written costs one re-read later, nothing more."""
        marks = dict(self._load())
        try:
            for name, ok in verified.items():
                if ok:
                    marks[name] = self.stamp(name)
                else:
                    marks.pop(name, None)
            if existing is not None:
                marks = {k: v for k, v in marks.items() if k in existing}
            if marks != self._marks:
                self._write(marks)
        except OSError as e:
            log.debug("could not update %s: %s", self.root / MARKS, e)
            return
        self._marks = marks

    def _write(self, marks: dict[str, str]) -> None:
        tmp = self.root / f"{TMP_PREFIX}marks-{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(marks, f)
            os.replace(tmp, self.root / MARKS)  # readers see the old marks or the new, never half
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
