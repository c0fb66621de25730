"""The background checkpoint writer: one save in flight, failures surface, old checkpoints survive."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from train.checkpointing.snapshot import Stager
from train.ckpt.manager import CheckpointManager
from train.ckpt.manifest import deserialize
from train.ckpt.storage import LocalStorage
from train.ckpt.writer import CheckpointWriteError, CheckpointWriter


def state(value: float) -> dict:
    return {"model.safetensors": {"w": torch.full((64,), value)}, "train.pt": {"step": int(value)}}


def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(LocalStorage(tmp_path / "checkpoints"), keep=3)


@pytest.mark.parametrize("background", [True, False])
def test_saves_commit_in_order(tmp_path: Path, background: bool) -> None:
    m = manager(tmp_path)
    writer = CheckpointWriter(m, background=background)
    for step in (1, 2, 3):
        writer.save(step, lambda s=step: state(float(s)), {})
    writer.close()
    assert [i.step for i in m.list(deep=True) if i.valid] == [3, 2, 1]
    assert writer.last_committed == 3


def test_at_most_one_save_in_flight(tmp_path: Path) -> None:
    m = manager(tmp_path)
    release, inside = threading.Event(), threading.Event()
    real_commit = m.commit

    def slow_commit(*args, **kwargs):
        inside.set()
        release.wait(10)
        return real_commit(*args, **kwargs)

    m.commit = slow_commit  # type: ignore[method-assign]
    writer = CheckpointWriter(m, background=True)
    writer.save(1, lambda: state(1.0), {})
    assert inside.wait(5)
    snapshots = []
    second = threading.Thread(target=writer.save, args=(2, lambda: snapshots.append(2) or state(2.0), {}))
    second.start()
    second.join(0.5)
    # The second save waits for the first before it even takes its snapshot (buffers are reused).
    assert second.is_alive() and snapshots == []
    release.set()
    second.join(10)
    writer.close()
    assert snapshots == [2]
    assert [i.step for i in m.list(deep=True)] == [2, 1]


def test_background_failure_surfaces_and_keeps_previous_checkpoint(tmp_path: Path) -> None:
    m = manager(tmp_path)
    writer = CheckpointWriter(m, background=True)
    writer.save(1, lambda: state(1.0), {})
    writer.wait()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    m.storage.begin = disk_full  # type: ignore[method-assign]
    writer.save(2, lambda: state(2.0), {})
    with pytest.raises(CheckpointWriteError, match="No space left"):
        writer.wait()
    writer.check()  # reported once, then cleared
    assert [(i.step, i.valid) for i in m.list(deep=True)] == [(1, True)]


def test_failed_sync_save_raises_at_once(tmp_path: Path) -> None:
    m = manager(tmp_path)
    writer = CheckpointWriter(m, background=False)
    m.storage.begin = lambda name: (_ for _ in ()).throw(OSError("read-only file system"))  # type: ignore[method-assign]
    with pytest.raises(CheckpointWriteError, match="read-only"):
        writer.save(1, lambda: state(1.0), {})


def test_rank_without_files_writes_nothing(tmp_path: Path) -> None:
    m = manager(tmp_path)
    writer = CheckpointWriter(m, background=True)
    writer.save(1, lambda: None, {})
    writer.close()
    assert m.list() == []


def test_deferred_copy_captures_the_state_before_the_next_update(tmp_path: Path) -> None:
    m = manager(tmp_path)
    writer = CheckpointWriter(m, background=True)
    weights = torch.zeros(100_000)
    stager = Stager()

    def snapshot():
        return lambda: {"model.safetensors": stager.stage({"w": weights}), "train.pt": {"step": 1}}

    writer.save(1, snapshot, {})
    writer.wait_staged()  # what the training loop does right before optimizer.step()
    weights += 1.0
    writer.close()
    loaded = m.load_latest()
    assert loaded is not None
    assert torch.equal(
        deserialize("model.safetensors", loaded.blobs["model.safetensors"])["w"], torch.zeros(100_000)
    )


def test_a_save_is_overdue_only_past_its_own_limit(tmp_path: Path) -> None:
    m = manager(tmp_path)
    release = threading.Event()
    real_commit = m.commit
    m.commit = lambda *a, **k: (release.wait(10), real_commit(*a, **k))[1]  # type: ignore[method-assign]
    writer = CheckpointWriter(m, background=True)
    writer.save(1, lambda: state(1.0), {}, limit_s=0.05)
    assert not writer.overdue() or writer.running_for() > 0.05
    threading.Event().wait(0.1)
    assert writer.overdue()
    release.set()
    writer.close()
    assert not writer.overdue()  # nothing in flight


def test_the_hung_limits_grow_with_the_bytes() -> None:
    from train.checkpointing.together import Limit

    fixed = Limit(600, "--ckpt.load-timeout-s", 80 * 10**9, 0)
    assert fixed.seconds == 600 and str(fixed) == "600s (--ckpt.load-timeout-s 600)"
    grown = Limit(600, "--ckpt.load-timeout-s", 80 * 10**9, 25)
    assert grown.seconds == 600 + 3200
    assert str(grown) == "3800s (--ckpt.load-timeout-s 600 + 80000 MB at --ckpt.slowest-mb-s 25)"
