"""Resume on every start: the newest valid checkpoint on any node, and every rank loads that one.

1. Each rank that writes checkpoints (one per node, train/replicas.py; in both tiers,
   train/local_tier.py) lists its checkpoints - manifests and file sizes, nothing read yet - and
   every rank receives every list.
2. Every rank applies the same rule to the same lists, so no two can pick different checkpoints:
   the newest step on any node; the lowest rank that holds it sends it.
3. Every rank that can see a copy (its own node's, or any in a shared run directory) reads and
   verifies that copy. The sender streams its copy, while reading it, to the ranks that cannot see
   one (train/stream.py): only nodes that lack the checkpoint get it over the network. A receiver
   decodes each file as it arrives (train/ckpt/decoder.py), the weights straight into its model's
   own tensors, and verifies it against the manifest, as a reader does.
4. One all-gather of the outcomes. If any copy failed (checksum, decoding, does not fit the model)
   the round repeats without it: another node's copy, or the next older step, as on one node.

So a node whose disk was lost, or a replacement that joined with an empty directory, resumes where
the others are, never at step 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from train import comm, records, snapshot, stream
from train.ckpt.decoder import Decoder
from train.ckpt.manager import CheckpointManager, decode
from train.ckpt.manifest import Problem
from train.ckpt.objstore import open_storage
from train.dist import DistEnv
from train.errors import IncompatibleCheckpointError
from train.state import CKPT_FILES, TrainState

log = logging.getLogger("train")
Objects = dict[str, Any]  # a checkpoint's files, decoded


def _digest(files: dict) -> str:
    """The same on every node for the same state (each node's manifest has its own time)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _candidates(managers: list[CheckpointManager | None]) -> list[dict]:
    """Every checkpoint in every tier this rank reads (None: a tier it does not), newest first;
    those whose manifest or sizes do not check out with the problem (they are never chosen, only
    reported as skipped)."""
    found = []
    for tier, manager in enumerate(managers):
        if manager is None:
            continue
        removed = manager.storage.clean_temporaries()
        if removed:
            log.info(
                "removed %d leftover temporary checkpoint dir(s) from an interrupted write in %s",
                len(removed),
                manager.storage.location(""),
            )
        for info in manager.list():
            location = manager.storage.location(info.name)
            if not info.valid:
                log.warning(
                    "checkpoint %s is not usable (%s); trying the next older one", location, info.reason
                )
                found.append({"tier": tier, "name": info.name, "step": info.step, "problem": info.reason})
                continue
            try:
                manifest = manager.manifest(info.name)
            except Problem:
                continue  # changed since listed
            entries = manifest["files"]
            found.append(
                {
                    "tier": tier,
                    "name": info.name,
                    "step": info.step,
                    "location": location,
                    "digest": _digest(entries),
                    "fingerprint": manifest.get("fingerprint"),
                    "entries": entries,
                }
            )
    return sorted(found, key=lambda c: (-c["step"], c["tier"]))


def _plan(reports: list[dict], excluded: set[tuple[int, str]], fingerprint: str) -> dict:
    """What every rank does, from every rank's list: the same answer on every rank."""
    listed = [
        (c["step"], rank, c)
        for rank, r in enumerate(reports)
        for c in r["candidates"]
        if "problem" not in c and (rank, c["location"]) not in excluded
    ]
    good = [x for x in listed if x[2]["fingerprint"] == fingerprint]
    newest = max((step for step, _, _ in good), default=-1)
    foreign = [c for step, _, c in listed if c["fingerprint"] != fingerprint and step >= newest]
    if foreign:
        c = max(foreign, key=lambda c: c["step"])
        return {
            "status": "error",
            "message": (
                f"checkpoint {c['location']} was written by a different model/config "
                f"(fingerprint {c['fingerprint']} != {fingerprint}); "
                "resume with the original --task/--model/--data settings or use a new --run-dir"
            ),
        }
    if not good:
        return {"status": "none", "last_logged": max((r["last_logged"] for r in reports), default=0)}
    source, chosen = min(((rank, c) for step, rank, c in good if step == newest), key=lambda x: x[0])
    holders: dict[int, dict] = {}
    for step, rank, c in sorted(good, key=lambda x: (x[1], x[2]["tier"])):
        if step == newest and c["digest"] == chosen["digest"]:
            holders.setdefault(rank, c)
    if any(c["digest"] != chosen["digest"] for step, _, c in good if step == newest):
        log.warning("nodes hold different checkpoints of step %d; using rank %d's", newest, source)
    return {"status": "ok", "source": source, "chosen": chosen, "holders": holders}


def _check(state: TrainState, entries: dict, objects: Objects) -> None:
    if set(objects) != set(entries):
        raise Problem("it does not hold the files its manifest lists")
    try:
        snapshot.check(state, objects)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise Problem(f"its contents do not fit this job ({e})") from None


def _role(
    rank: int, plan: dict, reports: list[dict], shared: bool, forced: set[int]
) -> tuple[str, dict | None]:
    """("own" | "copy" | "receive", the copy to read)."""
    holders = plan["holders"]
    if rank in holders:
        return "own", holders[rank]
    if rank not in forced:
        node = reports[rank]["node"]
        for holder, c in sorted(holders.items()):
            # A shared run dir shares the durable tier; a node-local tier is only ever its node's.
            if (shared and c["tier"] == 0) or reports[holder]["node"] == node:
                return "copy", c
    return "receive", None


def _load(
    env: DistEnv,
    state: TrainState,
    managers: list[CheckpointManager],
    plan: dict,
    roles: list[tuple[str, dict | None]],
) -> tuple[Objects, str]:
    """This rank's part of one round: (its files decoded, "" or why they are not usable)."""
    source, chosen = plan["source"], plan["chosen"]
    receivers = [rank for rank, (role, _) in enumerate(roles) if role == "receive"]
    group = dist.new_group([source, *receivers]) if receivers else None  # every rank calls it
    role, copy = roles[env.rank]
    blobs: dict[str, bytes | memoryview] = {}
    objects: Objects = {}
    try:
        if role == "receive":
            return _receive(env, state, chosen, source, group)
        if role == "own":
            reader, name = managers[copy["tier"]], copy["name"]  # type: ignore[index]
        else:
            root, _, name = copy["location"].rstrip("/").rpartition("/")  # type: ignore[index]
            reader = CheckpointManager(open_storage(root), keep=1, files=CKPT_FILES)
        relay = None
        if env.rank == source and group is not None:
            sizes = {f: e["size"] for f, e in chosen["entries"].items()}
            relay = stream.Relay(sizes, env.device, source, group)
        problem = ""
        try:
            manifest, blobs = reader.read_verified(name, on_chunk=relay.piece if relay else None)
            if _digest(manifest["files"]) != chosen["digest"]:
                raise Problem("it changed since it was listed")
            objects = decode(blobs)
            _check(state, chosen["entries"], objects)
        except Problem as p:
            problem = str(p)
        except Exception as e:  # an I/O error (EIO, ESTALE...): this copy fails, the round goes on
            problem = f"{type(e).__name__}: {e}"
        finally:
            if relay is not None:  # the receivers wait for every chunk, whatever happened here
                relay.finish(blobs)
        if role == "own":
            reader.record(name, problem)
        return (objects if not problem else {}), problem
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _receive(env: DistEnv, state: TrainState, chosen: dict, source: int, group) -> tuple[Objects, str]:
    """Each file decoded as it arrives, the model's part straight into the model's own tensors: no
    copy of the checkpoint is ever whole in memory here (if it then fails to verify, the model
    holds part of it: see resume())."""
    objects: Objects = {}
    problems = []
    targets = state.targets()
    for file, entry in chosen["entries"].items():
        decoder = Decoder(file, entry["size"], targets.get(file))
        if stream.receive(entry["size"], env.device, source, group, decoder.feed) != entry["xxh3_64"]:
            problems.append(f"{file}: checksum mismatch as received")
            continue
        try:
            objects[file] = decoder.result()
        except Exception as e:  # as decode() does: whatever a malformed file raises
            problems.append(f"{file} does not deserialise: {str(e)[:200] or type(e).__name__}")
    if not problems:
        try:
            _check(state, chosen["entries"], objects)
        except Exception as e:  # never raise alone: the other ranks are waiting for the outcome
            problems.append(str(e) if isinstance(e, Problem) else f"{type(e).__name__}: {e}")
    return (objects if not problems else {}), "; ".join(problems)


def _resync(state: TrainState, env: DistEnv, received: set[int]) -> None:
    """The model of a rank that received into it holds part of a checkpoint that failed: start it
    again from the weights of a rank that never received (every rank starts from the same ones)."""
    clean = min(set(range(env.world_size)) - received)
    for tensor in state.model.state_dict().values():
        dist.broadcast(tensor, clean)


def resume(
    manager: CheckpointManager,
    state: TrainState,
    env: DistEnv,
    fingerprint: str,
    reads: bool,
    local: CheckpointManager | None = None,
    shared: bool = True,
    run_dir: Path | None = None,
) -> dict | None:
    """Restore ``state`` from the newest valid checkpoint on any node; return what the resume row
    logs, or None. ``reads``: this rank reads its node's checkpoints (see train/replicas.py);
    ``local``: its node-local tier as well (train/local_tier.py); ``shared``: the nodes share the
    run directory, so a copy of another node's is visible here (otherwise only this node's are:
    the same path on another machine is another disk); ``run_dir``: where metrics.jsonl tells the
    progress made (default: the checkpoint directory's parent)."""
    run_dir = run_dir or Path(manager.storage.location("")).parent
    managers = [manager, *([local] if local is not None else [])]
    report = {
        "node": env.node,
        "candidates": _candidates([manager if reads else None, local]),
        "last_logged": records.last_step(records.read(run_dir)) if reads or local is not None else 0,
    }
    reports = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(report).encode(), env.device)]
    excluded: set[tuple[int, str]] = set()
    forced: set[int] = set()
    skipped: list[str] = []
    transfer_failures = 0
    received: set[int] = set()  # ranks that received (into their model) in any round
    while True:
        plan = _plan(reports, excluded, fingerprint)
        if plan["status"] == "error":
            raise IncompatibleCheckpointError(plan["message"], echo=env.rank == 0)
        if plan["status"] == "none":
            if received:
                _resync(state, env, received)
            if plan["last_logged"]:
                log.warning(
                    "no valid checkpoint on any node, but metrics.jsonl shows %d completed step(s): "
                    "they are lost; starting at step 1",
                    plan["last_logged"],
                )
            else:
                log.info("no checkpoint to resume from: starting at step 1")
            return None
        roles = [_role(rank, plan, reports, shared, forced) for rank in range(len(reports))]
        received.update(rank for rank, (role, _) in enumerate(roles) if role == "receive")
        objects, problem = _load(env, state, managers, plan, roles)
        outcomes = [b.decode() for b in comm.all_gather_bytes(problem.encode(), env.device)]
        if not any(outcomes):
            break
        objects = {}  # not two copies in memory during the next round
        transfer_failures += _exclude(plan, roles, outcomes, excluded, forced, skipped)
        if transfer_failures > 1:
            raise RuntimeError(
                f"checkpoint step {plan['chosen']['step']} arrived corrupt twice, though its sender "
                "verified it: a network or memory fault? ending this attempt"
            )
    chosen = plan["chosen"]
    unusable = {
        c["name"] for r in reports for c in r["candidates"] if "problem" in c and c["step"] > chosen["step"]
    }
    skipped = sorted(unusable.union(skipped), reverse=True)
    receivers = [rank for rank, (role, _) in enumerate(roles) if role == "receive"]
    if env.rank == plan["source"] and receivers:
        log.info(
            "sent checkpoint step %d to the rank(s) that cannot read a copy of it: %s",
            chosen["step"],
            receivers,
        )
    snapshot.restore(state, objects, env.rank, env.world_size, env.device)
    lost = max(max(r["last_logged"] for r in reports) - chosen["step"], 0)
    log.info(
        "resumed from step %d (%s); %d completed step(s) lost, next step %d",
        chosen["step"],
        chosen["location"],
        lost,
        chosen["step"] + 1,
    )
    return {
        "step": chosen["step"],
        "path": chosen["location"],
        "lost_steps": lost,
        "skipped": skipped,
        "source_rank": plan["source"],
        "received_by": receivers,
    }


