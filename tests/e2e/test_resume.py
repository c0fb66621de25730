"""End-to-end: real torchrun runs killed with SIGKILL and restarted end exactly like an uninterrupted run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import metrics_rows, run_torchrun, tiny_args, train_losses

from train.ckpt.manifest import deserialize

STEPS = 40


def final_state(run_dir: Path, step: int = STEPS) -> tuple[dict, dict]:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    weights = safetensors.torch.load_file(ckpt / "model.safetensors")
    optim = deserialize("optim.safetensors", (ckpt / "optim.safetensors").read_bytes())
    return weights, optim


def assert_same_run(reference: Path, run: Path) -> None:
    ref_losses, losses = train_losses(reference), train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    differing = [s for s in ref_losses if ref_losses[s] != losses[s]]
    assert not differing, f"losses differ at steps {differing[:10]}"
    (w_ref, o_ref), (w, o) = final_state(reference), final_state(run)
    assert w_ref.keys() == w.keys()
    assert all(torch.equal(w_ref[k], w[k]) for k in w_ref), "final weights differ"
    ref_moments = [t for s in o_ref["state"].values() for t in s.values()]
    moments = [t for s in o["state"].values() for t in s.values()]
    assert all(torch.equal(a, b) for a, b in zip(ref_moments, moments, strict=True)), (
        "optimizer state differs"
    )


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    return reference_run(max_steps=STEPS)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, str]:
    """One run SIGKILLed four times, each restart warm: rank 1 and rank 0 mid-training, and twice
    inside a checkpoint commit (after a file is written; before the rename), async saves. The
    mid-training kills wait for the save before them to end (``idle=1``): on a loaded machine a
    save can outlast 5 steps, and the next planned save would then be skipped, its kill never firing."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    faults = [
        "await_zygote:step=1",  # the zygote is up before the first kill: every restart is warm
        "crash:step=15:rank=1:idle=1",
        "kill:point=ckpt.file_written:save_step=20:restart=1",
        "crash:step=25:rank=0:restart=2:idle=1",
        "kill:point=ckpt.before_rename:save_step=30:restart=3",
    ]
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS), max_restarts=4, env={"FTJOB_FAULT": ";".join(faults)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stderr


def test_sigkills_of_any_rank_at_any_point_resume_bit_exact(
    reference: Path, killed: tuple[Path, str]
) -> None:
    run_dir, stderr = killed
    assert re.search(r"SIGKILL after step 1[5-9]", stderr) and re.search(r"SIGKILL after step 2[5-9]", stderr)
    assert "SIGKILL at ckpt.file_written" in stderr and "SIGKILL at ckpt.before_rename" in stderr
    # Each resume from the newest committed checkpoint; a torn write (step 20, then 30) never counts.
    resumes = [(r["step"], r["lost_steps"]) for r in metrics_rows(run_dir) if r["kind"] == "resume"]
    assert [step for step, _ in resumes] == [10, 10, 20, 20], resumes
    # A kill in the writer's thread lands while the loop may have run a step past the save.
    assert resumes[0][1] >= 5 and resumes[2][1] >= 5 and resumes[1][1] >= 10 and resumes[3][1] >= 10
    assert "resumed from step 20" in stderr
    assert re.search(r"\d+ completed step\(s\) lost, next step 21", stderr)
    assert_same_run(reference, run_dir)


def test_every_restart_reinitialises_and_is_warm(killed: tuple[Path, str]) -> None:
    run_dir, stderr = killed
    # Five attempts, each with both ranks' process group up, no failed re-initialisation.
    assert stderr.count("process group up") == 10
    assert stderr.count("warm restart: trainer forked") == 8  # every restart, both ranks
    assert "connectFullMesh" not in stderr
    assert {0, 1, 2, 3, 4} <= {r.get("restart") for r in metrics_rows(run_dir)}


def test_a_cold_restart_resumes_bit_exact(reference: Path, corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, dist__warm_restart=False),
        max_restarts=1,
        env={"FTJOB_FAULT": "crash:step=25:rank=1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm restart: trainer forked" not in result.stderr  # both imported torch anew
    assert "resumed from step 20" in result.stderr
    assert_same_run(reference, run_dir)


def test_sigkill_inside_a_synchronous_commit_resumes_bit_exact(
    reference: Path, corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, ckpt__async=False),
        max_restarts=1,
        env={"FTJOB_FAULT": "kill:point=ckpt.before_rename:save_step=30"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGKILL at ckpt.before_rename" in result.stderr
    assert "resumed from step 20" in result.stderr  # the torn step-30 write never became a checkpoint
    assert_same_run(reference, run_dir)


def test_corrupt_newest_checkpoint_falls_back_and_is_set_aside(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_torchrun(tiny_args(run_dir, corpus, max_steps=20))
    assert first.returncode == 0, first.stderr[-3000:]
    newest = run_dir / "checkpoints" / "step_00000020" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    second = run_torchrun(tiny_args(run_dir, corpus, max_steps=30))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "step_00000020 is not usable (model.safetensors: checksum mismatch" in second.stderr
    assert "resumed from step 10" in second.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert any(n.startswith("step_00000020.invalid-") for n in names), names
    assert {"step_00000020", "step_00000030"} <= set(names)
