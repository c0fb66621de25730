"""train.ckpt: naming, manifests, and CheckpointManager over LocalStorage, crashes included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from train import rng
from train.checkpointing.snapshot import Snapshots, restore
from train.ckpt import fs as fs_mod
from train.ckpt import manifest as mf
from train.ckpt import storage as storage_mod
from train.ckpt.manager import CheckpointManager, decode
from train.ckpt.marks import MARKS
from train.ckpt.storage import INVALID_TAG, TMP_PREFIX, LocalStorage
from train.errors import IncompatibleCheckpointError
from train.sampler import GlobalSampler
from train.state import MODEL_FILE, OPTIM_FILE, TRAIN_FILE, TrainState

REPO = Path(__file__).resolve().parents[2]


# -- helpers --------------------------------------------------------------------------------------


def make_state(step: int) -> dict:
    """Small checkpoint contents that differ per step."""
    g = torch.Generator().manual_seed(step)
    return {
        "model.safetensors": {
            "layer.weight": torch.randn(4, 3, generator=g),
            "layer.bias": torch.full((3,), float(step)),
        },
        "optim.pt": {
            "state": {0: {"exp_avg": torch.randn(4, 3, generator=g), "step": torch.tensor(float(step))}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "train.pt": {"step": step, "sampler": {"cursor": step * 8, "seed": 1, "num_samples": 100}},
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def assert_holds(blobs: dict[str, bytes], state: dict) -> None:
    assert set(blobs) == set(state)
    for file, expected in state.items():
        assert_same(mf.deserialize(file, blobs[file]), expected)


def manager(root: Path, keep: int = 3) -> CheckpointManager:
    return CheckpointManager(LocalStorage(root), keep=keep)


def save_steps(m: CheckpointManager, *steps: int) -> None:
    for step in steps:
        m.save(step, make_state(step), {"fingerprint": "abc"})


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and INVALID_TAG not in p.name)


def snapshot_tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# Ways to break a committed checkpoint, and words the reason must contain.
def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(d: Path) -> None:
    f = d / "optim.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _delete(d: Path) -> None:
    (d / "train.pt").unlink()


def _garbage_manifest(d: Path) -> None:
    (d / mf.MANIFEST).write_bytes(b'{"format": 1, "step": \x00\xff garbage')


def _missing_manifest(d: Path) -> None:
    (d / mf.MANIFEST).unlink()


CORRUPTIONS = {
    "truncate": (_truncate, "truncated"),
    "flip": (_flip, "checksum"),
    "delete": (_delete, "train.pt is missing"),
    "garbage_manifest": (_garbage_manifest, "not valid JSON"),
    "missing_manifest": (_missing_manifest, "no manifest.json"),
}


@pytest.fixture
def keep_rng():
    """snapshot.restore() sets the global RNGs; put them back so tests stay independent."""
    state = rng.capture()
    yield
    rng.restore(state)


# -- naming and manifest --------------------------------------------------------------------------


@pytest.mark.parametrize("step", [0, 1, 42, 12345678, 99_999_999])
def test_name_round_trip(step):
    name = mf.name_for(step)
    assert name == f"step_{step:08d}"
    assert mf.step_of(name) == step


def test_names_sort_by_step():
    steps = [3, 10, 100, 9, 1000]
    assert sorted(mf.name_for(s) for s in steps) == [mf.name_for(s) for s in sorted(steps)]


@pytest.mark.parametrize(
    "name",
    [
        "step_1",
        "step_0000001",
        "step_00000001.invalid-123",
        ".tmp-step_00000001-1-ab",
        "step_0000000a",
        "latest",
        "step_00000001x",
    ],
)
def test_step_of_rejects_other_names(name):
    assert mf.step_of(name) is None


def test_serialize_round_trip():
    state = make_state(4)
    for file, obj in state.items():
        assert_same(mf.deserialize(file, mf.serialize(file, obj)), obj)


class NotData:
    pass


def test_deserialize_refuses_code():
    blob = mf.serialize("train.pt", {"x": NotData()})
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl|global"):
        mf.deserialize("train.pt", blob)


def test_manifest_build_and_parse():
    blobs = {"b.pt": b"hello", "a.safetensors": b"\x00" * 10}
    raw = mf.build(7, blobs, {"fingerprint": "f00", "world_size": 2})
    manifest = mf.parse(raw, 7)
    assert manifest["format"] == mf.FORMAT_VERSION
    assert manifest["step"] == 7
    assert manifest["fingerprint"] == "f00"
    assert manifest["world_size"] == 2
    assert manifest["torch"] == torch.__version__
    assert set(manifest["files"]) == {"a.safetensors", "b.pt"}
    assert manifest["files"]["b.pt"] == {"size": 5, "xxh3_64": mf.checksum(b"hello")}
    for file, data in blobs.items():
        mf.check_file(manifest, file, data)


@pytest.mark.parametrize(
    "raw,words",
    [
        (None, "no manifest.json"),
        (b"\x00\x01 not json", "not valid JSON"),
        (b"[1, 2]", "no file list"),
        (b'{"format": 1, "step": 7}', "no file list"),
        (b'{"format": 99, "step": 7, "files": {}}', "format 99"),
        (b'{"format": 1, "step": 8, "files": {}}', "step 8"),
    ],
)
def test_manifest_parse_problems(raw, words):
    with pytest.raises(mf.Problem) as info:
        mf.parse(raw, 7)
    assert words in str(info.value)


def test_check_file_problems():
    manifest = mf.parse(mf.build(1, {"f.pt": b"abcdef"}, {}), 1)
    with pytest.raises(mf.Problem, match="truncated"):
        mf.check_file(manifest, "f.pt", b"abc")
    with pytest.raises(mf.Problem, match="checksum"):
        mf.check_file(manifest, "f.pt", b"abcdeg")


# -- save / list / load ---------------------------------------------------------------------------


def test_empty_run_dir_loads_nothing(tmp_path):
    m = manager(tmp_path)
    assert m.load_latest() is None
    assert m.list() == []


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        CheckpointManager(LocalStorage(tmp_path), keep=0)


def test_refuses_an_empty_checkpoint(tmp_path):
    m = manager(tmp_path)
    with pytest.raises(ValueError):
        m.commit(1, {}, {})
    assert step_dirs(tmp_path) == []


def test_save_list_load_round_trip(tmp_path):
    m = manager(tmp_path)
    assert m.save(5, make_state(5), {"fingerprint": "abc"}) == "step_00000005"
    save_steps(m, 10)

    infos = m.list(deep=True)
    assert [(i.name, i.step, i.valid, i.reason) for i in infos] == [
        ("step_00000010", 10, True, ""),
        ("step_00000005", 5, True, ""),
    ]
    on_disk = sum(p.stat().st_size for p in (tmp_path / "step_00000010").iterdir() if p.name != mf.MANIFEST)
    assert infos[0].size == on_disk
    assert infos[0].time is not None

    loaded = m.load_latest()
    assert loaded is not None
    assert (loaded.step, loaded.name, loaded.skipped) == (10, "step_00000010", [])
    assert loaded.location == str(tmp_path / "step_00000010")
    assert loaded.manifest["fingerprint"] == "abc"
    assert loaded.manifest["step"] == 10
    assert_holds(loaded.blobs, make_state(10))
    assert sorted(os.listdir(tmp_path / "step_00000010")) == sorted([*make_state(10), mf.MANIFEST])


def test_a_new_manager_reads_what_another_wrote(tmp_path):
    save_steps(manager(tmp_path), 1, 2)
    loaded = manager(tmp_path).load_latest()
    assert loaded is not None and loaded.step == 2
    assert_holds(loaded.blobs, make_state(2))


def test_steps_are_ordered_numerically_not_by_save_order(tmp_path):
    m = manager(tmp_path, keep=5)
    save_steps(m, 20, 3, 100)
    assert [i.step for i in m.list()] == [100, 20, 3]
    assert m.load_latest().step == 100


# -- retention ------------------------------------------------------------------------------------


def test_retention_keeps_the_newest(tmp_path):
    m = manager(tmp_path, keep=2)
    save_steps(m, 1, 2, 3, 4, 5)
    assert step_dirs(tmp_path) == ["step_00000004", "step_00000005"]
    assert all(i.valid for i in m.list(deep=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_retention_keep_1(tmp_path):
    m = manager(tmp_path, keep=1)
    for step in (1, 2, 3):
        save_steps(m, step)
        assert step_dirs(tmp_path) == [mf.name_for(step)]
        loaded = m.load_latest()
        assert loaded.step == step
        assert_holds(loaded.blobs, make_state(step))


def test_retention_counts_only_valid_checkpoints(tmp_path):
    save_steps(manager(tmp_path, keep=2), 1, 2, 3)  # keeps 2 and 3
    _truncate(tmp_path / "step_00000003")
    m = manager(tmp_path, keep=2)  # a restarted job: nothing verified yet
    save_steps(m, 4)
    # 4 and 2 are the two newest valid ones; the corrupt 3 is not counted and not deleted.
    assert step_dirs(tmp_path) == ["step_00000002", "step_00000003", "step_00000004"]
    assert [(i.step, i.valid) for i in m.list()] == [(4, True), (3, False), (2, True)]


def test_keep_1_never_deletes_the_previous_checkpoint_when_the_new_one_is_bad(tmp_path, monkeypatch):
    m = manager(tmp_path, keep=1)
    save_steps(m, 1)
    real_digest = LocalStorage.digest

    def digest(self, name, file, size):  # the new checkpoint reads back wrong
        value = real_digest(self, name, file, size)
        return "0" * 16 if name == "step_00000002" and file == "optim.pt" else value

    monkeypatch.setattr(LocalStorage, "digest", digest)
    with pytest.raises(OSError, match="did not verify"):
        save_steps(m, 2)
    monkeypatch.undo()
    assert "step_00000001" in step_dirs(tmp_path)
    assert m.verify("step_00000001") == ""


def test_a_checkpoint_is_written_from_views_of_the_tensors_and_reads_back_as_safetensors(tmp_path):
    import safetensors.torch

    weights = {
        "b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "a": torch.zeros(0),
        "c": torch.ones(()),
    }
    pieces = mf.encode("model.safetensors", weights)
    assert [len(p) for p in pieces[1:]] == [12, 0, 4]  # each tensor's own memory, no copy
    assert safetensors.torch.load(b"".join(pieces)).keys() == weights.keys()
    for name, tensor in safetensors.torch.load(b"".join(pieces)).items():
        assert torch.equal(tensor, weights[name]) and tensor.dtype == weights[name].dtype
    m = manager(tmp_path)
    m.save(1, {"model.safetensors": weights, "optim.pt": {"x": 1}, "train.pt": {"step": 1}}, {})
    assert m.verify("step_00000001") == ""
    assert_same(
        mf.deserialize("model.safetensors", m.read_verified("step_00000001")[1]["model.safetensors"]), weights
    )


# -- corruption and fallback ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_load_latest_falls_back_past_a_corrupt_newest(tmp_path, kind):
    corrupt, words = CORRUPTIONS[kind]
    save_steps(manager(tmp_path), 1, 2, 3)
    newest = tmp_path / "step_00000003"
    corrupt(newest)
    before = snapshot_tree(newest)

    m = manager(tmp_path)
    loaded = m.load_latest()
    assert loaded is not None
    assert loaded.step == 2
    assert_holds(loaded.blobs, make_state(2))
    assert len(loaded.skipped) == 1
    name, reason = loaded.skipped[0]
    assert name == "step_00000003"
    assert words in reason
    # Loading never deletes or repairs anything.
    assert newest.is_dir()
    assert snapshot_tree(newest) == before
    assert step_dirs(tmp_path) == ["step_00000001", "step_00000002", "step_00000003"]
    assert m.verify("step_00000003") == reason


def test_load_latest_skips_several_and_reports_them_newest_first(tmp_path):
    save_steps(manager(tmp_path, keep=5), 1, 2, 3, 4)
    _flip(tmp_path / "step_00000004")
    _missing_manifest(tmp_path / "step_00000003")
    loaded = manager(tmp_path).load_latest()
    assert loaded.step == 2
    assert [name for name, _ in loaded.skipped] == ["step_00000004", "step_00000003"]
    assert "checksum" in loaded.skipped[0][1]
    assert "no manifest" in loaded.skipped[1][1]


def test_load_latest_with_nothing_valid_returns_none(tmp_path):
    save_steps(manager(tmp_path), 1, 2)
    _delete(tmp_path / "step_00000001")
    _truncate(tmp_path / "step_00000002")
    assert manager(tmp_path).load_latest() is None
    assert step_dirs(tmp_path) == ["step_00000001", "step_00000002"]


def test_manifest_of_another_step_does_not_verify(tmp_path):
    save_steps(manager(tmp_path), 1, 2)
    older = (tmp_path / "step_00000001" / mf.MANIFEST).read_bytes()
    (tmp_path / "step_00000002" / mf.MANIFEST).write_bytes(older)
    loaded = manager(tmp_path).load_latest()
    assert loaded.step == 1
    assert "step 1" in loaded.skipped[0][1]


def test_file_swapped_for_another_of_the_same_size_does_not_verify(tmp_path):
    save_steps(manager(tmp_path), 1, 2)
    a, b = tmp_path / "step_00000001" / "model.safetensors", tmp_path / "step_00000002" / "model.safetensors"
    assert a.stat().st_size == b.stat().st_size
    b.write_bytes(a.read_bytes())
    loaded = manager(tmp_path).load_latest()
    assert loaded.step == 1
    assert "checksum" in loaded.skipped[0][1]


@pytest.mark.parametrize("key", ["size", "xxh3_64"])
def test_one_byte_flip_in_a_manifest_key_falls_back(tmp_path, key):
    save_steps(manager(tmp_path), 1, 2)
    path = tmp_path / "step_00000002" / mf.MANIFEST
    raw = path.read_bytes()
    needle = f'"{key}"'.encode()
    at = raw.index(needle) + 2  # second character of the key
    flipped = bytearray(raw)
    flipped[at] ^= 0x01
    path.write_bytes(bytes(flipped))
    json.loads(bytes(flipped))  # still valid JSON: only the key name changed
    loaded = manager(tmp_path).load_latest()
    assert loaded is not None and loaded.step == 1


def test_shallow_list_checks_sizes_deep_list_checks_checksums(tmp_path):
    m = manager(tmp_path)
    save_steps(m, 1, 2, 3)
    _flip(tmp_path / "step_00000003")  # same size, different bytes
    _truncate(tmp_path / "step_00000002")
    fresh = manager(tmp_path)
    shallow = {i.step: i for i in fresh.list()}
    deep = {i.step: i for i in fresh.list(deep=True)}
    assert shallow[3].valid  # a flipped byte keeps the size
    assert not deep[3].valid and "checksum" in deep[3].reason
    assert not shallow[2].valid and "model.safetensors" in shallow[2].reason
    assert not deep[2].valid
    assert shallow[1].valid and deep[1].valid


# -- re-saving an existing step -----------------------------------------------------------------


def test_saving_over_an_invalid_checkpoint_sets_it_aside(tmp_path):
    m = manager(tmp_path)
    save_steps(m, 1, 2)
    _truncate(tmp_path / "step_00000002")
    corrupt = snapshot_tree(tmp_path / "step_00000002")

    new_state = make_state(200)  # other contents, same step
    m.save(2, new_state, {"fingerprint": "abc"})

    aside = [p for p in tmp_path.iterdir() if INVALID_TAG in p.name]
    assert len(aside) == 1
    assert aside[0].name.startswith("step_00000002" + INVALID_TAG)
    assert snapshot_tree(aside[0]) == corrupt  # kept as it was, for inspection
    assert m.storage.set_aside_names() == [aside[0].name]
    assert m.storage.names() == ["step_00000001", "step_00000002"]  # the set-aside one is invisible
    assert m.verify("step_00000002") == ""
    loaded = m.load_latest()
    assert loaded.step == 2 and loaded.skipped == []
    assert_holds(loaded.blobs, new_state)


def test_setting_the_same_step_aside_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_mod.time, "time", lambda: 1_700_000_000.0)  # both within one second
    m = manager(tmp_path)
    save_steps(m, 2)
    for _ in range(2):
        _truncate(tmp_path / "step_00000002")
        save_steps(m, 2)
    assert m.verify("step_00000002") == ""
    assert len(m.storage.set_aside_names()) == 2


def test_saving_a_valid_existing_step_does_not_rewrite_it(tmp_path):
    m = manager(tmp_path)
    save_steps(m, 3)
    d = tmp_path / "step_00000003"
    before = snapshot_tree(d)
    inode = d.stat().st_ino
    assert m.save(3, make_state(999), {"fingerprint": "other"}) == "step_00000003"
    assert d.stat().st_ino == inode
    assert snapshot_tree(d) == before
    assert_holds(m.load_latest().blobs, make_state(3))
    assert not [p for p in tmp_path.iterdir() if INVALID_TAG in p.name or p.name.startswith(TMP_PREFIX)]


# -- temporaries and failed writes ----------------------------------------------------------------


def test_leftover_temporaries_are_ignored_and_cleaned(tmp_path):
    m = manager(tmp_path)
    save_steps(m, 1)
    leftover = tmp_path / f"{TMP_PREFIX}step_00000002-1234-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    deleting = tmp_path / f"{TMP_PREFIX}delete-step_00000000-cafebabe"
    deleting.mkdir()

    assert m.storage.names() == ["step_00000001"]
    assert [i.name for i in m.list()] == ["step_00000001"]
    assert m.load_latest().step == 1

    removed = m.storage.clean_temporaries()
    assert sorted(removed) == sorted([leftover.name, deleting.name])
    assert not leftover.exists() and not deleting.exists()
    assert m.verify("step_00000001") == ""
    assert m.storage.clean_temporaries() == []


@pytest.mark.parametrize("fail_at", ["optim.pt", mf.MANIFEST, "commit"])
def test_failed_write_leaves_no_checkpoint_and_the_previous_intact(tmp_path, monkeypatch, fail_at):
    m = manager(tmp_path, keep=1)
    save_steps(m, 1)
    before = snapshot_tree(tmp_path / "step_00000001")
    pending_cls = fs_mod.LocalPendingWrite

    if fail_at == "commit":

        def commit(self):
            raise OSError("disk full")

        monkeypatch.setattr(pending_cls, "commit", commit)
    else:
        real_write = pending_cls.write

        def write(self, file, data):
            if file == fail_at:
                raise OSError("disk full")
            real_write(self, file, data)

        monkeypatch.setattr(pending_cls, "write", write)

    with pytest.raises(OSError, match="disk full"):
        save_steps(m, 2)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == [MARKS, "step_00000001"]  # no step_2, no temporaries
    assert snapshot_tree(tmp_path / "step_00000001") == before
    loaded = m.load_latest()
    assert loaded.step == 1 and loaded.skipped == []
    # And the next save works.
    save_steps(m, 2)
    assert step_dirs(tmp_path) == ["step_00000002"]


# -- torn commits: a real SIGKILL inside the commit -----------------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from train.runtime import faults
    from train.ckpt.manager import CheckpointManager
    from train.ckpt.storage import LocalStorage

    def make_state(step):
        g = torch.Generator().manual_seed(step)
        return {
            "model.safetensors": {"w": torch.randn(64, 64, generator=g), "b": torch.full((3,), float(step))},
            "optim.pt": {"m": torch.randn(64, 64, generator=g)},
            "train.pt": {"step": step},
        }

    faults.install(os.environ["FTJOB_FAULT"])  # the kill points, in train.ckpt's hooks
    m = CheckpointManager(LocalStorage(sys.argv[1]), keep=1)
    for step in (1, 2):
        m.save(step, make_state(step), {"fingerprint": "abc"})
        print("saved", step, flush=True)
    print("survived", flush=True)
    """
)


