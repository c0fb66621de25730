"""Long fault-injection trials (``make chaos``): many kill/restart cycles in one torchrun run."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import metrics_rows, run_torchrun, tiny_args, train_losses

pytestmark = pytest.mark.chaos

CYCLES = 20
STEPS = 3 * CYCLES + 10


def recovery_times(run_dir: Path) -> list[float]:
    """Per restart: last step logged before the kill -> first step completed after the resume."""
    rows = [r for r in metrics_rows(run_dir) if r["kind"] == "train"]
    out = []
    for before, after in itertools.pairwise(rows):
        if after["restart"] != before["restart"]:
            out.append(after["time"] - before["time"])
    return out


def test_twenty_kill_restart_cycles_without_a_failed_reinit(corpus: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    args = {"max_steps": STEPS, "ckpt__interval": 2}
    assert run_torchrun(tiny_args(reference, corpus, **args)).returncode == 0

    run_dir = tmp_path / "chaos"
    # Restart k kills rank k % 2 three steps after it resumed, alternating ranks, 20 times.
    # await_zygote: the first crash waits until the warm-start zygote is ready, so every restart
    # is a warm one (trainers forked from it), 20 times over.
    faults = "await_zygote:step=1;"
    faults += ";".join(f"crash:step={3 * k + 3}:rank={k % 2}:restart={k}" for k in range(CYCLES))
    result = run_torchrun(
        tiny_args(run_dir, corpus, **args),
        max_restarts=CYCLES,
        env={"FTJOB_FAULT": faults},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    attempts = CYCLES + 1
    assert result.stderr.count("process group up") == 2 * attempts, "a re-initialisation failed"
    assert "connectFullMesh" not in result.stderr
    assert result.stderr.count("warm restart: trainer forked") == 2 * CYCLES
    times = recovery_times(run_dir)
    assert len(times) == CYCLES
    print(
        f"\nrecovery kill->first step after resume: median {statistics.median(times):.2f}s, "
        f"max {max(times):.2f}s over {CYCLES} warm restarts; 0 failed re-initialisations"
    )

    assert train_losses(run_dir) == train_losses(reference)
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    a = safetensors.torch.load_file(reference / final)
    b = safetensors.torch.load_file(run_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
