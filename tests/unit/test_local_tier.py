"""The node-local tier: where it lives (private, named after the run), how it is sized, and that
resume takes the newest valid checkpoint across both tiers."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from train.checkpointing import local_tier
from train.checkpointing.local_tier import LocalTier
from train.ckpt.manager import CheckpointManager, load_newest
from train.ckpt.storage import LocalStorage
from train.config import CkptConfig


def make_state(step: int) -> dict:
    return {"model.safetensors": {"w": torch.full((4,), float(step))}}


def saved(root: Path, *steps: int) -> CheckpointManager:
    m = CheckpointManager(LocalStorage(root), keep=3)
    for step in steps:
        m.save(step, make_state(step), {"fingerprint": "abc"})
    return m


def test_the_newest_step_in_either_tier_loads_and_a_broken_one_falls_back(tmp_path: Path) -> None:
    durable, local = saved(tmp_path / "durable", 10, 20), saved(tmp_path / "local", 25)
    loaded = load_newest([durable, local])
    assert loaded is not None and loaded.step == 25 and "local" in loaded.location
    # Same step in both: the durable one (first in the list) is tried first.
    saved(tmp_path / "local2", 20)
    tie = load_newest([durable, CheckpointManager(LocalStorage(tmp_path / "local2"), keep=1)])
    assert tie is not None and tie.step == 20 and "durable" in tie.location
    # The local one torn (a kill while /dev/shm was written, say): the durable 20 is used.
    (tmp_path / "local" / "step_00000025" / "model.safetensors").write_bytes(b"torn")
    fallback = load_newest([durable, local])
    assert fallback is not None and fallback.step == 20 and "durable" in fallback.location
    assert [name for name, _ in fallback.skipped] == ["step_00000025"]
    assert load_newest([CheckpointManager(LocalStorage(tmp_path / "none"), keep=1)]) is None


@pytest.fixture
def ram_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    disk = tmp_path / "shm"
    disk.mkdir(mode=0o1777)
    os.chmod(disk, 0o1777)
    monkeypatch.setattr(local_tier, "RAM_DISK", disk)
    return disk


def test_default_dir_is_private_and_named_after_the_run(tmp_path: Path, ram_disk: Path) -> None:
    cfg = CkptConfig(local_interval=5)
    first = LocalTier(cfg, tmp_path / "run-a", writes=True)
    assert first.writing and first.manager is not None
    root = Path(first.manager.storage.location(""))
    run_id = (tmp_path / "run-a" / local_tier.RUN_ID_FILE).read_text().strip()
    assert root == ram_disk / f"ftjob-{os.getuid()}" / run_id
    assert stat.S_IMODE(os.lstat(root.parent).st_mode) == 0o700
    # A restart of the same run finds the same directory; another run (or this run dir wiped and
    # started again) gets another, so it never resumes an old run's local checkpoint.
    again = LocalTier(cfg, tmp_path / "run-a", writes=True)
    assert again.manager is not None and again.manager.storage.location("") == str(root)
    other = LocalTier(cfg, tmp_path / "run-b", writes=True)
    assert other.manager is not None and other.manager.storage.location("") != str(root)
    # Ranks that do not write have no local tier; with the tier off nothing is created...
    assert LocalTier(cfg, tmp_path / "run-a", writes=False).manager is None
    off = LocalTier(CkptConfig(local_interval=0), tmp_path / "run-c", writes=True)
    assert off.manager is None and not (tmp_path / "run-c").exists()
    # ...but an earlier attempt's local checkpoints still count at resume.
    root.mkdir()
    later = LocalTier(CkptConfig(local_interval=0), tmp_path / "run-a", writes=True)
    assert not later.writing and later.manager is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant a directory owned by another uid")
def test_a_squatted_default_dir_turns_the_tier_off(tmp_path: Path, ram_disk: Path, caplog) -> None:
    squatted = ram_disk / f"ftjob-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, 65534, 65534)
    with caplog.at_level(logging.WARNING, logger="train"):
        tier = LocalTier(CkptConfig(local_interval=5), tmp_path / "run", writes=True)
    assert not tier.writing and tier.manager is None
    assert "node-local checkpoints off" in caplog.text and "belongs to uid 65534" in caplog.text


def test_a_save_that_would_crowd_the_local_filesystem_is_refused(tmp_path: Path) -> None:
    tier = LocalTier(CkptConfig(local_interval=5, local_dir=str(tmp_path / "local")), tmp_path, writes=True)
    free = local_tier.free_bytes(tmp_path)
    assert free is not None
    tier.before_save(1000)  # plenty of room
    with pytest.raises(OSError) as info:
        tier.before_save(free)
    assert info.value.errno == errno.ENOSPC and "would leave less than 10%" in str(info.value)


def test_failures_warn_and_only_repeated_ones_turn_the_tier_off(tmp_path: Path, caplog) -> None:
    tier = LocalTier(CkptConfig(local_interval=5, local_dir=str(tmp_path / "local")), tmp_path, writes=True)
    with caplog.at_level(logging.DEBUG, logger="train"):
        for _ in range(5):
            tier.failed(OSError(errno.ENOSPC, "no room"))
        assert tier.writing  # lack of room: skipped, tried again next time
        assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1  # said once
        for _ in range(local_tier.MAX_FAILURES):
            tier.failed(OSError(errno.EIO, "I/O error"))
    assert not tier.writing
    assert "no more local saves in this attempt" in caplog.text
