"""Resume at a node's shape, with real torchrun: one read of the checkpoint per node however many
ranks it runs, and a read slower than every collective timeout is waited for, not a failed start."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import metrics_rows, run_torchrun, tiny_args, train_losses


def resume_rows(run_dir: Path) -> list[dict]:
    return [r for r in metrics_rows(run_dir) if r["kind"] == "resume"]


def test_four_ranks_on_a_node_read_one_copy_and_resume_bit_exact(corpus: Path, tmp_path: Path) -> None:
    """One rank reads, three take it from that rank; and with 3+ ranks float sums depend on DDP's
    bucket layout: a resume must not change it."""
    opts = {"max_steps": 20, "global_batch_size": 8}
    reference = tmp_path / "reference"
    assert run_torchrun(tiny_args(reference, corpus, **opts), nproc=4).returncode == 0
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, **opts),
        nproc=4,
        max_restarts=1,
        env={"FTJOB_FAULT": "crash:step=15:rank=3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (resume,) = resume_rows(run_dir)
    # rank 0 read and verified the checkpoint; then ranks 1-3 read it again from the page cache
    assert (resume["step"], resume["read_by"], resume["received_by"]) == (10, [0], [])
    assert resume["pulled_bytes"][1:] == [0, 0, 0] and all(resume["reread_bytes"][1:])
    assert train_losses(run_dir) == train_losses(reference)
    final = "checkpoints/step_00000020/model.safetensors"
    a, b = safetensors.torch.load_file(reference / final), safetensors.torch.load_file(run_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A run dir with checkpoints up to step 10 (each test resumes a copy of it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert run_torchrun(tiny_args(run_dir, corpus, max_steps=10)).returncode == 0
    return run_dir


def copy_of(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir, symlinks=True)
    return run_dir


def test_a_read_slower_than_the_init_timeout_is_waited_for(corpus: Path, tmp_path: Path, trained: Path):
    run_dir = copy_of(trained, tmp_path)
    # Rank 0 takes 9 s to read the checkpoint's 3 files; the collective timeout at start is 5 s.
    started = time.monotonic()
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=20, dist__init_timeout_s=5),
        env={"FTJOB_FAULT": "slow_read:ms=3000:rank=0"},
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stderr
    assert took > 9, "the slow read was not slow"
    steps = [r["step"] for r in metrics_rows(run_dir) if r["kind"] == "train"]
    assert steps[-10:] == list(range(11, 21))


def test_a_hung_read_ends_the_attempt_as_retryable_within_the_load_timeout(
    corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    assert run_torchrun(tiny_args(run_dir, corpus, max_steps=10)).returncode == 0
    started = time.monotonic()
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=20, ckpt__load_timeout_s=3),
        env={"FTJOB_FAULT": "slow_read:ms=600000:rank=0"},
    )
    took = time.monotonic() - started
    assert result.returncode != 0 and took < 60, result.stderr[-3000:]
    assert re.search(
        r"still running after 3s \(--ckpt.load-timeout-s 3 \+ \d+ MB at --ckpt.slowest-mb-s 25\)",
        result.stderr,
    )
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert (status["code"], status["class"]) == (147, "retryable"), status
