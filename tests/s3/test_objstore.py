"""The object-storage backend against a real S3 server on loopback (SeaweedFS, auth on): commit by
manifest, crash debris, corruption, retention, bounded parts, and the start-up check's one line for
each misconfiguration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import config, preflight
from train.ckpt import hooks, objstore, s3_transfer
from train.ckpt.manager import CheckpointManager
from train.ckpt.manifest import serialize
from train.ckpt.objstore import FsspecStorage
from train.errors import ConfigError, StorageError

REPO = Path(__file__).resolve().parents[2]
FILES = {"a.safetensors", "b.safetensors"}


def blobs(step: int, size: int = 11 << 20) -> dict[str, bytes]:
    """About ``size`` bytes in a.safetensors (several parts), a small b.safetensors."""
    return {
        "a.safetensors": serialize("a.safetensors", {"w": torch.rand(size // 4)}),
        "b.safetensors": serialize("b.safetensors", {"step": torch.tensor([step])}),
    }


def manager(url: str, keep: int = 2, **kw) -> CheckpointManager:
    return CheckpointManager(FsspecStorage(url, **kw), keep=keep, files=FILES)


@pytest.fixture(autouse=True)
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objstore, "PART", 5 << 20)  # S3's smallest part: 11 MB files go in 3


def test_commit_list_load_and_retention(s3_env: dict) -> None:
    url = f"s3://{s3_env['BUCKET']}/run1"
    m = manager(url)
    written = {step: blobs(step) for step in (10, 20, 30)}
    for step, data in written.items():
        m.commit(step, data, {"note": "x"})
    assert [i.step for i in m.list()] == [30, 20]  # keep=2: step 10 deleted once 30 verified
    assert all(i.valid for i in m.list(deep=True))
    loaded = manager(url).load_latest()
    assert loaded is not None and loaded.step == 30
    assert {f: bytes(b) for f, b in loaded.blobs.items()} == written[30]
    assert loaded.location == f"{url}/step_00000030"


def test_an_upload_cut_short_never_counts_and_its_debris_goes(s3_env: dict) -> None:
    """A writer SIGKILLed between its data objects and its manifest (mid-upload): the checkpoint
    before stays the newest valid one; its objects and any unfinished multipart upload are removed."""
    url = f"s3://{s3_env['BUCKET']}/run2"
    manager(url).commit(10, blobs(10), {})
    script = """
import os, signal, sys, torch
from train.ckpt import hooks, objstore, s3_transfer
from train.ckpt.manager import CheckpointManager
from train.ckpt.manifest import serialize
objstore.PART = 5 << 20
hooks.install(lambda p: p == "ckpt.file_written" and os.kill(os.getpid(), signal.SIGKILL), lambda **c: 0)
files = ("a.safetensors", "b.safetensors")
m = CheckpointManager(objstore.FsspecStorage(sys.argv[1]), keep=2, files=set(files))
m.commit(20, {f: serialize(f, {"w": torch.rand(11 << 18)}) for f in files}, {})
"""
    killed = subprocess.run([sys.executable, "-c", script, url], cwd=REPO, capture_output=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    store = FsspecStorage(url, stale_s=0)
    # An abandoned multipart upload as well (a kill between parts), invisible to listings.
    bucket, key, _ = store.fs.split_path(f"{store.root}/step_00000030/a.safetensors")
    store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    assert store.names() == ["step_00000010"]
    loaded = CheckpointManager(store, keep=2, files=FILES).load_latest()
    assert loaded is not None and loaded.step == 10
    removed = store.clean_temporaries()
    assert "step_00000020" in removed and any("upload:step_00000030" in r for r in removed), removed
    assert list(store._objects()) == ["step_00000010"]
    uploads = store.fs.call_s3(
        "list_multipart_uploads", Bucket=bucket, Prefix=f"{store.root.split('/', 1)[1]}/"
    )
    assert not uploads.get("Uploads")


def test_stray_objects_in_a_committed_prefix_go_and_its_files_stay(s3_env: dict) -> None:
    """A sharded save's upload under another attempt's name, left in a committed checkpoint's
    prefix by a crash: removed once stale; the checkpoint's own files are never touched."""
    url = f"s3://{s3_env['BUCKET']}/strays"
    m = manager(url)
    m.commit(10, blobs(10, 1 << 10), {})
    store = FsspecStorage(url, stale_s=0)
    store._upload(store._path("step_00000010", "shard-00000-of-00002.old.safetensors"), [b"x" * 100])
    removed = store.clean_temporaries()
    assert removed == ["step_00000010/shard-00000-of-00002.old.safetensors"]
    assert set(store._objects()["step_00000010"]) == {*FILES, "manifest.json"}
    assert manager(url).verify("step_00000010") == ""
    young = FsspecStorage(url)  # stale_s 300: a save in flight keeps its uploads
    young._upload(young._path("step_00000010", "shard-1.new.safetensors"), [b"y"])
    assert young.clean_temporaries() == []


def test_debris_younger_than_stale_is_left_to_its_writer(s3_env: dict) -> None:
    url = f"s3://{s3_env['BUCKET']}/run3"
    store = FsspecStorage(url)  # stale_s = 300
    store.fs.pipe_file(f"{store.root}/step_00000020/a.safetensors", b"partial")
    assert store.clean_temporaries() == []
    assert store.begin("step_00000020") is not None  # its own step: cleared before writing it
    assert "step_00000020" not in store._objects()


