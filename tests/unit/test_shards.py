"""Sharded checkpoints as files (train/ckpt/shards.py): what each shard file holds, the layout in the
manifest, rows read by byte range and verified by block, and the export of a sharded checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from train.ckpt import manifest as mf
from train.ckpt import shards
from train.ckpt.__main__ import main
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """64-byte blocks: a tiny tensor spans many, as a real one spans many 4 MiB blocks."""
    monkeypatch.setattr(shards, "BLOCK_BYTES", 64)


def whole() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"model/w": torch.randn(10, 3), "model/b": torch.randn(7), "optim/0/exp_avg": torch.randn(10, 3)}


def write_sharded(
    root: Path, step: int, cuts: list[int], tensors: dict[str, torch.Tensor] | None = None
) -> str:
    """A committed checkpoint whose tensors are split at the row fractions ``cuts`` into files."""
    tensors = tensors or whole()
    storage = LocalStorage(root)
    pending = storage.begin(mf.name_for(step))
    joined = storage.join(pending.tmp.name)
    entries, pieces = {}, {}
    count = len(cuts) + 1
    for i in range(count):
        file, held, rows = shards.shard_file(i, count), {}, {}
        for key, t in tensors.items():
            if not t.dim():  # 0-d: one row, in the first file (as the job saves it)
                rows[key] = (0, 1) if i == 0 else (0, 0)
                if i == 0:
                    held[key] = t.reshape(1)
                continue
            n = t.shape[0]
            bounds = [0, *[int(c * n) for c in cuts], n]
            first, end = bounds[i], bounds[i + 1]
            rows[key] = (first, end)
            if end > first:
                held[key] = t[first:end].contiguous()
        entries[file] = shards.write_shard(joined, file, held)
        pieces[file] = rows
    entries["train.safetensors"] = shards.write_shard(
        joined, "train.safetensors", {"step": torch.tensor(step)}
    )
    lay = shards.layout(pieces, {k: (list(t.shape), t.dtype) for k, t in tensors.items()})
    pending.write(mf.MANIFEST, mf.build_from(step, entries, {shards.LAYOUT: lay, "fingerprint": "f"}))
    pending.commit()
    joined.close()
    return mf.name_for(step)


def reader(root: Path, name: str) -> shards.ShardReader:
    manager = CheckpointManager(LocalStorage(root), keep=3)
    return shards.ShardReader(manager.storage, name, manager.manifest(name))


def test_any_rows_read_back_exactly_across_files_and_blocks(tmp_path: Path) -> None:
    name = write_sharded(tmp_path, 5, [0.3, 0.6])
    tensors = whole()
    r = reader(tmp_path, name)
    for first, end in [(0, 10), (2, 5), (3, 4), (0, 0), (9, 10)]:
        got = r.read_rows({"model/w": (first, end), "optim/0/exp_avg": (first, end)})
        assert torch.equal(got["model/w"], tensors["model/w"][first:end])
        assert torch.equal(got["optim/0/exp_avg"], tensors["optim/0/exp_avg"][first:end])


def test_a_reader_of_few_rows_reads_few_bytes(tmp_path: Path) -> None:
    big = {"model/w": torch.randn(1000, 16)}  # 64 KB, two files of 32 KB
    name = write_sharded(tmp_path, 5, [0.5], big)
    r = reader(tmp_path, name)
    got = r.read_rows({"model/w": (10, 12)})
    assert torch.equal(got["model/w"], big["model/w"][10:12])
    assert r.bytes_read < 1024  # the header's blocks and the two rows' (128 B): not 64 KB


def test_a_corrupt_block_is_found_by_a_reader_that_reads_it_only(tmp_path: Path) -> None:
    name = write_sharded(tmp_path, 5, [0.5])
    path = tmp_path / name / shards.shard_file(1, 2)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # the last rows of the file
    path.write_bytes(bytes(data))
    r = reader(tmp_path, name)
    assert r.read_rows({"model/w": (0, 2)})  # rows in the other file: fine
    with pytest.raises(mf.Problem, match="checksum mismatch in block"):
        reader(tmp_path, name).read_rows({"optim/0/exp_avg": (5, 10), "model/w": (5, 10), "model/b": (0, 7)})


def test_bytes_between_the_rows_read_are_checked_too(tmp_path: Path) -> None:
    """Rows land straight in their tensors, what lies between them in a scratch buffer: a flipped
    byte of a tensor not read, inside a block that is, still fails that block."""
    name = write_sharded(tmp_path, 5, [0.5])
    path = tmp_path / name / shards.shard_file(0, 2)
    header = reader(tmp_path, name)._header(shards.shard_file(0, 2))
    data = bytearray(path.read_bytes())
    data[header["model/b"].start] ^= 0xFF  # model/b's first byte: its block also holds model/w's rows
    path.write_bytes(bytes(data))
    owner = header["model/b"].start // shards.BLOCK_BYTES
    read = [header[k] for k in ("model/w", "optim/0/exp_avg")]
    assert any(e.start // shards.BLOCK_BYTES <= owner <= (e.end - 1) // shards.BLOCK_BYTES for e in read)
    with pytest.raises(mf.Problem, match=f"checksum mismatch in block {owner}"):
        reader(tmp_path, name).read_rows({"model/w": (0, 5), "optim/0/exp_avg": (0, 5)})


def test_short_reads_and_many_destinations_still_fill_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may read less than asked, and one preadv takes at most IOV_MAX destinations."""
    import os

    from train.ckpt import storage

    real = os.preadv
    monkeypatch.setattr(storage, "IOV_MAX", 2)
    monkeypatch.setattr(storage.os, "preadv", lambda fd, bufs, at: real(fd, [b[:5] for b in bufs[:1]], at))
    name = write_sharded(tmp_path, 5, [0.3, 0.6])
    tensors = whole()
    got = reader(tmp_path, name).read_rows({k: (0, t.shape[0]) for k, t in tensors.items()})
    assert all(torch.equal(got[k], t) for k, t in tensors.items())


