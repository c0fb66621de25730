"""Reading a checkpoint file with its checksum computed alongside, and the deterministic switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from train.ckpt import manifest as mf
from train.ckpt import storage as storage_mod
from train.ckpt.storage import LocalStorage


def write(root: Path, data: bytes) -> LocalStorage:
    (root / "step_00000001").mkdir(parents=True)
    (root / "step_00000001" / "blob").write_bytes(data)
    return LocalStorage(root)


def test_chunks_are_the_file_in_order_and_the_background_checksum_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_mod, "READ_CHUNK", 1000)
    data = os.urandom(10_500)
    storage = write(tmp_path, data)
    chunks: list[bytes] = []
    hashing = mf.BackgroundChecksum()

    def on_chunk(chunk: memoryview) -> None:
        chunks.append(bytes(chunk))
        hashing.feed(chunk)

    got = storage.read("step_00000001", "blob", on_chunk=on_chunk)
    assert bytes(got) == data
    assert [len(c) for c in chunks] == [1000] * 10 + [500]
    assert b"".join(chunks) == data
    assert hashing.digest_of(got) == mf.checksum(data)


def test_background_checksum_falls_back_when_it_was_not_fed_everything():
    hashing = mf.BackgroundChecksum()
    hashing.feed(memoryview(b"abc"))
    assert hashing.digest_of(b"abcd") == mf.checksum(b"abcd")


def test_check_file_catches_corruption_with_a_background_checksum():
    data = os.urandom(5000)
    manifest = {"files": {"blob": {"size": len(data), "xxh3_64": mf.checksum(data)}}}
    bad = bytearray(data)
    bad[1234] ^= 1
    hashing = mf.BackgroundChecksum()
    hashing.feed(memoryview(bytes(bad)))
    with pytest.raises(mf.Problem, match="checksum mismatch"):
        mf.check_file(manifest, "blob", bytes(bad), hashing)


def test_set_deterministic_is_torch_deterministic_warn_only():
    from train.main import set_deterministic

    try:
        set_deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
