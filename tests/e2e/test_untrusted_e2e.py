"""A checkpoint that passes its checksums but does not fit, and one planted by another user, with
real torchrun: the job falls back to its own older checkpoint (never a crash loop, never an exit
for good), and finishes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_torchrun, tiny_args, train_losses

from train.ckpt.manager import CheckpointManager, decode
from train.ckpt.storage import LocalStorage

NOBODY = 65534


def test_a_checkpoint_that_verifies_but_cannot_be_restored_falls_back(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_torchrun(tiny_args(run_dir, corpus, max_steps=20)).returncode == 0
    # Re-write step 20 as a valid checkpoint (its checksums match) whose Python RNG state is not one.
    root = run_dir / "checkpoints"
    manager = CheckpointManager(LocalStorage(root), keep=3)
    manifest, blobs = manager.read_verified("step_00000020")
    objects = decode(blobs)
    objects["train.safetensors"]["rng"][1]["python"] = [3, [1, 2], None]
    meta = {k: v for k, v in manifest.items() if k not in ("format", "step", "time", "torch", "files")}
    shutil.rmtree(root / "step_00000020")
    manager.save(20, objects, meta)

    result = run_torchrun(tiny_args(run_dir, corpus, max_steps=30), max_restarts=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_00000020 is not usable (its contents do not fit this job" in result.stderr
    assert "RNG state does not load" in result.stderr
    assert "resumed from step 10" in result.stderr
    assert result.stderr.count("process group up") == 2  # one attempt: no crash loop
    assert max(train_losses(run_dir)) == 30


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a checkpoint to another uid needs root")
def test_a_checkpoint_planted_by_another_user_is_ignored(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_torchrun(tiny_args(run_dir, corpus, max_steps=10)).returncode == 0
    planted = run_dir / "checkpoints" / "step_99999999"
    shutil.copytree(run_dir / "checkpoints" / "step_00000010", planted)
    manifest = json.loads((planted / "manifest.json").read_text())
    (planted / "manifest.json").write_text(json.dumps({**manifest, "step": 99999999, "fingerprint": "x"}))
    for path in (planted, *planted.iterdir()):
        os.chown(path, NOBODY, NOBODY)

    result = run_torchrun(tiny_args(run_dir, corpus, max_steps=20))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step_99999999 belongs to uid {NOBODY}, not to this job" in result.stderr
    assert "resumed from step 10" in result.stderr
    assert planted.is_dir() and len(list(planted.iterdir())) == 4  # never deleted