def test_a_missing_shard_file_is_a_problem(tmp_path: Path) -> None:
    name = write_sharded(tmp_path, 5, [0.5])
    (tmp_path / name / shards.shard_file(0, 2)).unlink()
    with pytest.raises(mf.Problem, match="missing"):
        reader(tmp_path, name).read_rows({"model/w": (0, 10)})
    info = CheckpointManager(LocalStorage(tmp_path), keep=3).list()[0]
    assert not info.valid and "missing" in info.reason


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda lay: lay["tensors"]["model/w"]["pieces"].pop(), "cover"),
        (lambda lay: lay["tensors"]["model/w"]["pieces"][1].__setitem__(1, 4), "tile"),
        (lambda lay: lay["tensors"]["model/w"]["pieces"][0].__setitem__(0, "other.safetensors"), "tile"),
        (lambda lay: lay.__setitem__("block_bytes", 4096), "layout is not one"),
        (lambda lay: lay["tensors"]["model/w"].__setitem__("dtype", "X"), "malformed"),
        (lambda lay: lay["tensors"]["model/w"].__setitem__("dtype", ["F32"]), "malformed"),
        (lambda lay: lay["tensors"]["model/w"]["pieces"][0].__setitem__(1, 0.0), "tile"),
        (lambda lay: lay["tensors"]["model/w"]["pieces"][0].__setitem__(0, 7), "tile"),
        (lambda lay: lay["tensors"]["model/w"]["pieces"][0].__setitem__(0, [0]), "tile"),
        (lambda lay: lay["files"].append("nothing.safetensors"), "layout is not one"),
    ],
)
def test_a_layout_that_does_not_tile_its_rows_is_refused(tmp_path: Path, edit, why: str) -> None:
    name = write_sharded(tmp_path, 5, [0.5])
    manifest = CheckpointManager(LocalStorage(tmp_path), keep=3).manifest(name)
    edit(manifest[shards.LAYOUT])
    with pytest.raises(mf.Problem, match=why):
        shards.check(manifest)


def test_a_file_without_block_checksums_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    name = write_sharded(tmp_path, 5, [0.5])
    path = tmp_path / name / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"]["train.safetensors"]["blocks"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(mf.Problem, match="block checksums"):
        reader(tmp_path, name).read_file("train.safetensors")


def test_a_layout_shape_is_checked_against_the_files_before_anything_is_allocated(tmp_path: Path) -> None:
    name = write_sharded(tmp_path, 5, [0.5])
    path = tmp_path / name / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[shards.LAYOUT]["tensors"]["model/w"]["shape"] = [10, 1 << 40]  # 40 TB, were it allocated
    path.write_text(json.dumps(manifest))
    with pytest.raises(mf.Problem, match="not the rows"):
        reader(tmp_path, name).read_rows({"model/w": (0, 10)})


def test_a_shard_file_whose_tensor_is_not_the_rows_the_layout_says_is_refused(tmp_path: Path) -> None:
    name = write_sharded(tmp_path, 5, [0.5])
    path = tmp_path / name / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[shards.LAYOUT]["tensors"]["model/w"]["pieces"] = [[0, 0, 4], [1, 4, 10]]
    path.write_text(json.dumps(manifest))
    with pytest.raises(mf.Problem, match="not the rows"):
        reader(tmp_path, name).read_rows({"model/w": (0, 10)})


def test_export_of_a_sharded_checkpoint_equals_that_of_the_whole_model(tmp_path: Path) -> None:
    tensors = {
        "model/blocks.0.w": torch.randn(9, 4),
        "model/head.b": torch.randn(5),
        "model/bn.num_batches_tracked": torch.tensor(7),  # 0-d: one row, held whole by the first file
    }
    write_sharded(tmp_path / "sharded" / "checkpoints", 20, [0.4], tensors)
    CheckpointManager(LocalStorage(tmp_path / "ddp" / "checkpoints"), keep=3).save(
        20,
        {
            "model.safetensors": {k[len(shards.MODEL) :]: v for k, v in tensors.items()},
            "optim.safetensors": {},
        },
        {"fingerprint": "f"},
    )
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["export", str(tmp_path / "sharded"), "--out", str(a)]) == 0
    assert main(["export", str(tmp_path / "ddp"), "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    loaded = safetensors.torch.load_file(a)
    assert torch.equal(loaded["blocks.0.w"], tensors["model/blocks.0.w"])
    assert loaded["bn.num_batches_tracked"].shape == () and int(loaded["bn.num_batches_tracked"]) == 7
