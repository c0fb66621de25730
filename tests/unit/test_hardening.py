"""What another user, a failing disk or a crafted file can do to a run, and what it cannot:
checkpoints of another owner are never read nor deleted, a checkpoint is checked in every part
before anything live changes, I/O errors cost one checkpoint and never the start or a committed
save, the run's record reads anything as skipped rows."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from train import rng
from train.checkpointing import snapshot
from train.ckpt import codec
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage
from train.errors import IncompatibleCheckpointError
from train.observe import records
from train.runtime import private
from train.sampler import GlobalSampler
from train.state import CKPT_FILES, TRAIN_FILE, TrainState

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")


def make_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return TrainState(model, optimizer, scheduler, GlobalSampler(100, seed=7))


def files_of(state: TrainState) -> dict:
    files = state.state_dict()
    files[TRAIN_FILE] = {**files[TRAIN_FILE], "rng": [rng.capture()]}
    return files


def saved(root: Path, step: int, files: dict) -> CheckpointManager:
    m = CheckpointManager(LocalStorage(root), keep=3, files=CKPT_FILES)
    m.save(step, files, {"fingerprint": "fp"})
    return m


# -- 1. ownership ---------------------------------------------------------------------------------
@root_only
def test_a_checkpoint_planted_by_another_user_is_never_read_nor_deleted(tmp_path: Path, caplog) -> None:
    root = tmp_path / "checkpoints"
    m = saved(root, 10, files_of(make_state()))
    planted = root / "step_99999999"
    planted.mkdir()
    (planted / "manifest.json").write_text("{}")
    for path in (planted, planted / "manifest.json"):
        os.chown(path, NOBODY, NOBODY)
    with caplog.at_level(logging.WARNING):
        fresh = CheckpointManager(LocalStorage(root), keep=1, files=CKPT_FILES)
        assert [i.name for i in fresh.list()] == ["step_00000010"]
        assert fresh.load_latest().step == 10
        fresh.save(
            20, files_of(make_state(1)), {}
        )  # retention keeps one: step 10 goes, the planted one stays
    assert planted.is_dir() and sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_00000020",
        "step_99999999",
    ]
    said = [r.getMessage() for r in caplog.records if "step_99999999" in r.getMessage()]
    assert len(said) == 1 and f"belongs to uid {NOBODY}" in said[0], said
    assert m.storage.names()  # the original manager still lists its own


@root_only
def test_a_file_of_another_user_inside_a_checkpoint_makes_it_unusable_and_undeletable(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    m = saved(root, 10, files_of(make_state()))
    m.save(20, files_of(make_state(1)), {})
    os.chown(root / "step_00000020" / "optim.safetensors", NOBODY, NOBODY)
    fresh = CheckpointManager(LocalStorage(root), keep=1, files=CKPT_FILES)
    (newest, older) = fresh.list()
    assert not newest.valid and f"belongs to uid {NOBODY}" in newest.reason and older.valid
    assert fresh.load_latest().step == 10
    with pytest.raises(PermissionError, match="another user"):
        fresh.storage.delete("step_00000020")
    assert (root / "step_00000020" / "optim.safetensors").exists()


def test_a_directory_others_can_write_is_named(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert "mode is 1777" in private.others_can_write(shared)
    assert private.others_can_write(tmp_path) == ""


# -- 2. every part checked before anything live changes --------------------------------------------
def _check(files: dict) -> TrainState:
    target = make_state(5)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    with pytest.raises((ValueError, IncompatibleCheckpointError)) as caught:
        snapshot.check(target, files)
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())
    return caught.value


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda t: t["rng"][0].update(python=(3, (1, 2), None)), "RNG state does not load"),
        (lambda t: t["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8)), "RNG state does not load"),
        (lambda t: t["rng"][0]["numpy"].update(keys=torch.zeros(5, dtype=torch.int64)), "RNG state"),
        (lambda t: t["scheduler"].update(base_lrs=[0.1, 0.2, 0.3]), "scheduler state"),
        (lambda t: t["scheduler"].update(last_epoch="1"), "scheduler state"),
        (lambda t: t["sampler"].update(cursor=-3), "negative"),
        (lambda t: t["sampler"].update(cursor=1.5), "sampler state"),
        (lambda t: t.update(step=True), "is not a step"),
    ],
)
def test_a_train_file_that_does_not_fit_is_refused_before_anything_changes(damage, words: str) -> None:
    files = files_of(make_state())
    damage(files[TRAIN_FILE])
    assert words in str(_check(files))


def test_another_seed_is_a_permanent_error_found_before_anything_changes() -> None:
    files = files_of(make_state())
    files[TRAIN_FILE]["sampler"]["seed"] = 8
    assert isinstance(_check(files), IncompatibleCheckpointError)


def test_optimizer_state_that_does_not_fit_is_refused() -> None:
    files = files_of(make_state())
    files["optim.safetensors"]["param_groups"][0]["lr"] = "fast"
    assert "parameter group" in str(_check(files))
    files = files_of(make_state())
    files["optim.safetensors"]["state"][0]["exp_avg"] = torch.zeros(7)
    assert "wrong shape" in str(_check(files))


def test_a_checkpoint_that_fits_passes_and_restores() -> None:
    files = files_of(make_state())
    random.seed(99)
    snapshot.check(make_state(5), files)
    assert random.random() == random.Random(99).random()  # the check left the live RNG alone
    target = make_state(5)
    snapshot.restore(target, files, rank=0, world_size=1)
    assert target.sampler.cursor == 0


def test_headers_and_shapes_that_would_cost_memory_are_refused_unread() -> None:
    huge = (20 << 20).to_bytes(8, "little") + b"{" + b" " * 64
    with pytest.raises(ValueError, match="over the"):
        codec.layout(huge, size=(20 << 20) + 8)
    header = json.dumps({"x": {"dtype": "F32", "shape": [0, 1 << 45], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(ValueError, match="shape"):
        codec.layout(len(header).to_bytes(8, "little") + header)


# -- 3. I/O errors -----------------------------------------------------------------------------------
class FlakyStorage(LocalStorage):
    """A local root where reading one checkpoint fails with EIO (a bad sector, a stale NFS handle)."""

    def __init__(self, root: Path, bad: str):
        super().__init__(root)
        self.bad = bad

    def _open(self, name: str, file: str):
        if name == self.bad:
            raise OSError(errno.EIO, "Input/output error")
        return super()._open(name, file)


def test_an_io_error_costs_that_checkpoint_not_the_start(tmp_path: Path) -> None:
    m = saved(tmp_path, 10, files_of(make_state()))
    m.save(20, files_of(make_state(1)), {})
    flaky = CheckpointManager(FlakyStorage(tmp_path, "step_00000020"), keep=3, files=CKPT_FILES)
    newest, older = flaky.list()
    assert not newest.valid and "I/O error" in newest.reason and older.valid
    assert flaky.verify("step_00000020").startswith("I/O error")
    loaded = flaky.load_latest()
    assert loaded.step == 10 and loaded.skipped[0][0] == "step_00000020"


def test_retention_never_fails_a_committed_save(tmp_path: Path) -> None:
    saved(tmp_path, 10, files_of(make_state()))
    flaky = CheckpointManager(FlakyStorage(tmp_path, "step_00000010"), keep=2, files=CKPT_FILES)
    flaky.save(20, files_of(make_state(1)), {})  # re-verifying step 10 fails with EIO: the save stands
    assert "step_00000020" in flaky.storage.names()


# -- 4. the run's record ------------------------------------------------------------------------------
def test_the_record_reads_anything_as_skipped_rows(tmp_path: Path) -> None:
    good = {"kind": "train", "time": 1.0, "step": 3, "loss": 1.0}
    lines = [
        json.dumps(good),
        '{"kind": "train", "time": 1, "step": ' + "9" * 5000 + ', "loss": 1}',  # ValueError
        "[" * 100_000 + "]" * 100_000,  # RecursionError
        "\xff\xfe not json",
        json.dumps({**good, "step": 4}),
    ]
    records.path(tmp_path).write_text("\n".join(lines) + "\n")
    assert [r["step"] for r in records.read(tmp_path)] == [3, 4]
    assert records.last_step(records.read(tmp_path, limit=len(json.dumps(good)) + 2)) == 4  # the tail only


def test_the_record_is_a_regular_file_or_nothing(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps({"kind": "train", "time": 1, "step": 9, "loss": 1}) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    records.path(run).symlink_to(elsewhere)
    assert records.read(run) == []
    with pytest.raises(OSError):
        records.append(run, "end", code=0)  # never written through the link
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(records.path(fifo))
    assert records.read(fifo) == []  # and never blocks


def test_files_the_job_writes_replace_a_planted_link_instead_of_following_it(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious")
    link = tmp_path / "exit_status.json"
    link.symlink_to(target)
    private.write_replace(link, b"{}")
    assert target.read_text() == "precious" and not link.is_symlink() and link.read_text() == "{}"
    assert np.frombuffer(private.read_regular(link, 10) or b"", dtype=np.uint8).size == 2


# -- 12. no process outlives its attempt ---------------------------------------------------------------
def test_a_process_stuck_in_teardown_is_ended_by_the_kernel() -> None:
    """From teardown on, a kernel alarm bounds the process: no thread of its own could end it while
    a C destructor holds the GIL (as freeing a gloo group during an exception can)."""
    import subprocess
    import sys

    script = (
        "import ctypes\n"
        "from train.runtime import dist\n"
        "dist.TEARDOWN_S = 1\n"
        "with dist.process_group('gloo', 10):\n"
        "    pass\n"
        "ctypes.PyDLL(None).pause()  # stuck, the GIL held\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert done.returncode == -14, done.stderr[-2000:]  # SIGALRM: 142 to torchrun, "hang", retryable


# -- 6. caches the job loads code or data from -----------------------------------------------------------
def test_a_cache_someone_else_could_swap_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename what is in it: not sticky
    with pytest.raises(private.Untrusted, match="others could replace"):
        private.trusted_tree(shared / "cache", create=True)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may add, not replace ours
    assert private.trusted_tree(sticky / "cache", create=True).is_dir()
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(private.Untrusted, match="only it can write"):
        private.trusted_tree(tmp_path / "open")


@root_only
def test_a_cache_below_another_users_directory_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(private.Untrusted, match=f"belongs to uid {NOBODY}"):
        private.trusted_tree(theirs / "cache", create=True)


def test_after_a_stop_signal_the_exit_waits_only_as_long_as_torchrun_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from train.runtime import preempt

    monkeypatch.setattr(preempt, "_first_signal_at", None)
    assert preempt.grace_left() is None  # no signal: a save in flight is waited for as configured
    monkeypatch.setattr(preempt, "_first_signal_at", time.monotonic() - 10)
    left = preempt.grace_left(margin_s=5)
    assert left is not None and 14 <= left <= 15  # 30 s of torchrun's grace, 10 gone, 5 kept
    monkeypatch.setattr(preempt, "_first_signal_at", time.monotonic() - 100)
    assert preempt.grace_left() == 0
