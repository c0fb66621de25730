"""--compile true (torch.compile of the DDP-wrapped model) keeps every resume guarantee: bit-exact
resume after a SIGKILL, checkpoints with plain names that an uncompiled run loads and vice versa."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from conftest import run_torchrun, tiny_args, train_losses

STEPS = 30


def test_compiled_run_resumes_bit_exact_with_plain_names(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"  # one compile cache for both runs, as on a machine that ran it before
    opts = {"max_steps": STEPS, "compile": True, "data__cache_dir": cache}
    reference = tmp_path / "reference"
    first = run_torchrun(tiny_args(reference, corpus, **opts), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, **opts),
        max_restarts=1,
        env={"FTJOB_FAULT": "crash:step=15:rank=1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stderr
    assert "warm restart: trainer forked" not in result.stderr  # cold: see --compile's help
    assert train_losses(run_dir) == train_losses(reference)
    final = f"checkpoints/step_{STEPS:08d}/model.safetensors"
    a, b = safetensors.torch.load_file(reference / final), safetensors.torch.load_file(run_dir / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [k for k in b if k.startswith(("_orig_mod.", "module."))], sorted(b)[:5]
    assert (cache / "inductor").is_dir()  # not the shared /tmp/torchinductor_<user>


def test_compiled_and_plain_runs_resume_from_each_other(corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for compiled_first in (True, False):
        run_dir = tmp_path / f"run-{compiled_first}"
        first = run_torchrun(
            tiny_args(run_dir, corpus, max_steps=20, compile=compiled_first, data__cache_dir=cache),
            timeout=600,
        )
        assert first.returncode == 0, first.stderr[-3000:]
        again = run_torchrun(
            tiny_args(run_dir, corpus, max_steps=30, compile=not compiled_first, data__cache_dir=cache),
            timeout=600,
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resumed from step 20" in again.stderr and max(train_losses(run_dir)) == 30
