"""LocalStorage: reading a checkpoint file with its checksum computed alongside, and temporaries a
cleaner must leave to a writer that still runs; and the deterministic switch."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train.ckpt import fs as fs_mod
from train.ckpt import manifest as mf
from train.ckpt import storage as storage_mod
from train.ckpt.storage import DELETE_PREFIX, TMP_PREFIX, LocalStorage

REPO = Path(__file__).resolve().parents[2]


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
    from train.runtime.determinism import set_deterministic

    try:
        set_deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


# -- temporaries of live writers survive a cleaner ------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from train.ckpt.storage import LocalStorage
    pending = LocalStorage(sys.argv[1]).begin("step_00000005")
    pending.write("model.safetensors", b"half")
    print(pending.tmp.name, flush=True)
    time.sleep(600)
    """
)


def test_a_live_writer_in_another_process_keeps_its_temporary(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("FTJOB_FAULT", None)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    try:
        tmp = tmp_path / holder.stdout.readline().strip()
        assert tmp.name.startswith(f"{TMP_PREFIX}step_00000005"), tmp
        storage = LocalStorage(tmp_path)
        assert storage.clean_temporaries() == []
        assert (tmp / "model.safetensors").read_bytes() == b"half"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        holder.stdout.close()
    assert storage.clean_temporaries() == [tmp.name]
    assert not tmp.exists()


def test_a_cleaner_leaves_this_processs_pending_write_and_it_still_commits(tmp_path):
    storage = LocalStorage(tmp_path)
    pending = storage.begin("step_00000001")
    pending.write("a", b"1")
    assert storage.clean_temporaries() == []
    pending.commit()
    assert storage.names() == ["step_00000001"]
    assert storage.clean_temporaries() == []


def test_delete_temporaries_are_removed_even_if_locked(tmp_path):
    doomed = tmp_path / f"{DELETE_PREFIX}step_00000001-abcd"
    doomed.mkdir()
    fd = os.open(doomed, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert LocalStorage(tmp_path).clean_temporaries() == [doomed.name]
    finally:
        os.close(fd)
    assert not doomed.exists()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL])
def test_without_flock_only_temporaries_idle_for_an_hour_are_removed(tmp_path, monkeypatch, code):
    def no_flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fs_mod.fcntl, "flock", no_flock)
    storage = LocalStorage(tmp_path)
    pending = storage.begin("step_00000001")  # writes without a lock
    pending.write("a", b"1")
    assert storage.clean_temporaries() == []
    old = storage_mod.time.time() - storage_mod.UNLOCKED_MAX_AGE_S - 60
    for path in (pending.tmp / "a", pending.tmp):
        os.utime(path, (old, old))
    assert storage.clean_temporaries() == [pending.tmp.name]


def test_a_planted_temporary_symlink_is_removed_not_followed(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_bytes(b"keep me")
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / f"{TMP_PREFIX}evil").symlink_to(target)
    (root / f"{DELETE_PREFIX}evil").symlink_to(target)
    assert sorted(LocalStorage(root).clean_temporaries()) == sorted(
        [f"{TMP_PREFIX}evil", f"{DELETE_PREFIX}evil"]
    )
    assert list(root.iterdir()) == []
    assert (target / "data").read_bytes() == b"keep me"
