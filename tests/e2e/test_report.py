"""The recovery report, its plot and TensorBoard, against a real run with known injected failures:
a SIGKILL of rank 1 (torchrun restarts the group) and a SIGTERM (preempted, saved, launched again)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_torchrun, start_torchrun, tiny_args, wait_for_step

STEPS = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    args = tiny_args(run_dir, corpus, max_steps=STEPS, log__tensorboard=True)
    proc = start_torchrun(
        args,
        {"FTJOB_FAULT": "slow:ms=60:restart=any;crash:step=15:rank=1"},
        ["--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2", "--max-restarts=1"],
    )
    try:
        wait_for_step(run_dir, 25)  # past the SIGKILL at 15 and its restart
        proc.send_signal(signal.SIGTERM)
        _, first = proc.communicate(timeout=90)
    finally:
        proc.kill()
    again = run_torchrun(args)
    assert again.returncode == 0, again.stderr[-3000:]
    return run_dir, first + again.stderr


def report(run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.report", str(run_dir), *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_report_tells_each_incident_its_cause_and_cost(run: tuple[Path, str]) -> None:
    run_dir, log = run
    done = report(run_dir, "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["steps_done"] == STEPS and r["max_steps"] == STEPS and r["attempts"] == 3
    killed, preempted = r["incidents"]
    assert "rank 1 ended without a record (SIGKILL" in killed["cause"]
    # Rank 1 dies right after step 15 (both ranks completed it); the checkpoint of step 10 brings it back.
    assert (killed["last_step"], killed["resumed_from_step"], killed["steps_lost"]) == (15, 10, 5)
    assert killed["recovery_s"] > 0 and killed["restart"] == 1
    assert preempted["cause"].startswith("preemption")
    assert preempted["steps_lost"] == 0 and preempted["recovery_s"] > 0
    assert preempted["resumed_from_step"] == preempted["last_step"] >= 25
    assert f"preempted: saved step {preempted['last_step']}" in log
    assert r["time"]["recovering_s"] >= killed["recovery_s"] + preempted["recovery_s"] - 1e-6
    assert r["time"]["training_s"] > 0 and r["throughput"]["steps_rerun"] == 5
    assert r["checkpoints"]["durable"] >= 4 and r["checkpoints"]["failed"] == 0
    text = report(run_dir).stdout
    assert "2 incident(s)" in text and "1. after step 15" in text and "5 step(s) lost" in text


def test_the_plot_is_drawn(run: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "run.png"
    done = report(run[0], "--plot", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_tensorboard_has_one_point_per_step_after_the_resumes(run: tuple[Path, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run[0] / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, STEPS + 1)), steps  # the re-run steps purged, none twice, in order
    assert {"train/lr", "train/samples_per_s", "run/restart", "checkpoint/durable_stall_s"} <= set(
        events.Tags()["scalars"]
    )


def test_progress_lines_carry_throughput_and_time_left(run: tuple[Path, str]) -> None:
    log = run[1]
    assert "step 30/40 loss" in log and "samples/s" in log and " left" in log


def test_no_run_dir_is_one_line(tmp_path: Path) -> None:
    done = report(tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: no metrics.jsonl")
