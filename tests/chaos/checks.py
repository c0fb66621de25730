"""Reading back what a run left: metrics rows, checkpoints (every checksum checked), exit records,
and the bit-for-bit comparison with the uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from chaos.harness import STEPS
from safetensors.torch import load_file

from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl, skipping a line torn by a kill."""
    out = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict):
                    out.append(row)
    return out


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in rows(run_dir) if r.get("kind") == "train"), default=0)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if r.get("kind") == "train"}


def committed(run_dir: Path) -> list[int]:
    """Steps of committed checkpoint directories (a rename makes them appear whole), newest first."""
    try:
        names = os.listdir(run_dir / "checkpoints")
    except OSError:
        return []
    return sorted((int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit()), reverse=True)


def temporaries(run_dir: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".tmp-"))
    return []


def checkpoints(run_dir: Path) -> list[tuple[int, bool, str]]:
    """(step, valid, why not) of each checkpoint, newest first, every checksum checked."""
    if not (run_dir / "checkpoints").is_dir():
        return []
    manager = CheckpointManager(LocalStorage(run_dir / "checkpoints"), keep=1)
    return [(i.step, i.valid, i.reason) for i in manager.list(deep=True)]


def newest_valid(run_dir: Path) -> int | None:
    return next((step for step, valid, _ in checkpoints(run_dir) if valid), None)


def all_valid(run_dir: Path) -> str:
    """'' if every committed checkpoint verifies and no temporary is left, else what is wrong."""
    bad = [f"step {s}: {why}" for s, valid, why in checkpoints(run_dir) if not valid]
    if bad:
        return "invalid checkpoint " + bad[0]
    if temporaries(run_dir):
        return f"temporary left behind: {temporaries(run_dir)[0]}"
    return ""


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: to show that nothing was touched."""
    if not path.is_dir():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    if a.keys() != b.keys():
        return f"tensor names differ ({sorted(a.keys() ^ b.keys())[:3]})"
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return f"{k} differs"
    return ""


def compare(run_dir: Path, reference: Path, step: int = STEPS) -> str:
    """'' if the final checkpoint's model and optimizer are bit-identical to the reference's and the
    losses logged by both are float-for-float equal, else why not."""
    name = f"checkpoints/step_{step:08d}"
    for file in ("model.safetensors", "optim.safetensors"):
        try:
            got = load_file(run_dir / name / file)
        except Exception as e:
            return f"final {file} unreadable: {type(e).__name__}: {str(e)[:100]}"
        problem = _same_tensors(got, load_file(reference / name / file))
        if problem:
            return f"final {file} not bit-identical: {problem}"
    mine, theirs = losses(run_dir), losses(reference)
    for s in sorted(mine.keys() & theirs.keys()):
        if mine[s] != theirs[s]:
            return f"loss of step {s} differs from the uninterrupted run ({mine[s]!r} vs {theirs[s]!r})"
    return ""


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def exit_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