def test_an_exception_mid_write_commits_nothing(s3_env: dict) -> None:
    url = f"s3://{s3_env['BUCKET']}/run4"
    m = manager(url)
    m.commit(10, blobs(10), {})

    def fail(point: str) -> None:
        if point == "ckpt.before_rename":
            raise OSError("injected")

    hooks.install(fail, lambda **c: None)
    try:
        with pytest.raises(OSError, match="injected"):
            m.commit(20, blobs(20), {})
    finally:
        hooks.install(lambda point: None, lambda **context: None)  # nothing installed, as before
    assert m.storage.names() == ["step_00000010"]
    assert "step_00000020" not in m.storage._objects()  # aborted: its data objects deleted


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_and_is_set_aside(s3_env: dict, damage: str) -> None:
    url = f"s3://{s3_env['BUCKET']}/run5{damage}"
    m = manager(url, keep=3)
    m.commit(10, blobs(10), {})
    m.commit(20, blobs(20), {})
    store = FsspecStorage(url)
    path = f"{store.root}/step_00000020/a.safetensors"
    data = bytearray(store.fs.cat_file(path))
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        store.fs.pipe_file(path, bytes(data))
    elif damage == "truncate":
        store.fs.pipe_file(path, bytes(data[:1000]))
    else:
        store.fs.rm(path)
    fresh = CheckpointManager(store, keep=3, files=FILES)
    loaded = fresh.load_latest()
    assert loaded is not None and loaded.step == 10
    assert loaded.skipped and loaded.skipped[0][0] == "step_00000020"
    fresh.commit(20, blobs(20), {})  # rewriting that step sets the bad one aside, never deletes it
    assert any(n.startswith("step_00000020.invalid-") for n in store.set_aside_names())
    assert fresh.verify("step_00000020") == ""


def test_parts_are_bounded_and_join_back(s3_env: dict) -> None:
    pieces = [os.urandom(700_000), memoryview(os.urandom(1_500_000)), b"", os.urandom(10)]
    parts = list(s3_transfer.parts(pieces, 1 << 20))
    assert [sum(map(len, p)) for p in parts] == [1 << 20, 1 << 20, 2_200_010 - 2 * (1 << 20)]
    whole = b"".join(bytes(p) for p in pieces)
    assert b"".join(bytes(v) for p in parts for v in p) == whole
    chain = s3_transfer.Chain([v for p in parts for v in p])  # what botocore reads, seeks and re-reads
    assert chain.read() == whole and chain.seek(5) == 5 and chain.read(3) == whole[5:8]


def test_secrets_stay_out_of_manifests_and_listings(s3_env: dict) -> None:
    url = f"s3://{s3_env['BUCKET']}/run6"
    m = manager(url)
    m.commit(10, blobs(10), {"config": {"ckpt": {"dir": url}}})
    store = m.storage
    manifest = store.fs.cat_file(f"{store.root}/step_00000010/manifest.json").decode()
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in manifest and s3_env["AWS_ACCESS_KEY_ID"] not in manifest
    assert json.loads(manifest)["step"] == 10


def _cfg(url: str) -> config.Config:
    return config.parse(["--ckpt.dir", url])


def test_startup_check_accepts_a_good_store(s3_env: dict) -> None:
    preflight.check_ckpt_store(_cfg(f"s3://{s3_env['BUCKET']}/ok"))


def test_startup_check_names_each_misconfiguration(s3_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"no such bucket .*create it or fix --ckpt.dir"):
        preflight.check_ckpt_store(_cfg("s3://no-such-bucket-here/x"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ConfigError, match=r"access refused .*AWS_SECRET_ACCESS_KEY"):
        preflight.check_ckpt_store(_cfg(f"s3://{s3_env['BUCKET']}/x"))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="no credentials found"):
        preflight.check_ckpt_store(_cfg(f"s3://{s3_env['BUCKET']}/x"))


def test_credentials_in_the_url_are_refused_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="credentials do not belong in the URL"):
        _cfg("s3://AKIA:secret@bucket/x")
    with pytest.raises(ConfigError, match="names no bucket"):
        _cfg("s3:///x")


def test_an_unreachable_store_is_retryable_and_quick(s3_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"is not reachable .*AWS_ENDPOINT_URL"):
        preflight.check_ckpt_store(_cfg(f"s3://{s3_env['BUCKET']}/x"))
    assert time.monotonic() - t0 < 30


def test_the_checkpoint_cli_reads_a_bucket(s3_env: dict) -> None:
    url = f"s3://{s3_env['BUCKET']}/cli"
    manager(url).commit(10, blobs(10, size=1000), {})
    env = {**os.environ, **s3_env}
    for command, expected in (("ls", "ok"), ("verify", "step_00000010: ok")):
        done = subprocess.run([sys.executable, "-m", "train.ckpt", command, url], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0 and expected in done.stdout, done.stderr[-2000:]


def test_export_reads_the_model_straight_from_the_bucket(s3_env: dict, tmp_path: Path) -> None:
    """`python -m train.ckpt export s3://...`: the newest valid checkpoint's model file only."""
    import safetensors.torch

    from train.ckpt.__main__ import main

    url = f"s3://{s3_env['BUCKET']}/export"
    m = manager(url)
    for step in (10, 20):
        m.commit(step, blobs(step), {})
    out = tmp_path / "a.safetensors"
    assert main(["export", url, "--file", "a.safetensors", "--out", str(out)]) == 0
    exported = safetensors.torch.load_file(out)
    assert torch.equal(
        exported["w"], safetensors.torch.load(bytes(manager(url).load_latest().blobs["a.safetensors"]))["w"]
    )
