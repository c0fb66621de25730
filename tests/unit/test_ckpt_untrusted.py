"""Checkpoints read as untrusted input: whatever is in the directory, loading falls back, never
follows a path out, never blocks, never allocates what a manifest claims, never runs code."""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from train.ckpt import manifest as mf
from train.ckpt import storage as storage_mod
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import TMP_PREFIX, LocalStorage, Storage, Unreadable

FILES = {"model.safetensors", "optim.safetensors", "train.pt"}


def make_state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model.safetensors": {"w": torch.randn(4, 3, generator=g), "b": torch.full((3,), float(step))},
        "optim.safetensors": {"state": {0: {"m": torch.randn(4, 3, generator=g)}}, "groups": [{"lr": 0.1}]},
        "train.pt": {"step": step},
    }


def saved(root: Path, *steps: int, keep: int = 3) -> CheckpointManager:
    m = CheckpointManager(LocalStorage(root), keep=keep)
    for step in steps:
        m.save(step, make_state(step), {"fingerprint": "abc"})
    return m


def edit_manifest(d: Path, change) -> None:
    manifest = json.loads((d / mf.MANIFEST).read_bytes())
    change(manifest)
    (d / mf.MANIFEST).write_text(json.dumps(manifest))


def plant(d: Path, file: str, data: bytes) -> None:
    """Replace a file, with a manifest that vouches for it: only its contents can give it away."""
    (d / file).write_bytes(data)

    def vouch(manifest: dict) -> None:
        manifest["files"][file] = {"size": len(data), "xxh3_64": mf.checksum(data)}

    edit_manifest(d, vouch)


