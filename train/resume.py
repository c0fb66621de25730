"""Resume on every start: rank 0 picks the newest valid checkpoint, every rank loads that one.

Rank 0 alone lists, reads and verifies the checkpoint directory, then broadcasts a header and the
files' bytes. Ranks therefore can never pick different checkpoints, and only rank 0's node needs the
run directory (multi-node runs without a shared filesystem resume too).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from train import comm
from train.ckpt.manager import CheckpointManager, Loaded
from train.ckpt.manifest import Problem
from train.dist import DistEnv
from train.errors import IncompatibleCheckpointError
from train.state import TrainState

log = logging.getLogger("train")


def last_logged_step(metrics_file: Path) -> int:
    last = 0
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if row.get("kind") == "train":
                last = max(last, int(row["step"]))
    return last


def _decide(
    manager: CheckpointManager, state: TrainState, fingerprint: str, run_dir: Path
) -> tuple[dict, dict[str, bytes]]:
    removed = manager.storage.clean_temporaries()
    if removed:
        log.info("removed %d leftover temporary checkpoint dir(s) from an interrupted write", len(removed))

    def fits(loaded: Loaded) -> None:
        if loaded.manifest.get("fingerprint") != fingerprint:
            return  # another model's checkpoint: a permanent error below, not a reason to fall back
        try:
            state.check(loaded.objects)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise Problem(f"its contents do not fit this job ({e})") from None

    loaded = manager.load_latest(validate=fits)
    if loaded is None:
        return {"status": "none"}, {}
    if loaded.manifest.get("fingerprint") != fingerprint:
        return {
            "status": "error",
            "message": (
                f"checkpoint {loaded.location} was written by a different model/config "
                f"(fingerprint {loaded.manifest.get('fingerprint')} != {fingerprint}); "
                "resume with the original --task/--model/--data settings or use a new --run-dir"
            ),
        }, {}
    header = {
        "status": "ok",
        "step": loaded.step,
        "location": loaded.location,
        "files": sorted(loaded.blobs),
        "skipped": loaded.skipped,
        "last_logged": last_logged_step(run_dir / "metrics.jsonl"),
    }
    return header, loaded.blobs


def resume(manager: CheckpointManager, state: TrainState, env: DistEnv, fingerprint: str) -> dict | None:
    """Restore ``state`` from the newest valid checkpoint; return what the resume row logs, or None."""
    header, blobs = (
        _decide(manager, state, fingerprint, Path(manager.storage.location("")).parent)
        if env.is_main
        else ({}, {})
    )
    header = json.loads(
        comm.broadcast_bytes(json.dumps(header).encode() if env.is_main else None, env.device)
    )
    if header["status"] == "error":
        raise IncompatibleCheckpointError(header["message"])
    if header["status"] == "none":
        log.info("no checkpoint to resume from: starting at step 1")
        return None
    blobs = {f: comm.broadcast_bytes(blobs.get(f), env.device) for f in header["files"]}
    state.restore(blobs, env.rank, env.world_size, env.device)
    lost = max(header["last_logged"] - header["step"], 0)
    log.info(
        "resumed from step %d (%s); %d completed step(s) lost, next step %d",
        header["step"],
        header["location"],
        lost,
        header["step"] + 1,
    )
    return {
        "step": header["step"],
        "path": header["location"],
        "lost_steps": lost,
        "skipped": [name for name, _ in header["skipped"]],
    }
