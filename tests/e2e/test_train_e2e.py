"""End to end: real ``torchrun`` and plain ``python`` runs of train/main.py as subprocesses."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
from conftest import MAIN, REPO, launch_local, metrics_rows, run_torchrun, tiny_args, train_losses

pytestmark = pytest.mark.timeout(300)

GLOBAL_BATCH = 8  # tiny_args' --global-batch-size


def run_python(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``python train/main.py`` without torchrun: no RANK, so a single process without a group."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FTJOB_FAULT")
        and not k.startswith("TORCHELASTIC_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, MAIN, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"


def _check_train_rows(
    rows: list[dict], steps: int, world_size: int, global_batch: int = GLOBAL_BATCH
) -> list[dict]:
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    for r in train_rows:
        assert {"step", "loss", "lr", "world_size", "restart", "samples", "time", "step_time"} <= r.keys()
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"])
        assert isinstance(r["lr"], float) and r["lr"] > 0
        assert r["world_size"] == world_size
        assert r["restart"] == 0
        assert r["samples"] == r["step"] * global_batch
        assert r["step_time"] > 0 and r["time"] > 1e9
    return train_rows


def _assert_loss_falls(run_dir: Path, factor: float) -> None:
    losses = train_losses(run_dir)
    steps = sorted(losses)
    first = losses[steps[0]]
    last5 = sum(losses[s] for s in steps[-5:]) / 5
    assert last5 < factor * first, f"loss did not fall: first {first:.4f}, mean of last 5 {last5:.4f}"


def test_torchrun_two_ranks(tmp_path, corpus):
    from train import config

    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=40, eval_interval=20, ckpt__keep=5)
    # Through the launcher, as a scheduler runs it: exit 0. Steps of 20 ms at least, so that each
    # save (fsyncs) ends within its 10 steps on a loaded machine too: none is skipped as still busy.
    proc = launch_local(args, tmp_path, FTJOB_FAULT="slow:ms=20")
    _ok(proc)
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert (status["code"], status["class"], status["cause"]) == (0, "done", "finished"), status

    rows = metrics_rows(run_dir)
    _check_train_rows(rows, steps=40, world_size=2)
    _assert_loss_falls(run_dir, factor=0.85)

    val_rows = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val_rows] == [20, 40]
    for r in val_rows:
        assert "loss" not in r and isinstance(r["val_loss"], float) and math.isfinite(r["val_loss"])
    # A fresh run: no resume row; its start and (per rank) its ending.
    assert {r["kind"] for r in rows} == {"start", "train", "val", "checkpoint", "end"}
    assert [r["code"] for r in rows if r["kind"] == "end"] == [0, 0]
    saves = [r for r in rows if r["kind"] == "checkpoint"]
    assert [r["step"] for r in saves] == [10, 20, 30, 40] and all(r["stall_s"] >= 0 for r in saves)

    # The resolved config, as this very parser resolves the same arguments.
    written = json.loads((run_dir / "config.json").read_text())
    assert written == config.to_dict(config.parse(args))
    assert written["max_steps"] == 40 and written["ckpt"]["interval"] == 10

    ckpt_root = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpt_root.iterdir() if not p.name.startswith("."))  # not the marks
    assert names == [f"step_{s:08d}" for s in (10, 20, 30, 40)]
    for name in names:
        weights = safetensors.torch.load_file(str(ckpt_root / name / "model.safetensors"))
        assert weights
        bad = [k for k in weights if k.startswith(("module.", "_orig_mod.")) or ".module." in k]
        assert not bad, f"{name}: wrapped parameter names {bad[:3]}"
        assert (ckpt_root / name / "manifest.json").is_file()

    output = proc.stdout + proc.stderr
    assert re.search(r"\[rank0\].*process group up", output), output[-3000:]
    assert re.search(r"\[rank1\].*process group up", output), output[-3000:]
    assert "[rank0]" in output and "[rank1]" in output


def test_plain_python_single_process(tmp_path, corpus):
    run_dir = tmp_path / "run"
    proc = run_python(tiny_args(run_dir, corpus, max_steps=12, ckpt__interval=6))
    _ok(proc)
    _check_train_rows(metrics_rows(run_dir), steps=12, world_size=1)
    assert "process group up" not in proc.stdout + proc.stderr
    assert "[rank0]" in proc.stderr
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved == ["step_00000006", "step_00000012"]


def test_bring_your_own_task(tmp_path, corpus):
    run_dir = tmp_path / "run"
    args = tiny_args(
        run_dir,
        corpus,
        task="tests.tasks.tiny_regression:build",
        max_steps=40,
        eval_interval=20,
        global_batch_size=32,
        optim__lr=0.01,
        optim__warmup_steps=5,
    )
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = run_torchrun(args, env={"PYTHONPATH": pythonpath}, timeout=240)
    _ok(proc)
    rows = metrics_rows(run_dir)
    _check_train_rows(rows, steps=40, world_size=2, global_batch=32)
    _assert_loss_falls(run_dir, factor=0.5)
    assert [r["step"] for r in rows if r["kind"] == "val"] == [20, 40]
    assert json.loads((run_dir / "config.json").read_text())["task"] == "tests.tasks.tiny_regression:build"
    assert "sample:" not in proc.stdout + proc.stderr  # the task has no sample_fn
    final = run_dir / "checkpoints" / "step_00000040" / "model.safetensors"
    weights = safetensors.torch.load_file(str(final))
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_default_config_on_stdlib_corpus(tmp_path):
    """The real default GPT on the default corpus (this Python's stdlib), prepared from scratch."""
    run_dir = tmp_path / "run"
    cache = tmp_path / "cache"
    args = ["--max-steps", "3", "--run-dir", str(run_dir), "--sample-bytes", "20"]
    proc = run_python([*args, "--data.cache-dir", str(cache)], timeout=240)
    _ok(proc)
    assert re.search(r"\[rank0\].*sample:", proc.stderr), proc.stderr[-3000:]
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert all(r["world_size"] == 1 for r in rows if r["kind"] == "train")
    prepared = list(cache.glob("corpus-*/train.bin")) + list(cache.glob("corpus-*/val.bin"))
    assert len(prepared) == 2 and all(p.stat().st_size > 0 for p in prepared)
