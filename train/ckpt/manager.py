"""save / load_latest / list / verify over a Storage. Knows nothing about training.

A checkpoint is ``step_<8 digits>/`` holding named files and ``manifest.json`` (written last, with
each file's size and checksum). Rules that hold on every path, failures included:
- a committed checkpoint is never overwritten; one that fails verification is set aside when its
  step is written again, not deleted;
- older checkpoints (valid or not) are deleted only once ``keep`` newer ones are committed *and*
  verified;
- loading walks from the newest down and skips (with a warning) whatever does not verify.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from train import faults
from train.ckpt import manifest as mf
from train.ckpt.storage import Storage

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
    blobs: dict[str, bytes | memoryview]
    skipped: list[tuple[str, str]]  # newer checkpoints that did not verify, and why


class CheckpointManager:
    def __init__(self, storage: Storage, keep: int):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.storage, self.keep = storage, keep
        self._verified: set[str] = set()
        self._failed: dict[str, str] = {}

    # -- reading -----------------------------------------------------------------------------
    def _steps(self) -> list[tuple[int, str]]:
        found = ((mf.step_of(n), n) for n in self.storage.names())
        return sorted(((s, n) for s, n in found if s is not None), reverse=True)

    def _manifest(self, name: str) -> dict:
        step = mf.step_of(name)
        try:
            raw = bytes(self.storage.read(name, mf.MANIFEST))
        except FileNotFoundError:
            raw = None
        return mf.parse(raw, step if step is not None else -1)

    def read_verified(self, name: str) -> tuple[dict, dict[str, bytes]]:
        """All of a checkpoint's bytes, checked against its manifest; raises manifest.Problem."""
        manifest = self._manifest(name)
        blobs = {}
        for file in manifest["files"]:
            hashing = mf.BackgroundChecksum()
            try:
                data = self.storage.read(name, file, on_chunk=hashing.feed)
            except FileNotFoundError:
                raise mf.Problem(f"{file} is missing") from None
            mf.check_file(manifest, file, data, hashing)
            blobs[file] = data
        self._verified.add(name)
        return manifest, blobs

    def verify(self, name: str) -> str:
        """'' if the checkpoint verifies, else why not."""
        try:
            self.read_verified(name)
        except mf.Problem as p:
            return str(p)
        return ""

    def list(self, deep: bool = False) -> list[CkptInfo]:
        """Newest first. ``deep`` checks checksums; otherwise manifest and sizes only."""
        out = []
        for step, name in self._steps():
            reason, size, when = "", 0, None
            try:
                manifest = self._manifest(name)
                when = manifest.get("time")
                for file, entry in manifest["files"].items():
                    actual = self.storage.size(name, file)
                    size += actual or 0
                    if actual is None:
                        raise mf.Problem(f"{file} is missing")
                    if actual != entry["size"]:
                        raise mf.Problem(f"{file}: {actual} bytes, manifest says {entry['size']}")
                if deep:
                    reason = self.verify(name)
            except mf.Problem as p:
                reason = str(p)
            out.append(CkptInfo(name, step, not reason, reason, size, when))
        return out

    def load_latest(self) -> Loaded | None:
        skipped: list[tuple[str, str]] = []
        for step, name in self._steps():
            try:
                manifest, blobs = self.read_verified(name)
            except mf.Problem as p:
                log.warning(
                    "checkpoint %s is not usable (%s); trying the next older one",
                    self.storage.location(name),
                    p,
                )
                skipped.append((name, str(p)))
                continue
            return Loaded(step, name, self.storage.location(name), manifest, blobs, skipped)
        return None

    # -- writing -----------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
        return self.commit(step, {f: mf.serialize(f, obj) for f, obj in state.items()}, meta)

    def commit(self, step: int, blobs: dict[str, bytes], meta: dict[str, Any]) -> str:
        if not blobs:
            raise ValueError("refusing to commit a checkpoint with no files")
        name = mf.name_for(step)
        faults.set_context(save_step=step)
        if name in self.storage.names():
            if not self.verify(name):
                log.info("checkpoint %s already exists and verifies; not rewriting it", name)
                self._retain()
                return name
            moved = self.storage.set_aside(name)
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
        problem = self.verify(name)
        if problem:
            # Keep everything: the new one is suspect, so the older ones stay the fallback.
            raise OSError(f"checkpoint {name} did not verify right after writing it: {problem}")
        self._retain()
        return name

    def _retain(self) -> None:
        kept = 0
        for _, name in self._steps():
            if kept >= self.keep:
                self.storage.delete(name)
            elif self._still_valid(name):
                kept += 1

    def _still_valid(self, name: str) -> bool:
        # Verify each checkpoint once per process: a newer one that failed would otherwise be read
        # in full again on every save.
        if name not in self._verified and name not in self._failed:
            problem = self.verify(name)
            if problem:
                self._failed[name] = problem
        return name in self._verified
