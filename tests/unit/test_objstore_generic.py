"""The object-store backend's generic fsspec path (any store but S3), on fsspec's in-memory
filesystem: commit by manifest, verification, fallback, retention, set-aside, debris."""

from __future__ import annotations

import uuid

import pytest
import torch

from train.ckpt import objstore
from train.ckpt.manager import CheckpointManager
from train.ckpt.manifest import serialize
from train.ckpt.objstore import FsspecStorage
from train.ckpt.storage import Unreadable

FILES = {"a.safetensors", "b.safetensors"}


def blobs(step: int) -> dict[str, bytes]:
    return {
        "a.safetensors": serialize("a.safetensors", {"w": torch.rand(300_000)}),  # > PART: streamed
        "b.safetensors": serialize("b.safetensors", {"step": torch.tensor([step])}),
    }


@pytest.fixture
def url(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(objstore, "PART", 256 << 10)
    return f"memory://ftjob-test-{uuid.uuid4().hex[:8]}/run"


def test_generic_store_commits_verifies_and_falls_back(url: str) -> None:
    m = CheckpointManager(FsspecStorage(url), keep=2, files=FILES)
    written = {step: blobs(step) for step in (10, 20, 30)}
    for step, data in written.items():
        m.commit(step, data, {})
    assert [i.step for i in m.list(deep=True) if i.valid] == [30, 20]
    store = FsspecStorage(url)
    path = f"{store.root}/step_00000030/a.safetensors"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 3] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    fresh = CheckpointManager(store, keep=2, files=FILES)
    loaded = fresh.load_latest()
    assert loaded is not None and loaded.step == 20
    assert {f: bytes(b) for f, b in loaded.blobs.items()} == written[20]
    fresh.commit(30, blobs(30), {})
    assert any(n.startswith("step_00000030.invalid-") for n in store.set_aside_names())


def test_generic_store_debris_is_invisible_then_removed(url: str) -> None:
    store = FsspecStorage(url, stale_s=0)
    CheckpointManager(store, keep=2, files=FILES).commit(10, blobs(10), {})
    store.fs.pipe_file(f"{store.root}/step_00000020/a.safetensors", b"torn")  # no manifest
    assert store.names() == ["step_00000010"]
    assert store.clean_temporaries() == ["step_00000020"]
    assert list(store._objects()) == ["step_00000010"]


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("s3://k:s@bucket/x", "credentials do not belong"),
        ("s3:///x", "names no bucket"),
        ("s3://b/x?v=1", "query"),
    ],
)
def test_bad_urls_are_refused(given: str, problem: str) -> None:
    assert problem in objstore.check_url(given)
    assert objstore.check_url("s3://bucket/prefix") == ""


def test_a_streamed_read_hands_on_every_byte_in_order_a_part_at_a_time(url: str) -> None:
    """What a node's leader reads from a bucket it passes on: never the whole object at once."""
    store = FsspecStorage(url)
    data = blobs(10)
    CheckpointManager(store, keep=2, files=FILES).commit(10, data, {})
    size = len(data["a.safetensors"])
    pieces: list[bytes] = []
    store.stream("step_00000010", "a.safetensors", size, lambda view: pieces.append(bytes(view)))
    assert b"".join(pieces) == data["a.safetensors"]
    assert len(pieces) > 1 and max(map(len, pieces)) == objstore.PART
    with pytest.raises(Unreadable, match="expected"):  # another size than the manifest's: refused unread
        store.stream("step_00000010", "a.safetensors", size + 1, pieces.append)
