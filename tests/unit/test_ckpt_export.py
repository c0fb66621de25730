"""`python -m train.ckpt export`: a checkpoint's model as one safetensors file or a DCP directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from train.ckpt.__main__ import main
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage


def weights(step: int, prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(step)
    return {f"{prefix}blocks.0.w": torch.randn(64, 32), f"{prefix}head.b": torch.randn(7).to(torch.bfloat16)}


def save(root: Path, step: int, model: dict[str, torch.Tensor]) -> None:
    CheckpointManager(LocalStorage(root / "checkpoints"), keep=5).save(
        step,
        {"model.safetensors": model, "optim.safetensors": {"state": {"0": torch.ones(3)}}},
        {"fingerprint": "abc"},
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    for step in (10, 20):
        save(tmp_path / "run", step, weights(step))
    return tmp_path / "run"


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_safetensors_export_is_the_newest_model_with_plain_names(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert same(safetensors.torch.load_file(out), weights(20))
    assert "from step_00000020" in capsys.readouterr().out


def test_wrapper_prefixes_go_and_the_same_weights_give_the_same_bytes(run_dir: Path, tmp_path: Path) -> None:
    wrapped = tmp_path / "wrapped"
    save(wrapped, 20, {**weights(20, "module._orig_mod.")})
    plain_out, wrapped_out = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["export", str(run_dir), "--out", str(plain_out)]) == 0
    assert main(["export", str(wrapped), "--out", str(wrapped_out)]) == 0
    assert plain_out.read_bytes() == wrapped_out.read_bytes()


def test_dcp_export_loads_with_dcp(run_dir: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "dcp"
    assert main(["export", str(run_dir), "--step", "10", "--format", "dcp", "--out", str(out)]) == 0
    into = {k: torch.zeros_like(v) for k, v in weights(10).items()}
    dcp.load(into, checkpoint_id=str(out), no_dist=True)
    assert same(into, weights(10))


def test_a_corrupt_newest_is_skipped_and_a_corrupt_asked_step_is_one_line(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    target = run_dir / "checkpoints" / "step_00000020" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert same(safetensors.torch.load_file(out), weights(10))
    assert "step_00000020 is not usable (model.safetensors: checksum mismatch" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--step", "20", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pick another --step" in err[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_only_the_model_file_is_read(run_dir: Path, tmp_path: Path) -> None:
    optim = run_dir / "checkpoints" / "step_00000020" / "optim.safetensors"
    data = bytearray(optim.read_bytes())
    data[-1] ^= 1  # its checksum would fail if it were read (its size still matches)
    optim.write_bytes(bytes(data))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert same(safetensors.torch.load_file(tmp_path / "m.safetensors"), weights(20))


def test_bad_destinations_are_refused_and_nothing_is_touched(run_dir: Path, tmp_path: Path, capsys) -> None:
    inside = run_dir / "checkpoints" / "m.safetensors"
    assert main(["export", str(run_dir), "--out", str(inside)]) == 2
    assert "inside the checkpoints' directory" in capsys.readouterr().err and not inside.exists()
    existing = tmp_path / "m.safetensors"
    existing.write_bytes(b"keep me")
    assert main(["export", str(run_dir), "--out", str(existing)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and existing.read_bytes() == b"keep me"
    assert main(["export", str(run_dir), "--out", str(existing), "--overwrite"]) == 0
    assert same(safetensors.torch.load_file(existing), weights(20))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "nowhere" / "m.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_a_checkpoint_without_the_file_says_so(run_dir: Path, tmp_path: Path, capsys) -> None:
    args = [
        "export",
        str(run_dir),
        "--step",
        "20",
        "--file",
        "nope.safetensors",
        "--out",
        str(tmp_path / "m"),
    ]
    assert main(args) == 2
    assert "holds no nope.safetensors" in capsys.readouterr().err


def test_a_folder_holding_the_checkpoints_is_never_replaced(run_dir: Path, tmp_path: Path, capsys) -> None:
    for out in (run_dir, tmp_path):  # the run dir, and a folder above it
        assert main(["export", str(run_dir), "--out", str(out), "--overwrite"]) == 2
        assert "holds the checkpoints' directory" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "step_00000020" / "model.safetensors").is_file()


def test_overwrite_replaces_a_directory_a_file_or_a_link(run_dir: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    assert main(["export", str(run_dir), "--out", str(out), "--overwrite"]) == 0  # a file over a dir
    assert same(safetensors.torch.load_file(out), weights(20))
    link = tmp_path / "link"
    link.symlink_to(out)
    assert main(["export", str(run_dir), "--format", "dcp", "--out", str(link), "--overwrite"]) == 0
    assert link.is_dir() and not link.is_symlink() and out.is_file()  # the link replaced, not its target
    into = {k: torch.zeros_like(v) for k, v in weights(20).items()}
    dcp.load(into, checkpoint_id=str(link), no_dist=True)
    assert same(into, weights(20))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
