"""Resume on every start: the newest valid checkpoint on any node, and every rank loads that one.

Each rank that writes checkpoints (one per node, see train/replicas.py) lists, reads and verifies
its own checkpoint directory and reports its newest valid checkpoint (step and the digest of its
files); every rank receives all reports and applies the same rule - the newest step held by any
node, the lowest rank that holds it sends it - so ranks can never pick different checkpoints.
Every other rank that can see a copy of it on its own filesystem (its node's copy, or a shared run
directory) reads and verifies that copy; only the ranks that cannot receive it, from the sender,
in a process group of just those ranks. A node whose disk was lost (or a replacement that joined
with an empty directory) therefore resumes where the others are, never at step 1, and the network
carries a checkpoint only to the nodes that lack it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch.distributed as dist

from train import comm
from train.ckpt.manager import CheckpointManager, Loaded, decode, load_newest
from train.ckpt.manifest import Problem
from train.ckpt.storage import LocalStorage
from train.dist import DistEnv
from train.errors import IncompatibleCheckpointError
from train.state import CKPT_FILES, TrainState

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


def _fits(state: TrainState, fingerprint: str):
    def fits(loaded: Loaded) -> None:
        if loaded.manifest.get("fingerprint") != fingerprint:
            return  # another model's checkpoint: a permanent error below, not a reason to fall back
        try:
            state.check(loaded.objects)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise Problem(f"its contents do not fit this job ({e})") from None

    return fits


def _decide(
    managers: list[CheckpointManager], state: TrainState, fingerprint: str, run_dir: Path, node: int
) -> tuple[dict, dict[str, bytes]]:
    for manager in managers:
        removed = manager.storage.clean_temporaries()
        if removed:
            log.info(
                "removed %d leftover temporary checkpoint dir(s) from an interrupted write in %s",
                len(removed),
                manager.storage.location(""),
            )
    loaded = load_newest(managers, validate=_fits(state, fingerprint))
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
        "node": node,
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


def _read_copy(header: dict, holders: list[dict], state: TrainState, fingerprint: str) -> dict | None:
    """The chosen checkpoint's files from a copy this rank can see on its own filesystem (a
    holder's location: the same node, or a shared directory), verified; None if it sees none."""
    for report in holders:
        location = Path(report["location"])
        if not (location / "manifest.json").is_file():
            continue
        reader = CheckpointManager(LocalStorage(location.parent), keep=1, files=CKPT_FILES)
        try:
            manifest, blobs = reader.read_verified(location.name)
            if _digest(manifest) != header["digest"]:
                continue  # the same path on this node holds something else
            _fits(state, fingerprint)(
                Loaded(header["step"], location.name, str(location), manifest, blobs, [], decode(blobs))
            )
        except Problem as p:
            log.warning(
                "the copy of checkpoint step %d at %s is not usable here: %s", header["step"], location, p
            )
            continue
        return blobs
    return None


def _receive(header: dict, source: int, mine: dict, env: DistEnv, receivers: list[int]) -> dict:
    """Send (``source``) or receive (``receivers``) the files, in a group of just those ranks."""
    group = dist.new_group([source, *receivers]) if receivers else None  # every rank must call it
    try:
        if group is None or env.rank not in (source, *receivers):
            return mine
        return {
            f: comm.broadcast_bytes(mine.get(f), env.device, src=source, group=group) for f in header["files"]
        }
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def resume(
    manager: CheckpointManager,
    state: TrainState,
    env: DistEnv,
    fingerprint: str,
    reads: bool,
    local: CheckpointManager | None = None,
    shared: bool = True,
) -> dict | None:
    """Restore ``state`` from the newest valid checkpoint on any node; return what the resume row
    logs, or None. ``reads``: this rank reads its node's checkpoints (see train/replicas.py);
    ``local``: its node-local tier as well (train/local_tier.py); ``shared``: the nodes share the
    run directory, so a copy of another node's is visible here (otherwise only this node's are:
    the same path on another machine is another disk)."""
    run_dir = Path(manager.storage.location("")).parent
    managers = [manager, *([local] if local is not None else [])]
    report, blobs = (
        _decide(managers, state, fingerprint, run_dir, env.node) if reads else ({"status": "skip"}, {})
    )
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
    holders = [
        r
        for r in reports
        if r["status"] == "ok"
        and (r["step"], r["digest"]) == (header["step"], header["digest"])
        and (shared or r["node"] == env.node)
    ]
    held = bool(blobs) and report.get("digest") == header["digest"] and report.get("step") == header["step"]
    if not held:  # an older checkpoint of this node's, say: not what is loaded
        blobs = _read_copy(header, holders, state, fingerprint) or {} if env.backend else {}
    lacking = (
        [b == b"1" for b in comm.all_gather_bytes(b"0" if blobs else b"1", env.device)]
        if env.backend
        else [False]
    )
    receivers = [rank for rank, lacks in enumerate(lacking) if lacks]
    if env.rank == source and receivers:
        log.info(
            "sending checkpoint step %d to the %d rank(s) that cannot read a copy of it",
            header["step"],
            len(receivers),
        )
    blobs = _receive(header, source, blobs, env, receivers)
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
        "received_by": receivers,
    }
