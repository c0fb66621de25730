"""Mixed precision keeps every resume guarantee: bf16 (autocast) and fp16 (autocast + a gradient
scaler, saved with the checkpoints) resume bit-exact after a SIGKILL, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import run_torchrun, tiny_args, train_losses

from train.ckpt.manifest import deserialize

STEPS = 30


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resumes_bit_exact(
    corpus: Path, tmp_path: Path, precision: str, reference_run
) -> None:
    opts = {"max_steps": STEPS, "precision": precision}
    reference = reference_run(**opts)
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, **opts), max_restarts=1, env={"FTJOB_FAULT": "crash:step=15:rank=1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10" in result.stderr
    assert train_losses(run_dir) == train_losses(reference)
    final = f"checkpoints/step_{STEPS:08d}"
    a = safetensors.torch.load_file(reference / final / "model.safetensors")
    b = safetensors.torch.load_file(run_dir / final / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and all(v.dtype == torch.float32 for v in b.values())
    train = deserialize("train.safetensors", (run_dir / final / "train.safetensors").read_bytes())
    if precision == "fp16":  # the scaler's state travels with the checkpoint
        assert train["scaler"]["scale"] > 0 and "_growth_tracker" in train["scaler"]
    else:
        assert train["scaler"] is None
    fp32 = train_losses(reference)
    assert all(abs(loss) < 10 for loss in fp32.values())  # trains: finite losses


def test_fp32_and_bf16_differ_but_both_train(reference_run) -> None:
    """A sanity check that autocast is really on: the losses are not the fp32 ones."""
    fp32 = train_losses(reference_run(max_steps=STEPS))
    bf16 = train_losses(reference_run(max_steps=STEPS, precision="bf16"))
    assert fp32 != bf16
    assert abs(fp32[STEPS] - bf16[STEPS]) < 0.5