def within(seconds: float, fn):
    """fn(), failing (instead of hanging the suite) if it blocks."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s: blocked"
    if "error" in out:
        raise out["error"]
    return out["value"]


def fell_back(root: Path, words: str, to: int = 1, **kw) -> None:
    loaded = within(30, lambda: CheckpointManager(LocalStorage(root), keep=3, **kw).load_latest())
    assert loaded is not None and loaded.step == to, loaded and loaded.skipped
    assert words in loaded.skipped[0][1], loaded.skipped


# -- 1. manifest file names -----------------------------------------------------------------------


def _manifest_listing(*names: str) -> bytes:
    entries = ", ".join(f'{json.dumps(n)}: {{"size": 1, "xxh3_64": "0"}}' for n in names)
    return f'{{"format": 1, "step": 1, "files": {{{entries}}}}}'.encode()


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "/etc/passwd",
        ".hidden",
        "..",
        "",
        "a" * 129,
        "model\n",
        "a b",
        "ü.pt",
        "-a",
        mf.MANIFEST,
    ],
)
def test_manifest_refuses_names_that_are_not_plain_file_names(name):
    with pytest.raises(mf.Problem, match="not a plain file name"):
        mf.parse(_manifest_listing(name), 1)


@pytest.mark.parametrize("name", ["a", "model.safetensors", "A-b_c.9", "0" * 128, "x..y"])
def test_manifest_accepts_plain_file_names(name):
    assert set(mf.parse(_manifest_listing(name), 1)["files"]) == {name}


@pytest.mark.parametrize("names", [("a.pt", "a.pt"), ("Model.pt", "model.pt")])
def test_manifest_refuses_a_file_listed_twice(names):
    with pytest.raises(mf.Problem, match="twice"):
        mf.parse(_manifest_listing(*names), 1)


def test_a_checkpoint_listing_a_path_falls_back(tmp_path):
    saved(tmp_path, 1, 2)
    edit_manifest(
        tmp_path / "step_00000002", lambda m: m["files"].update({"../x": {"size": 0, "xxh3_64": ""}})
    )
    fell_back(tmp_path, "not a plain file name")


def test_a_path_in_a_manifest_is_never_opened(tmp_path):
    root = tmp_path / "ckpt"
    saved(root, 1, 2)
    sentinel = tmp_path / "sentinel"
    os.mkfifo(sentinel)
    opened = threading.Event()

    def watch() -> None:  # a FIFO's write end opens only once someone opens it to read
        fd = os.open(sentinel, os.O_WRONLY)
        opened.set()
        os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def list_it_first(manifest: dict) -> None:
        manifest["files"] = {"../../sentinel": {"size": 0, "xxh3_64": mf.checksum(b"")}, **manifest["files"]}

    edit_manifest(root / "step_00000002", list_it_first)
    m = CheckpointManager(LocalStorage(root), keep=3)
    assert within(30, m.load_latest).step == 1
    within(30, lambda: m.list(deep=True))
    assert not opened.wait(0.2), "the manifest's ../../sentinel was opened"
    os.close(os.open(sentinel, os.O_RDONLY | os.O_NONBLOCK))  # let the watcher go
    watcher.join(10)


def test_the_expected_files_must_be_listed_exactly(tmp_path):
    saved(tmp_path, 1, 2, 3)
    extra = mf.serialize("extra.safetensors", {"x": torch.ones(2)})
    plant(tmp_path / "step_00000003", "extra.safetensors", extra)
    edit_manifest(tmp_path / "step_00000002", lambda m: m["files"].pop("train.pt"))
    m = CheckpointManager(LocalStorage(tmp_path), keep=3, files=FILES)
    loaded = m.load_latest()
    assert loaded.step == 1
    assert [reason for _, reason in loaded.skipped] == [
        "manifest.json lists unexpected file 'extra.safetensors'",
        "manifest.json does not list expected file 'train.pt'",
    ]
    assert CheckpointManager(LocalStorage(tmp_path), keep=3).load_latest().step == 3  # without files=
    with pytest.raises(ValueError, match="expects"):
        m.save(4, {"model.safetensors": make_state(4)["model.safetensors"]}, {})
    with pytest.raises(ValueError, match="plain file names"):
        saved(tmp_path / "other").save(1, {".hidden.pt": {}}, {})
    for bad in (set(), {"../x"}, {mf.MANIFEST}):
        with pytest.raises(ValueError):
            CheckpointManager(LocalStorage(tmp_path), keep=3, files=bad)


# -- 2. only regular files, never through a symlink, never more than expected ----------------------


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _symlink(path: Path) -> None:  # to an identical copy outside: only the link gives it away
    outside = path.parents[2] / f"outside-{path.name}"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("file", ["model.safetensors", mf.MANIFEST])
@pytest.mark.parametrize("kind", [_fifo, _symlink, _directory], ids=["fifo", "symlink", "directory"])
def test_a_file_that_is_not_a_regular_file_is_invalid_and_never_blocks(tmp_path, kind, file):
    root = tmp_path / "ckpt"
    saved(root, 1, 2)
    kind(root / "step_00000002" / file)
    fell_back(root, f"{file}: not a regular file")
    infos = within(30, lambda: CheckpointManager(LocalStorage(root), keep=3).list())  # sizes only
    assert [i.valid for i in infos] == [False, True]
    assert file in infos[0].reason


def test_a_symlinked_checkpoint_directory_is_ignored_and_never_deleted_through(tmp_path):
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "ckpt"
    saved(elsewhere, 9)
    before = sorted((p.name, p.read_bytes()) for p in (elsewhere / "step_00000009").iterdir())
    m = saved(root, 1, keep=1)
    (root / "step_00000009").symlink_to(elsewhere / "step_00000009")
    assert m.storage.names() == ["step_00000001"]
    assert m.load_latest().step == 1
    with pytest.raises(Unreadable):
        m.storage.read("step_00000009", mf.MANIFEST)
    for step in (2, 10, 11):
        m.save(step, make_state(step), {})
    assert m.storage.names() == ["step_00000011"]
    assert sorted((p.name, p.read_bytes()) for p in (elsewhere / "step_00000009").iterdir()) == before
    assert (root / "step_00000009").is_symlink()


def _allocations_up_to(monkeypatch, most: int) -> list[int]:
    sizes: list[int] = []

    def empty(n, dtype):
        sizes.append(n)
        assert n <= most, f"allocated {n} bytes"
        return np.empty(n, dtype)

    monkeypatch.setattr(storage_mod, "np", SimpleNamespace(empty=empty, uint8=np.uint8))
    return sizes


def test_read_refuses_a_size_other_than_expected_before_allocating(tmp_path, monkeypatch):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "f").write_bytes(b"12345")
    storage = LocalStorage(tmp_path)
    sizes = _allocations_up_to(monkeypatch, 5)
    with pytest.raises(Unreadable) as info:
        storage.read("step_00000001", "f", size=10**15)
    assert info.value.actual == 5
    with pytest.raises(Unreadable, match="more than"):
        storage.read("step_00000001", "f", limit=4)
    assert sizes == []
    assert bytes(storage.read("step_00000001", "f", size=5, limit=5)) == b"12345"


def test_a_sparse_file_bigger_than_its_manifest_says_is_never_allocated(tmp_path, monkeypatch):
    saved(tmp_path, 1, 2)
    os.truncate(tmp_path / "step_00000002" / "model.safetensors", 1 << 40)  # 1 TiB, holes only
    _allocations_up_to(monkeypatch, 1 << 20)
    fell_back(tmp_path, f"{1 << 40} bytes, manifest says")


def test_a_manifest_claiming_a_huge_file_allocates_nothing(tmp_path, monkeypatch):
    saved(tmp_path, 1, 2)
    edit_manifest(tmp_path / "step_00000002", lambda m: m["files"]["model.safetensors"].update(size=10**15))
    _allocations_up_to(monkeypatch, 1 << 20)
    fell_back(tmp_path, f"manifest says {10**15}")


def test_a_manifest_over_the_cap_is_refused(tmp_path):
    saved(tmp_path, 1, 2)
    path = tmp_path / "step_00000002" / mf.MANIFEST
    path.write_bytes(path.read_bytes() + b" " * mf.MANIFEST_LIMIT)  # still valid JSON
    fell_back(tmp_path, "manifest.json")


# -- 3. verified bytes still have to deserialise --------------------------------------------------


def test_checksummed_bytes_that_do_not_deserialise_fall_back(tmp_path):
    m = saved(tmp_path, 1, 2)
    plant(tmp_path / "step_00000002", "optim.safetensors", os.urandom(1000))
    fell_back(tmp_path, "optim.safetensors does not deserialise: ")
    assert "does not deserialise" in m.verify("step_00000002")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("file", ["model.safetensors", "train.pt"])
def test_a_planted_pickle_falls_back_and_never_runs(tmp_path, file):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof))).close()
    assert proof.exists()  # the payload works when unpickled
    marker, root = tmp_path / "marker", tmp_path / "ckpt"
    saved(root, 1, 2)
    if file.endswith(".pt"):
        payload = mf.serialize(file, {"step": _Payload(marker)})
    else:
        payload = pickle.dumps(_Payload(marker))
    plant(root / "step_00000002", file, payload)
    fell_back(root, f"{file} does not deserialise")
    assert not marker.exists()


def test_loaded_objects_are_views_of_the_blobs(tmp_path):
    loaded = saved(tmp_path, 1).load_latest()
    assert set(loaded.objects) == FILES
    for file, obj in loaded.objects.items():
        assert repr(obj) == repr(mf.deserialize(file, mf.serialize(file, make_state(1)[file])))
    blob = torch.frombuffer(loaded.blobs["model.safetensors"], dtype=torch.uint8)
    weight = loaded.objects["model.safetensors"]["w"]
    assert blob.data_ptr() <= weight.data_ptr() < blob.data_ptr() + blob.numel()  # no copy


def test_validate_rejects_a_checkpoint_and_other_errors_propagate(tmp_path):
    saved(tmp_path, 1, 2)

    def newest_is_wrong(loaded) -> None:
        assert loaded.objects["train.pt"] == {"step": loaded.step}
        if loaded.step == 2:
            raise mf.Problem("not for this run")

    m = CheckpointManager(LocalStorage(tmp_path), keep=3)
    loaded = m.load_latest(validate=newest_is_wrong)
    assert loaded.step == 1 and loaded.skipped == [("step_00000002", "not for this run")]

    def broken(loaded) -> None:
        raise RuntimeError("a bug, not a bad checkpoint")

    with pytest.raises(RuntimeError, match="a bug"):
        m.load_latest(validate=broken)


def test_a_rejected_checkpoint_is_neither_kept_as_valid_nor_reused(tmp_path):
    saved(tmp_path, 1, 2, keep=2)
    m = CheckpointManager(LocalStorage(tmp_path), keep=2)

    def reject_2(loaded) -> None:
        if loaded.step == 2:
            raise mf.Problem("rejected")

    assert m.load_latest(validate=reject_2).step == 1
    m.save(3, make_state(3), {})
    assert m.storage.names() == ["step_00000001", "step_00000002", "step_00000003"]  # 1 is the fallback
    state = make_state(2)
    state["train.pt"] = {"step": 200}
    m.save(2, state, {})  # rewritten, not "exists and verifies"
    assert len(m.storage.set_aside_names()) == 1
    assert mf.deserialize("train.pt", m.read_verified("step_00000002")[1]["train.pt"]) == {"step": 200}


# -- 4. set-aside checkpoints are pruned ----------------------------------------------------------


def test_set_aside_checkpoints_are_pruned_by_count_and_age(tmp_path):
    m = saved(tmp_path, 5, 6, keep=2)
    assert "set_aside_names" in Storage.__dict__
    planted = ["step_00000003.invalid-100-a", "step_00000006.invalid-100-a", "step_00000006.invalid-200-a"]
    planted += ["step_00000008.invalid-100-a", "notes.invalid-x"]
    for name in planted:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x")
    m.save(7, make_state(7), {})  # valid kept: 7 and 6
    # 3 is older than 6; of the rest only the newest 2 stay; notes.* is not a checkpoint of ours.
    assert m.storage.set_aside_names() == [
        "notes.invalid-x",
        "step_00000006.invalid-200-a",
        "step_00000008.invalid-100-a",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_setting_one_step_aside_again_and_again_keeps_only_the_newest(tmp_path, monkeypatch):
    clock = iter(range(1_700_000_000, 1_800_000_000))
    monkeypatch.setattr(storage_mod.time, "time", lambda: float(next(clock)))
    m = saved(tmp_path, 2, keep=1)
    for _ in range(4):
        target = tmp_path / "step_00000002" / "model.safetensors"
        target.write_bytes(target.read_bytes()[:-1])
        m.save(2, make_state(2), {})
    assert len(m.storage.set_aside_names()) == 1
    assert m.storage.set_aside_names()[0] > "step_00000002.invalid-1700000003"


def test_the_checkpoint_package_imports_nothing_of_the_job() -> None:
    """train/ckpt is a library: any training loop can use it (fault points reach it as hooks)."""
    import ast

    for path in (Path(__file__).resolve().parents[2] / "train" / "ckpt").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not (name == "train" or name.startswith("train.")) or name.startswith("train.ckpt"), (
                    f"{path.name} imports {name}"
                )


def test_the_training_state_knows_nothing_of_ranks_or_staging() -> None:
    """TrainState is a plain state_dict()/load_state_dict() object; collectives, every rank's RNG
    and staging buffers are train/checkpointing/snapshot.py's."""
    import ast

    from train.state import TrainState

    source = (Path(__file__).resolve().parents[2] / "train" / "state.py").read_text()
    imported = {
        name
        for node in ast.walk(ast.parse(source))
        for name in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert (
        not {"torch.distributed", "train.runtime", "train.runtime.comm", "train.rng", "train.runtime.dist"}
        & imported
    ), imported
    assert callable(TrainState.state_dict) and callable(TrainState.load_state_dict)