def _crash_state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model.safetensors": {"w": torch.randn(64, 64, generator=g), "b": torch.full((3,), float(step))},
        "optim.pt": {"m": torch.randn(64, 64, generator=g)},
        "train.pt": {"step": step},
    }


@pytest.mark.parametrize("point", ["ckpt.file_written", "ckpt.before_rename", "ckpt.after_rename"])
def test_sigkill_inside_the_commit(tmp_path, point):
    root = tmp_path / "ckpt"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE") and not k.startswith("TORCHELASTIC")
    }
    env["FTJOB_FAULT"] = f"kill:point={point}:save_step=2"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert "saved 1" in proc.stdout
    assert "saved 2" not in proc.stdout and "survived" not in proc.stdout

    m = manager(root, keep=1)
    loaded = m.load_latest()
    assert loaded is not None
    assert loaded.skipped == []
    assert m.verify("step_00000001") == "", "the previous checkpoint must survive the crash"
    assert_holds(m.read_verified("step_00000001")[1], _crash_state(1))
    temporaries = [p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]

    if point == "ckpt.after_rename":
        # The rename happened and every file was fsynced before it: step 2 is complete.
        assert loaded.step == 2
        assert m.verify("step_00000002") == ""
        assert_holds(loaded.blobs, _crash_state(2))
        assert temporaries == []
        assert step_dirs(root) == ["step_00000001", "step_00000002"]  # retention never ran
    else:
        assert loaded.step == 1
        assert_holds(loaded.blobs, _crash_state(1))
        assert step_dirs(root) == ["step_00000001"]
        assert len(temporaries) == 1 and temporaries[0].startswith(f"{TMP_PREFIX}step_00000002")
        assert m.storage.names() == ["step_00000001"]
        assert m.storage.clean_temporaries() == temporaries

    # The restarted job carries on (re-doing step 2 if it was lost); retention applies again.
    m.storage.clean_temporaries()
    m.save(2, _crash_state(2), {"fingerprint": "abc"})
    assert_holds(m.load_latest().blobs, _crash_state(2))
    m.save(3, _crash_state(3), {"fingerprint": "abc"})
    assert step_dirs(root) == ["step_00000003"]


