"""--compile true (torch.compile of the DDP-wrapped model) keeps every resume guarantee: bit-exact
resume after a SIGKILL, checkpoints with plain names that an uncompiled run loads and vice versa."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import run_torchrun, tiny_args, train_losses

STEPS = 30


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for every run here, as on a machine that ran the job before."""
    return tmp_path_factory.mktemp("compile") / "cache"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, corpus: Path, cache: Path) -> Path:
    """An uninterrupted compiled run."""
    run_dir = tmp_path_factory.mktemp("compiled") / "run"
    first = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, compile=True, data__cache_dir=cache), timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    return run_dir


def test_compiled_run_resumes_bit_exact_with_plain_names(
    corpus: Path, tmp_path: Path, cache: Path, compiled: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, compile=True, data__cache_dir=cache),
        max_restarts=1,
        env={"FTJOB_FAULT": "crash:step=15:rank=1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stderr
    assert "warm restart: trainer forked" not in result.stderr  # cold: see --compile's help
    assert train_losses(run_dir) == train_losses(compiled)
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    a, b = safetensors.torch.load_file(compiled / final), safetensors.torch.load_file(run_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [k for k in b if k.startswith(("_orig_mod.", "module."))], sorted(b)[:5]
    assert (cache / "inductor").is_dir()  # not the shared /tmp/torchinductor_<user>


@pytest.mark.parametrize("compiled_first", [True, False])
def test_compiled_and_plain_runs_resume_from_each_other(
    corpus: Path, tmp_path: Path, cache: Path, compiled: Path, reference_run, compiled_first: bool
) -> None:
    first = compiled if compiled_first else reference_run(max_steps=STEPS)  # a plain run, shared
    run_dir = tmp_path / "run"
    shutil.copytree(first, run_dir)
    again = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS + 10, compile=not compiled_first, data__cache_dir=cache),
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {STEPS}" in again.stderr and max(train_losses(run_dir)) == STEPS + 10
