"""save / load_latest / list / verify over a Storage. Knows nothing about training.

A checkpoint is ``step_<8 digits>/`` holding named files and ``manifest.json`` (written last, with
each file's size and checksum). Rules that hold on every path, failures included:
- a committed checkpoint is never overwritten; one that fails verification is set aside when its
  step is written again, not deleted;
- older checkpoints (valid or not) are deleted only once ``keep`` newer ones are committed *and*
  verified;
- set-aside checkpoints (``step_<8 digits>.invalid-<time>-<id>``) are pruned by the same retention
  pass: the newest ``keep`` of them (by step, then name) are kept, and any whose step is older
  than the oldest valid checkpoint kept is deleted, so they can never fill the disk;
- loading walks from the newest down and skips (with a warning) whatever does not verify.

"Verifies" means, for checkpoints read back (somebody else may have written or changed them): the
manifest parses and lists only plain file names (``[A-Za-z0-9][A-Za-z0-9_.-]{0,127}``, no
``manifest.json``, no duplicates; exactly ``files``, if the manager was given them), every file is a
regular file of the listed size and checksum, and every file deserialises. A checkpoint that
``load_latest``'s ``validate`` rejects counts as invalid too, in this process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from train.ckpt import hooks, select
from train.ckpt import manifest as mf
from train.ckpt.marks import Marks
from train.ckpt.storage import INVALID_TAG, LocalStorage, Storage, Unreadable

log = logging.getLogger(__name__)


@dataclass
class CkptInfo:
    name: str
    step: int
    valid: bool
    reason: str  # "" when valid
    size: int
    time: float | None


@dataclass
class Loaded:
    step: int
    name: str
    location: str
    manifest: dict
    blobs: dict[str, bytes | memoryview]  # as read: what ranks broadcast
    skipped: list[tuple[str, str]]  # newer checkpoints that did not verify, and why
    objects: dict[str, Any] = field(default_factory=dict)  # each blob deserialised (views of it)


Validate = Callable[[Loaded], object]


def decode(blobs: dict[str, bytes | memoryview]) -> dict[str, Any]:
    """Every file deserialised; manifest.Problem if one does not (checksums prove who wrote a file
    only as far as the manifest can be trusted)."""
    objects = {}
    for file, data in blobs.items():
        try:
            objects[file] = mf.deserialize(file, data)
        except Exception as e:
            first = next(iter(str(e).strip().splitlines()), "") or type(e).__name__
            raise mf.Problem(f"{file} does not deserialise: {first[:200]}") from None
    return objects


class ByteCounter:
    """A total that several threads add to."""

    def __init__(self) -> None:
        self._lock, self.total = threading.Lock(), 0

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


READ = ByteCounter()  # what bytes_read() tells; a caller reading checkpoint files itself adds to it


def bytes_read() -> int:
    """Bytes this process has read from checkpoint storage, through any manager (manifests too)."""
    return READ.total


class CheckpointManager:
    def __init__(self, storage: Storage, keep: int, files: Iterable[str] | None = None):
        """``files``: the names every checkpoint must hold, exactly (None: whatever it lists)."""
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.files = None if files is None else frozenset(files)
        if self.files is not None and not (self.files and all(map(mf.plain_file_name, self.files))):
            raise ValueError(f"files must be plain file names other than {mf.MANIFEST}: {sorted(self.files)}")
        self.storage, self.keep = storage, keep
        self.streamed_checks = False  # retention re-checks by checksums alone (a sharded run's)
        self._verified: set[str] = set()
        self._failed: dict[str, str] = {}
        # What an earlier process verified (see marks.py): local filesystems only.
        self._marks = Marks(storage.root, storage.owners) if isinstance(storage, LocalStorage) else None

    # -- reading -----------------------------------------------------------------------------
    def _steps(self) -> list[tuple[int, str]]:
        found = ((mf.step_of(n), n) for n in self.storage.names())
        return sorted(((s, n) for s, n in found if s is not None), reverse=True)

    def _read(self, name: str, file: str, **how: Any) -> bytes | memoryview:
        """storage.read(), with a file refused unread as manifest.Problem."""
        try:
            data = self.storage.read(name, file, **how)
            READ.add(len(data))
            return data
        except Unreadable as e:
            if e.actual is not None and how.get("size") is not None:
                raise mf.Problem(
                    f"{file}: {e.actual} bytes, manifest says {how['size']} (truncated or torn)"
                ) from None
            raise mf.Problem(f"{file}: {e}") from None

    def _manifest(self, name: str) -> dict:
        step = mf.step_of(name)
        try:
            raw = bytes(self._read(name, mf.MANIFEST, limit=mf.MANIFEST_LIMIT))
        except FileNotFoundError:
            raw = None
        return mf.parse(raw, step if step is not None else -1, self.files)

    def manifest(self, name: str) -> dict:
        """A checkpoint's manifest, checked (not its files); raises manifest.Problem."""
        return self._manifest(name)

    def read_verified(self, name: str) -> tuple[dict, dict[str, bytes]]:
        """All of a checkpoint's bytes, checked against its manifest; raises manifest.Problem."""
        manifest = self._manifest(name)
        return manifest, {file: self._read_checked(name, manifest, file) for file in manifest["files"]}

    def read_file(self, name: str, file: str) -> bytes | memoryview:
        """One of a checkpoint's files, checked against its manifest, the others not read; raises
        manifest.Problem (also when the manifest lists no such file)."""
        manifest = self._manifest(name)
        if file not in manifest["files"]:
            raise mf.Problem(f"it holds no {file} (files: {', '.join(sorted(manifest['files']))})")
        return self._read_checked(name, manifest, file)

    def _read_checked(self, name: str, manifest: dict, file: str) -> bytes | memoryview:
        hashing = mf.BackgroundChecksum()
        hooks.point("ckpt.file_read")
        try:
            data = self._read(name, file, on_chunk=hashing.feed, size=manifest["files"][file]["size"])
        except FileNotFoundError:
            raise mf.Problem(f"{file} is missing") from None
        mf.check_file(manifest, file, data, hashing)
        return data

    def _record(self, name: str, problem: str) -> str:
        if problem:
            self._failed[name] = problem
            self._verified.discard(name)
        else:
            self._verified.add(name)
            self._failed.pop(name, None)
        if self._marks is not None:
            self._marks.update({name: not problem})
        return problem

    def record(self, name: str, problem: str) -> None:
        """What a caller found reading a checkpoint itself ("": it verified), so that retention
        does not read it again."""
        self._record(name, problem)

    def verify(self, name: str) -> str:
        """'' if the checkpoint verifies (and deserialises), else why not."""
        try:
            decode(self.read_verified(name)[1])
        except mf.Problem as p:
            return self._record(name, str(p))
        except OSError as e:  # EIO, EACCES, ESTALE: this checkpoint is unusable, nothing more
            return self._record(name, _io_error(e))
        return self._record(name, "")

    def list(self, deep: bool = False) -> list[CkptInfo]:
        """Newest first. ``deep`` checks checksums and decodes; otherwise manifest and sizes only."""
        out = []
        for step, name in self._steps():
            reason, size, when = "", 0, None
            try:
                manifest = self._manifest(name)
                when = manifest.get("time")
                for file, entry in manifest["files"].items():
                    try:
                        actual = self.storage.size(name, file)
                    except Unreadable as e:
                        raise mf.Problem(f"{file}: {e}") from None
                    size += actual or 0
                    if actual is None:
                        raise mf.Problem(f"{file} is missing")
                    if actual != entry["size"]:
                        raise mf.Problem(
                            f"{file}: {actual} bytes, manifest says {entry['size']} (truncated or torn)"
                        )
                if deep:
                    reason = self.verify(name)
            except mf.Problem as p:
                reason = str(p)
            except OSError as e:
                reason = _io_error(e)
            if not isinstance(when, (int, float)) or isinstance(when, bool):
                when = None
            out.append(CkptInfo(name, step, not reason, reason, size, when))
        return out

    def load_latest(self, validate: Callable[[Loaded], object] | None = None) -> Loaded | None:
        """The newest checkpoint that verifies, deserialises and, if given, passes ``validate``
        (which rejects one by raising manifest.Problem; any other exception propagates)."""
        return load_newest([self], validate)

    def _try_load(self, step: int, name: str, validate: Validate | None) -> Loaded | None:
        try:
            manifest, blobs = self.read_verified(name)
            location = self.storage.location(name)
            loaded = Loaded(step, name, location, manifest, blobs, [], decode(blobs))
            if validate is not None:
                validate(loaded)
        except (mf.Problem, OSError) as p:
            problem = _io_error(p) if isinstance(p, OSError) else str(p)
            log.warning(
                "checkpoint %s is not usable (%s); trying the next older one",
                self.storage.location(name),
                problem,
            )
            self._record(name, problem)
            return None
        self._record(name, "")
        return loaded

    # -- writing -----------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
        return self.commit(step, {f: mf.encode(f, obj) for f, obj in state.items()}, meta)

    def commit(self, step: int, blobs: dict[str, bytes | mf.Pieces], meta: dict[str, Any]) -> str:
        """``blobs``: each file's bytes, or its pieces (see codec.encode) - written as they are."""
        if not blobs:
            raise ValueError("refusing to commit a checkpoint with no files")
        if not all(map(mf.plain_file_name, blobs)):
            raise ValueError(f"refusing to commit files {sorted(blobs)}: not all are plain file names")
        if self.files is not None and set(blobs) != self.files:
            raise ValueError(
                f"refusing to commit files {sorted(blobs)}: this manager expects {sorted(self.files)}"
            )
        name = mf.name_for(step)
        hooks.context(save_step=step)
        if name in self.storage.names():
            # Rejected in this process (by validate, say) counts as invalid even if it verifies.
            problem = self._failed.get(name) or self.verify(name)
            if not problem:
                log.info("checkpoint %s already exists and verifies; not rewriting it", name)
                self._retain()
                return name
            moved = self.storage.set_aside(name)
            self._failed.pop(name, None)
            log.warning("checkpoint %s did not verify; moved it to %s before rewriting", name, moved)
        pending = self.storage.begin(name)
        try:
            for file, data in blobs.items():
                pending.write(file, data)
            pending.write(mf.MANIFEST, mf.build(step, blobs, meta))
            pending.commit()
        except BaseException:
            pending.abort()
            raise
        problem = self._reread(name)
        if problem:
            # Keep everything: the new one is suspect, so the older ones stay the fallback.
            raise OSError(f"checkpoint {name} did not verify right after writing it: {problem}")
        self._retain()
        return name

    def known_problem(self, name: str) -> str:
        """Why this process found checkpoint ``name`` unusable ("" if it did not)."""
        return self._failed.get(name, "")

    def committed(self, name: str) -> None:
        """A checkpoint committed by the caller itself (whose writers verified each file as they
        wrote it): known valid, and retention runs as after save()."""
        self._record(name, "")
        self._retain()

    def _retain(self) -> None:
        """Retention after a commit: whatever goes wrong in it, the commit stands (and nothing
        is deleted that was not already judged deletable)."""
        try:
            self._prune()
        except OSError as e:
            log.warning("checkpoint retention skipped this time: %s", _io_error(e))

    def _reread(self, name: str) -> str:
        """'' if what was just written reads back with the checksums of its manifest. Streamed
        where the storage can (no second copy of the checkpoint in memory); the contents were
        encoded a moment ago, so they are not decoded again."""
        digest = getattr(self.storage, "digest", None)
        if digest is None:
            return self.verify(name)
        try:
            manifest = self._manifest(name)
            for file, entry in manifest["files"].items():
                if digest(name, file, entry["size"]) != entry["xxh3_64"]:
                    raise mf.Problem(f"{file}: checksum mismatch (corrupt)")
        except (mf.Problem, Unreadable, FileNotFoundError) as p:
            return self._record(name, str(p))
        return self._record(name, "")

    def _prune(self) -> None:
        kept, oldest_kept = 0, None
        for step, name in self._steps():
            if kept >= self.keep:
                try:
                    self.storage.delete(name)
                except OSError as e:  # left for the next save's retention to try again
                    log.warning("could not delete old checkpoint %s: %s", name, _io_error(e))
            elif self._still_valid(name):
                kept, oldest_kept = kept + 1, step
        if self._marks is not None:
            self._marks.update({}, existing=self.storage.names())
        self._retain_set_aside(oldest_kept)

    def _retain_set_aside(self, oldest_kept: int | None) -> None:
        found = ((mf.step_of(n.partition(INVALID_TAG)[0]), n) for n in self.storage.set_aside_names())
        aside = sorted(((s, n) for s, n in found if s is not None), reverse=True)
        for i, (step, name) in enumerate(aside):
            if i >= self.keep or (oldest_kept is not None and step < oldest_kept):
                try:
                    self.storage.delete(name)
                except OSError as e:  # only kept for inspection: never worth failing a save over
                    log.warning("could not delete set-aside checkpoint %s: %s", name, e)

    def _still_valid(self, name: str) -> bool:
        # Verify each checkpoint once per process (a newer one that failed would otherwise be read
        # in full again on every save), and not at all if an earlier one did and nothing changed.
        if name not in self._verified and name not in self._failed:
            if self._marks is not None and self._marks.holds(name):
                self._verified.add(name)
            else:  # a sharded run's are as big as the model: streamed, never decoded whole
                (self._reread if self.streamed_checks else self.verify)(name)
        return name in self._verified


