"""End-to-end: with a node-local tier every K steps, a SIGKILL costs at most K steps, and the resumed
run is still the uninterrupted one, bit for bit."""

from __future__ import annotations

from pathlib import Path

from conftest import metrics_rows, run_torchrun, tiny_args
from test_resume import STEPS, assert_same_run


def test_sigkill_resumes_from_the_local_tier_bit_exact(corpus: Path, tmp_path: Path, reference_run) -> None:
    reference = reference_run(max_steps=STEPS)
    run_dir, local = tmp_path / "run", tmp_path / "local"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, ckpt__local_interval=3, ckpt__local_dir=local),
        max_restarts=2,
        # Steps of 50 ms: the local save of step 24 (a few ms to a local disk) has committed by the
        # kill after step 25. The durable tier (every 10) has step 20.
        env={"FTJOB_FAULT": "slow:ms=50:restart=any;crash:step=25:rank=1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGKILL after step 25" in result.stderr
    mine = local / (run_dir / ".run-id").read_text().strip()  # this run's, under --ckpt.local-dir
    assert f"resumed from step 24 ({mine / 'step_00000024'})" in result.stderr
    assert "1 completed step(s) lost, next step 25" in result.stderr
    assert_same_run(reference, run_dir)
    rows = metrics_rows(run_dir)
    local_saves = [r["step"] for r in rows if r["kind"] == "checkpoint" and r.get("tier") == "local"]
    assert {3, 6, 9, 12, 24, 27}.issubset(local_saves) and not {10, 20, 30}.intersection(local_saves)
    assert [(r["step"], r["lost_steps"]) for r in rows if r["kind"] == "resume"] == [(24, 1)]
    assert not mine.exists()  # the run completed: its final checkpoint is durable, the local copy went


def test_the_local_tier_keeps_only_its_newest_checkpoint(corpus: Path, tmp_path: Path) -> None:
    run_dir, local = tmp_path / "run", tmp_path / "local"
    # Killed after step 23, no restarts: local saves at 5 and 15 (10 and 20 are durable steps).
    args = tiny_args(run_dir, corpus, max_steps=STEPS, ckpt__local_interval=5, ckpt__local_dir=local)
    result = run_torchrun(args, max_restarts=0, env={"FTJOB_FAULT": "slow:ms=30;crash:step=23:rank=0"})
    assert result.returncode != 0
    mine = local / (run_dir / ".run-id").read_text().strip()
    assert sorted(p.name for p in mine.glob("step_*")) == ["step_00000015"]
    durable = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert durable == ["step_00000010", "step_00000020"]
