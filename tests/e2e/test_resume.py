"""End-to-end: real torchrun runs killed with SIGKILL and restarted end exactly like an uninterrupted run."""

from __future__ import annotations

import json
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
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_torchrun(tiny_args(run_dir, corpus, max_steps=STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize(("rank", "warm"), [(0, True), (1, True), (1, False)])
def test_sigkill_any_rank_resumes_bit_exact(
    reference: Path, corpus: Path, tmp_path: Path, rank: int, warm: bool
) -> None:
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, dist__warm_restart=warm),
        max_restarts=2,
        env={"FTJOB_FAULT": ("await_zygote:step=1;" if warm else "") + f"crash:step=25:rank={rank}"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Warm: both restarted trainers were forked from the zygote; cold: both imported torch anew.
    assert result.stderr.count("warm restart: trainer forked") == (2 if warm else 0)
    assert "SIGKILL after step 25" in result.stderr
    assert "resumed from step 20" in result.stderr
    assert "5 completed step(s) lost, next step 21" in result.stderr
    assert_same_run(reference, run_dir)
    resume_rows = [r for r in metrics_rows(run_dir) if r["kind"] == "resume"]
    assert [(r["step"], r["lost_steps"]) for r in resume_rows] == [(20, 5)]


@pytest.mark.parametrize(
    ("point", "async_save"),
    [("ckpt.file_written", "True"), ("ckpt.before_rename", "True"), ("ckpt.before_rename", "False")],
)
def test_sigkill_while_checkpoint_is_written(
    reference: Path, corpus: Path, tmp_path: Path, point: str, async_save: str
) -> None:
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, ckpt__async=async_save),
        max_restarts=2,
        env={"FTJOB_FAULT": f"kill:point={point}:save_step=30"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"SIGKILL at {point}" in result.stderr
    # The torn step-30 write never became a checkpoint: the resume came from step 20.
    assert "resumed from step 20" in result.stderr
    assert_same_run(reference, run_dir)


def test_three_kill_restart_cycles_reinitialise_every_time(
    reference: Path, corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    faults = "await_zygote:step=1;crash:step=12:rank=1;crash:step=24:rank=0:restart=1;"
    faults += "crash:step=33:rank=1:restart=2"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS), max_restarts=3, env={"FTJOB_FAULT": faults}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Four attempts, each with both ranks' process group up, no failed re-initialisation.
    assert result.stderr.count("process group up") == 8
    assert result.stderr.count("warm restart: trainer forked") == 6  # every restart, both ranks
    assert "connectFullMesh" not in result.stderr
    restarts = {r.get("restart") for r in metrics_rows(run_dir)}
    assert {0, 1, 2, 3} <= restarts
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


def test_checkpoint_of_another_model_is_a_clear_permanent_error(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_torchrun(tiny_args(run_dir, corpus, max_steps=10)).returncode == 0
    before = sorted((run_dir / "checkpoints").iterdir())
    result = run_torchrun(tiny_args(run_dir, corpus, max_steps=20, model__n_embd=64), max_restarts=3)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "different model/config" in errors[0] and "--run-dir" in errors[0]
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 4
    assert sorted((run_dir / "checkpoints").iterdir()) == before
    assert result.stderr.count("process group up") == 2  # one attempt: the restart loop was stopped


def test_three_ranks_resume_bit_exact(corpus: Path, tmp_path: Path) -> None:
    """With 3+ ranks, float sums depend on DDP's bucket layout: a resume must not change it."""
    opts = {"max_steps": 30, "global_batch_size": 24}
    reference = tmp_path / "reference"
    assert run_torchrun(tiny_args(reference, corpus, **opts), nproc=3).returncode == 0
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, **opts),
        nproc=3,
        max_restarts=1,
        env={"FTJOB_FAULT": "crash:step=15:rank=2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stderr
    assert train_losses(run_dir) == train_losses(reference)
    final = "checkpoints/step_00000030/model.safetensors"
    a, b = safetensors.torch.load_file(reference / final), safetensors.torch.load_file(run_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
