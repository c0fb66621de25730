"""Slow, hung and full checkpoint storage, with real torchrun: no save becomes a collective timeout,
a hang is bounded, a full disk is one clear permanent stop and never a crash loop."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from conftest import (
    launch_local,
    metrics_rows,
    run_torchrun,
    start_torchrun,
    tiny_args,
    train_losses,
    wait_for_step,
)

from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage

# Every checkpoint file takes 0.8 s: a save (3 files and the manifest) runs ~3.2 s, longer than the
# collective timeout these tests set (2 s), so any rank waiting for it inside a collective would die.
SLOW = "slow_write:ms=800:restart=any"


def checkpoints(run_dir: Path) -> list[tuple[int, bool]]:
    manager = CheckpointManager(LocalStorage(run_dir / "checkpoints"), keep=1)
    return [(i.step, i.valid) for i in manager.list(deep=True)]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "exit_status.json").read_text())


def test_final_save_while_the_previous_is_still_written_is_no_collective_timeout(
    corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=12, ckpt__interval=10, dist__timeout_s=2)
    result = run_torchrun(args, env={"FTJOB_FAULT": SLOW})
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoints(run_dir)[:2] == [(12, True), (10, True)]  # both written, the final one too
    assert status(run_dir)["code"] == 0


def test_preemption_while_a_save_is_in_flight_saves_the_stopped_step(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=400, ckpt__interval=10, dist__timeout_s=2)
    proc = start_torchrun(
        args,
        {"FTJOB_FAULT": f"{SLOW};slow:ms=100:restart=any"},
        ["--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2"],
    )
    try:
        wait_for_step(run_dir, 12)  # the save of step 10 is being written now
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = max(train_losses(run_dir))
    assert status(run_dir)["code"] == 143, stderr[-3000:]
    assert checkpoints(run_dir)[0] == (last, True)  # zero completed steps lost
    assert (10, True) in checkpoints(run_dir)


def test_a_hung_save_ends_the_attempt_within_the_save_timeout(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=400, ckpt__interval=10, ckpt__save_timeout_s=3)
    started = time.monotonic()
    result = launch_local(  # as a scheduler would see it
        args, tmp_path, FTJOB_FAULT="hang_write:save_step=20:restart=any;slow:ms=20:restart=any"
    )
    took = time.monotonic() - started
    assert result.returncode == 147, result.stderr[-3000:]
    assert "save-timeout-s" in result.stderr.strip().splitlines()[-1]
    assert took < 90, f"a hung save held the job for {took:.0f}s"
    record = status(run_dir)
    assert (record["code"], record["class"], record["cause"]) == (147, "retryable", "storage"), record
    # the limit grows with the state's bytes; the tiny model's add well under a second
    assert re.search(
        r"has run longer than 3s \(--ckpt.save-timeout-s 3 \+ \d+ MB at --ckpt.slowest-mb-s 25\)",
        result.stderr,
    )
    assert checkpoints(run_dir) == [(10, True)]  # the hung one never counts, the older one is intact
    rows = {r["step"]: r["time"] for r in metrics_rows(run_dir) if r["kind"] == "train"}
    assert rows[max(rows)] - rows[20] < 3 + 3, "the hang was not detected within the save timeout"


# -- a real full disk ---------------------------------------------------------------------------------
def test_a_full_disk_is_one_clear_permanent_stop_not_a_crash_loop(
    corpus: Path, tmp_path: Path, small_tmpfs: Path
) -> None:
    run_dir = small_tmpfs / "run"
    args = tiny_args(run_dir, corpus, max_steps=200, ckpt__interval=5, ckpt__keep=3, ckpt__max_failures=2)
    args += ["--data.cache-dir", str(tmp_path / "cache")]
    result = launch_local(args, tmp_path, MAX_RESTARTS="3")  # as a scheduler would see it
    assert result.returncode == 6, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    # The disk filled inside a write, or the space check before one saw it would: ENOSPC either way.
    assert "No space left on device" in last or "[Errno 28]" in last, last
    record = status(run_dir)
    assert (record["code"], record["class"], record["cause"]) == (6, "permanent", "disk-full"), record
    # Said before it happened, and at every failure: what is free and what is needed.
    assert "checkpoint space: a checkpoint is" in result.stderr and "not enough" in result.stderr
    failed = [line for line in result.stderr.splitlines() if "checkpoint save failed" in line]
    assert len(failed) == 2 and all("needs (3 + 1) x" in line and "free" in line for line in failed), failed
    assert "retrying at the next interval (1 of 2" in failed[0]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "exit 6: permanent" in errors[0], errors
    # Nothing lost, nothing left behind, no restart burned on it.
    found = checkpoints(run_dir)
    assert found and all(valid for _, valid in found), found
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert {r.get("restart") for r in metrics_rows(run_dir) if r["kind"] == "train"} == {0}
    assert "train/ckpt" not in result.stderr  # no traceback from the save path (torchrun prints its own)


def test_a_slow_store_and_a_failed_save_never_hold_the_other_ranks_in_a_collective(
    corpus: Path, tmp_path: Path
) -> None:
    """Every listing of the store takes 3 s, longer than the collective timeout (2 s): the space
    check before a save, retention, and the report of a save that failed (EIO) all run on the
    writer's thread, never while the other rank waits in the step's all-reduce."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=25, ckpt__interval=5, dist__timeout_s=2)
    faults = "slow_list:ms=3000:restart=any;fail_write:save_step=5;slow:ms=20:restart=any"
    result = run_torchrun(args, env={"FTJOB_FAULT": faults})
    assert result.returncode == 0, result.stderr[-3000:]
    failed = [line for line in result.stderr.splitlines() if "checkpoint save failed" in line]
    assert len(failed) == 1 and "I/O error writing a checkpoint file" in failed[0], failed
    assert "retrying at the next interval (1 of 3" in failed[0]
    assert checkpoints(run_dir)[0] == (25, True)
    assert len([r for r in metrics_rows(run_dir) if r["kind"] == "checkpoint_failed"]) == 1
