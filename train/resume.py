"""Resume on every start: the newest valid checkpoint on any node, and every rank loads that one.

Each rank that writes checkpoints (one per node, see train/replicas.py) lists, reads and verifies
its own checkpoint directory and reports its newest valid checkpoint (step and the digest of its
files); every rank receives all reports and applies the same rule - the newest step held by any
node, the lowest rank that holds it sends it - so ranks can never pick different checkpoints. The
sender broadcasts a header and the files' bytes. A node whose disk was lost (or a replacement that
joined with an empty directory) therefore resumes where the others are, never at step 1.
"""

from __future__ import annotations

import hashlib
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
        return {"status": "none", "last_logged": last_logged_step(run_dir / "metrics.jsonl")}, {}
    if loaded.manifest.get("fingerprint") != fingerprint:
        return {
            "status": "error",
            "step": loaded.step,
            "message": (
                f"checkpoint {loaded.location} was written by a different model/config "
                f"(fingerprint {loaded.manifest.get('fingerprint')} != {fingerprint}); "
                "resume with the original --task/--model/--data settings or use a new --run-dir"
            ),
        }, {}
    header = {
        "status": "ok",
        "step": loaded.step,
        "digest": _digest(loaded.manifest),
        "location": loaded.location,
        "files": sorted(loaded.blobs),
        "skipped": loaded.skipped,
        "last_logged": last_logged_step(run_dir / "metrics.jsonl"),
    }
    return header, loaded.blobs


def _digest(manifest: dict) -> str:
    """The same on every node for the same state (each node's manifest has its own time)."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]


def _choose(reports: list[dict]) -> tuple[int | None, dict]:
    """(the rank that sends, its report), or (None, why not) - the same answer on every rank."""
    oks = [(r["step"], -rank, rank) for rank, r in enumerate(reports) if r["status"] == "ok"]
    errors = [r for r in reports if r["status"] == "error"]
    newest = max(oks)[0] if oks else -1
    blocking = [r for r in errors if r.get("step", newest) >= newest]
    if blocking:
        return None, blocking[0]
    if not oks:
        last = max((r.get("last_logged", 0) for r in reports), default=0)
        return None, {"status": "none", "last_logged": last}
    source = max(oks)[2]
    digests = {r["digest"] for r in reports if r["status"] == "ok" and r["step"] == newest}
    if len(digests) > 1:
        log.warning("nodes hold different checkpoints of step %d; using rank %d's", newest, source)
    return source, reports[source]


def resume(
    manager: CheckpointManager, state: TrainState, env: DistEnv, fingerprint: str, reads: bool
) -> dict | None:
    """Restore ``state`` from the newest valid checkpoint on any node; return what the resume row
    logs, or None. ``reads``: this rank reads its node's checkpoints (see train/replicas.py)."""
    run_dir = Path(manager.storage.location("")).parent
    report, blobs = _decide(manager, state, fingerprint, run_dir) if reads else ({"status": "skip"}, {})
    if not env.backend:
        reports = [report]
    else:
        payload = json.dumps(report).encode()
        reports = [json.loads(b) for b in comm.all_gather_bytes(payload, env.device)]
    source, header = _choose(reports)
    if header["status"] == "error":
        raise IncompatibleCheckpointError(header["message"], echo=env.rank == 0)
    if source is None:
        if header["last_logged"]:
            log.warning(
                "no valid checkpoint on any node, but metrics.jsonl shows %d completed step(s): "
                "they are lost; starting at step 1",
                header["last_logged"],
            )
        else:
            log.info("no checkpoint to resume from: starting at step 1")
        return None
    lacking = [r for r in reports if r["status"] != "skip" and r.get("step") != header["step"]]
    if env.rank == source and lacking:
        log.info("sending checkpoint step %d to the %d node(s) that lack it", header["step"], len(lacking))
    mine = blobs if env.rank == source else {}
    blobs = {f: comm.broadcast_bytes(mine.get(f), env.device, src=source) for f in header["files"]}
    state.restore(blobs, env.rank, env.world_size, env.device)
    lost = max(max(r.get("last_logged", 0) for r in reports) - header["step"], 0)
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
        "source_rank": source,
    }
