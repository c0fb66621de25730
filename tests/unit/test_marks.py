"""The verified marks (train/ckpt/marks.py): a new process's first save does not read the kept
checkpoints again, unless one changed since it was verified or the marks are not this job's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from train.ckpt import hooks
from train.ckpt.manager import CheckpointManager
from train.ckpt.marks import MARKS
from train.ckpt.storage import LocalStorage


def state(step: int) -> dict:
    return {"model.safetensors": {"w": torch.full((64,), float(step))}, "train.json": {"step": step}}


@pytest.fixture
def reads() -> Iterator[list[str]]:
    """Every checkpoint file read in full (the manager's read point), in order."""
    seen: list[str] = []
    hooks.install(lambda name: seen.append(name) if name == "ckpt.file_read" else None, lambda **_: None)
    yield seen
    hooks.install(lambda name: None, lambda **_: None)


def saved(root: Path, steps: range) -> None:
    manager = CheckpointManager(LocalStorage(root), keep=3)
    for step in steps:
        manager.save(step, state(step), {})


def test_a_new_process_first_save_reads_nothing_already_verified(tmp_path: Path, reads: list[str]) -> None:
    saved(tmp_path, range(1, 4))
    reads.clear()
    restarted = CheckpointManager(LocalStorage(tmp_path), keep=3)  # a restart: nothing known in memory
    restarted.save(4, state(4), {})
    assert reads == [], "the kept checkpoints were read again"
    assert [i.step for i in restarted.list()] == [4, 3, 2]


def test_a_checkpoint_changed_since_it_was_verified_is_read_again(tmp_path: Path, reads: list[str]) -> None:
    saved(tmp_path, range(1, 4))
    weights = tmp_path / "step_00000002" / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # rewritten: another inode, mtime
    reads.clear()
    restarted = CheckpointManager(LocalStorage(tmp_path), keep=3)
    restarted.save(4, state(4), {})
    assert reads  # step 2 was read in full, found corrupt: not counted, so step 1 is kept too
    assert [i.step for i in restarted.list()] == [4, 3, 2, 1]


def test_marks_another_user_owns_are_not_believed(tmp_path: Path, reads: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the marks file to another uid")
    saved(tmp_path, range(1, 4))
    os.chown(tmp_path / MARKS, 12345, 12345)
    reads.clear()
    CheckpointManager(LocalStorage(tmp_path), keep=3).save(4, state(4), {})
    assert reads, "a marks file of another uid was believed"


def test_a_garbled_marks_file_is_only_a_re_read(tmp_path: Path, reads: list[str]) -> None:
    saved(tmp_path, range(1, 4))
    (tmp_path / MARKS).write_text("{not json")
    reads.clear()
    restarted = CheckpointManager(LocalStorage(tmp_path), keep=3)
    restarted.save(4, state(4), {})
    assert reads and [i.step for i in restarted.list()] == [4, 3, 2]
