"""DataLoader workers (--data.workers) change nothing about the run: the same batches in the same
order as without them, bit-exact resume after a SIGKILL while batches are prefetched, and no worker
outlives its trainer."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import safetensors.torch
import torch
from conftest import process_tree, run_torchrun, start_torchrun, tiny_args, train_losses, wait_for_step

STEPS = 30
FINAL = f"checkpoints/step_{STEPS:08d}/model.safetensors"


def test_workers_give_the_same_run_and_resume_bit_exact(corpus: Path, tmp_path: Path, reference_run) -> None:
    reference = reference_run(max_steps=STEPS)  # no workers
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, data__workers=2),
        max_restarts=1,
        env={"FTJOB_FAULT": "crash:step=15:rank=1"},  # the workers hold prefetched batches by then
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stderr
    assert train_losses(run_dir) == train_losses(reference)
    a, b = safetensors.torch.load_file(reference / FINAL), safetensors.torch.load_file(run_dir / FINAL)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_end_with_their_trainer(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=100_000, data__workers=2, dist__warm_restart=False)
    proc = start_torchrun(args, {"FTJOB_FAULT": "slow:ms=50:restart=any"}, ["--max-restarts=0"])
    try:
        wait_for_step(run_dir, 5)
        tree = process_tree(proc.pid)
        trainers = [p for p in tree if "train/main.py" in _cmdline(p) and p != proc.pid]
        workers = {t: [c for c in process_tree(t) if c != t] for t in trainers}
        victim = next(t for t, kids in workers.items() if len(kids) >= 2)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers[victim]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers[victim]), "a worker outlived its trainer"
        proc.wait(timeout=60)
        survivors = [w for kids in workers.values() for w in kids if _alive(w)]
        assert not survivors, survivors
    finally:
        proc.kill()
        proc.communicate()
