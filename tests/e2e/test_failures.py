"""End-to-end failure classes with real torchrun: preemption, hangs, permanent errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    MAIN,
    REPO,
    launch_local,
    metrics_rows,
    newest_checkpoint,
    run_torchrun,
    start_local,
    tiny_args,
    train_losses,
    wait_for_step,
)

STEPS = 40


def test_preemption_saves_the_last_completed_step_and_requeue_continues(corpus: Path, tmp_path: Path) -> None:
    """SIGTERM (docker stop, Kubernetes) to the launcher, then SIGUSR1 (SLURM) to the requeued job:
    each time the step that completed is saved and the launcher exits 143; the third start
    finishes, every step run once."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=STEPS, ckpt__interval=25)
    saved = 0
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        # Slow steps (timing only, results unchanged) so the signal lands mid-run.
        proc = start_local(args, tmp_path, FTJOB_FAULT="slow:ms=60:restart=any")
        try:
            wait_for_step(run_dir, saved + 6)
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 143, stderr[-3000:]
        assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 143
        last = max(train_losses(run_dir))
        assert saved < last < STEPS
        assert newest_checkpoint(run_dir) == last  # zero completed steps lost
        assert f"preempted: saved step {last}" in stderr
        if saved:
            assert f"resumed from step {saved}" in stderr and "0 completed step(s) lost" in stderr
        saved = last

    again = launch_local(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {saved}" in again.stderr
    assert "0 completed step(s) lost" in again.stderr
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 0


def test_a_save_in_flight_when_a_peer_fails_never_holds_torchruns_stop(
    corpus: Path, tmp_path: Path, reference_run
) -> None:
    """Rank 1 dies while rank 0's save of step 20 is still being written (slowed to 2 min): torchrun
    stops rank 0 within its grace (no SIGKILL needed), the save is abandoned uncommitted, and the
    restart resumes from step 10 and ends as the uninterrupted run."""
    run_dir = tmp_path / "run"
    fault = "slow_write:save_step=20:ms=120000;crash:step=22:rank=1"
    result = run_torchrun(tiny_args(run_dir, corpus), max_restarts=1, env={"FTJOB_FAULT": fault})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forcefully exiting" not in result.stderr, result.stderr[-3000:]
    resumes = [r for r in metrics_rows(run_dir) if r["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [10]
    assert train_losses(run_dir) == train_losses(reference_run())


def test_hung_rank_is_detected_restarted_and_resumed(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    timeout = 3.0
    args = tiny_args(run_dir, corpus, max_steps=STEPS, watchdog__timeout_s=timeout)
    result = run_torchrun(args, max_restarts=1, env={"FTJOB_FAULT": "hang:step=15:rank=1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "made no progress" in result.stderr and "after step 15" in result.stderr
    assert "Thread 0x" in result.stderr or "Current thread" in result.stderr  # faulthandler stack dump
    rows = metrics_rows(run_dir)
    hung_at = next(r["time"] for r in rows if r["kind"] == "train" and r["step"] == 15)
    resumed_first = next(r["time"] for r in rows if r["kind"] == "train" and r.get("restart") == 1)
    assert resumed_first - hung_at < 2 * timeout + 10, "restart took too long after the hang"
    assert sorted(train_losses(run_dir)) == list(range(1, STEPS + 1))


def test_permanent_config_error_does_not_burn_restarts(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run_torchrun(tiny_args(run_dir, corpus, ckpt__keep=0), max_restarts=5)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("--ckpt.keep" in e for e in errors)
    assert "stopping torchrun" in result.stderr
    assert "process group up" not in result.stderr  # failed before rendezvous
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 2
    assert {r["kind"] for r in metrics_rows(run_dir)} <= {"end"}  # nothing trained: only how it ended


@pytest.mark.parametrize(
    ("bad", "code", "words"),
    [
        ({"data.path": "/nonexistent/corpus.txt"}, 3, "--data.path"),
        ({"run-dir": "FILE/run"}, 5, "not writable"),
    ],
)
def test_permanent_errors_have_their_own_exit_codes(
    corpus: Path, tmp_path: Path, bad: dict, code: int, words: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    args = tiny_args(tmp_path / "run", corpus)
    for key, value in bad.items():
        args[args.index(f"--{key}") + 1] = value.replace("FILE", str(a_file))
    result = subprocess.run(
        [sys.executable, MAIN, *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == code, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