def _io_error(e: BaseException) -> str:
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return f"I/O error: {reason}" + (f" ({e.filename})" if getattr(e, "filename", None) else "")


def load_newest(managers: list[CheckpointManager], validate: Validate | None = None) -> Loaded | None:
    """load_latest over several tiers (say a fast node-local one and a durable one): the copy
    train/ckpt/select.py picks (the newest step in any tier; on equal steps the earlier manager in
    the list first), then the next it picks whenever one does not load."""
    listed = {m.storage.location(i.name): (tier, m, i) for tier, m in enumerate(managers) for i in m.list()}
    order = [select.Listed(i.step, 0, tier, where, i.valid) for where, (tier, _, i) in listed.items()]
    excluded: set[tuple[int, str]] = set()
    loaded = None
    while loaded is None and (pick := select.newest(order, excluded)) is not None:
        _, manager, info = listed[pick.location]
        loaded = manager._try_load(info.step, info.name, validate)
        excluded.add((0, pick.location))
    if loaded is None:
        return None
    skipped = []  # newest first: every copy unusable as listed above the one loaded, or failed when read
    for where, (_, manager, info) in sorted(listed.items(), key=lambda kv: (-kv[1][2].step, kv[1][0])):
        if where == loaded.location:
            continue
        if (0, where) in excluded or (not info.valid and info.step > loaded.step):
            if not info.valid:
                manager._record(info.name, info.reason)
                log.warning("checkpoint %s is not usable (%s)", where, info.reason)
            skipped.append((info.name, manager._failed.get(info.name, info.reason)))
    loaded.skipped = skipped
    return loaded