# -- a checkpoint for another model ---------------------------------------------------------------


def make_train_state(in_features: int, seed: int = 1, num_samples: int = 100) -> TrainState:
    torch.manual_seed(0)
    model = nn.Linear(in_features, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return TrainState(model, optimizer, scheduler, GlobalSampler(num_samples, seed=seed))


def train_one_step(state: TrainState) -> None:
    loss = state.model(torch.randn(8, state.model.in_features)).pow(2).mean()
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.scheduler.step()
    state.sampler.cursor += 8
    state.step += 1


def save_train_state(root: Path, state: TrainState) -> CheckpointManager:
    m = manager(root)
    copy_out = Snapshots(state).take(torch.device("cpu"), True)
    assert copy_out is not None
    files = copy_out()
    assert set(files) == {MODEL_FILE, OPTIM_FILE, TRAIN_FILE}
    m.save(state.step, files, {"fingerprint": "abc"})
    return m


def test_train_state_round_trip(tmp_path, keep_rng):
    saved = make_train_state(4)
    for _ in range(3):
        train_one_step(saved)
    m = save_train_state(tmp_path, saved)

    resumed = make_train_state(4)
    loaded = m.load_latest()
    assert loaded.step == 3
    restore(resumed, decode(loaded.blobs), rank=0, world_size=1)
    assert resumed.step == 3
    assert resumed.sampler.cursor == saved.sampler.cursor == 24
    assert_same(resumed.model.state_dict(), saved.model.state_dict())
    assert_same(resumed.optimizer.state_dict()["state"], saved.optimizer.state_dict()["state"])
    assert resumed.scheduler.last_epoch == saved.scheduler.last_epoch
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(saved.optimizer.param_groups[0]["lr"])


def test_checkpoint_of_another_model_shape_is_incompatible(tmp_path, keep_rng):
    saved = make_train_state(4)
    train_one_step(saved)
    m = save_train_state(tmp_path, saved)

    other = make_train_state(5)
    with pytest.raises(IncompatibleCheckpointError) as info:
        restore(other, decode(m.load_latest().blobs), rank=0, world_size=1)
    message = str(info.value)
    assert "\n" not in message
    assert "do not fit this model" in message
    # Nothing past the model was applied: no silent partial resume.
    assert other.step == 0
    assert other.sampler.cursor == 0
    assert other.optimizer.state_dict()["state"] == {}


def test_checkpoint_with_other_parameter_names_is_incompatible(tmp_path, keep_rng):
    saved = make_train_state(4)
    m = save_train_state(tmp_path, saved)
    other = make_train_state(4)
    other.model = nn.Sequential(nn.Linear(4, 3))  # same shapes, keys "0.weight"/"0.bias"
    with pytest.raises(IncompatibleCheckpointError):
        restore(other, decode(m.load_latest().blobs), rank=0, world_size=1)


def test_checkpoint_with_another_sampler_seed_is_incompatible(tmp_path, keep_rng):
    saved = make_train_state(4, seed=1)
    m = save_train_state(tmp_path, saved)
    other = make_train_state(4, seed=2)
    with pytest.raises(IncompatibleCheckpointError, match="--seed"):
        restore(other, decode(m.load_latest().blobs), rank=0, world_size=1)