def _exclude(
    plan: dict,
    roles: list[tuple[str, dict | None]],
    outcomes: list[str],
    excluded: set[tuple[int, str]],
    forced: set[int],
    skipped: list[str],
) -> int:
    """After a failed round: what the next one leaves out (the same on every rank). Returns 1 if
    only receivers failed (their copy arrived corrupt, though the sender verified it): then no
    copy is dropped, the transfer is tried again."""
    source, chosen = plan["source"], plan["chosen"]
    sender_ok = not outcomes[source]
    transfer_only = True
    for rank, problem in enumerate(outcomes):
        if not problem:
            continue
        role, copy = roles[rank]
        if role == "copy":
            forced.add(rank)  # it cannot read that copy after all: it receives one next time
            transfer_only = False
            continue
        if role == "receive" and sender_ok:
            log.warning("checkpoint %s arrived corrupt at rank %d (%s)", chosen["location"], rank, problem)
            continue
        transfer_only = False
        culprit = (rank, copy["location"]) if role == "own" else (source, chosen["location"])  # type: ignore[index]
        if culprit not in excluded:
            excluded.add(culprit)
            skipped.append(Path(culprit[1]).name)
            log.warning("checkpoint %s is not usable (%s); trying the next older one", culprit[1], problem)
    return int(transfer_only)
