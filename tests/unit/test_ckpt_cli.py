"""`python -m train.ckpt ls|verify|inspect RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.ckpt import manifest as mf
from train.ckpt.__main__ import main
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    manager = CheckpointManager(LocalStorage(tmp_path / "run" / "checkpoints"), keep=5)
    for step in (10, 20):
        manager.save(
            step,
            {
                "model.safetensors": {"w": torch.full((1000,), float(step))},
                "train.safetensors": {"step": step},
            },
            {"world_size": 2, "fingerprint": "abc", "config": {"max_steps": 20}},
        )
    return tmp_path / "run"


def test_ls_lists_newest_first_with_status(run_dir: Path, capsys) -> None:
    assert main(["ls", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "size", "time", "status"]
    assert [line.split()[0] for line in lines[1:]] == ["20", "10"]
    assert all(line.endswith("ok") for line in lines[1:])


def test_verify_reports_corruption_and_exit_code(run_dir: Path, capsys) -> None:
    assert main(["verify", str(run_dir)]) == 0
    target = run_dir / "checkpoints" / "step_00000020" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "step_00000020: INVALID: model.safetensors: checksum mismatch" in out
    assert "step_00000010: ok" in out
    # ls (sizes only) cannot see a flipped byte, but sees a truncation.
    target.write_bytes(bytes(data[:-10]))
    main(["ls", str(run_dir)])
    assert "INVALID: model.safetensors" in capsys.readouterr().out


def test_inspect_shows_manifest_and_config(run_dir: Path, capsys) -> None:
    assert main(["inspect", str(run_dir), "--step", "10"]) == 0
    out = capsys.readouterr().out
    manifest_text, config_text = out.split("config:\n")
    manifest = json.loads(manifest_text)
    assert manifest["step"] == 10 and manifest["world_size"] == 2 and "model.safetensors" in manifest["files"]
    assert json.loads(config_text) == {"max_steps": 20}


def test_checkpoints_dir_itself_is_accepted(run_dir: Path, capsys) -> None:
    assert main(["ls", str(run_dir / "checkpoints")]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "/nonexistent/run"], "is not a directory"),
        (["verify", "EMPTY"], "no checkpoints under"),
        (["inspect", "RUN", "--step", "99"], "no valid checkpoint at step 99"),
    ],
)
def test_clear_errors(run_dir: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("RUN", str(run_dir)) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_verify_reports_a_checkpoint_that_does_not_deserialise(run_dir: Path, capsys) -> None:
    step_dir = run_dir / "checkpoints" / "step_00000020"
    garbage = b"\x00" * 64  # checksummed by its manifest, yet no safetensors file
    (step_dir / "model.safetensors").write_bytes(garbage)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"size": len(garbage), "xxh3_64": mf.checksum(garbage)}
    manifest["time"] = 1e300  # nor does a time out of range break ls
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["ls", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["20", "0.00MB", "-"]
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "step_00000020: INVALID: model.safetensors does not deserialise" in out
    assert "step_00000010: ok" in out
