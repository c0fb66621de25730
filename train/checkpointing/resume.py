"""Resume on every start: the newest valid checkpoint on any node, and every rank loads that one.

1. Each rank that writes checkpoints (one per node: replicas.py; in both tiers: local_tier.py)
   lists its checkpoints - manifests and file sizes, nothing read yet - and every rank receives
   every list.
2. Every rank applies the same rule to the same lists (plan.py), so no two can pick different
   checkpoints: the newest step on any node; the lowest rank that holds it sends it.
3. Every rank that can see a copy (its own node's, or any in a shared run directory) reads and
   verifies that copy. The sender streams its copy, while reading it, to the ranks that cannot see
   one (stream.py): only nodes that lack the checkpoint get it over the network. A receiver decodes
   each file as it arrives (train/ckpt/decoder.py), the weights straight into its model's own
   tensors, and verifies it against the manifest, as a reader does.
4. One all-gather of the outcomes. If any copy failed (checksum, decoding, does not fit the model)
   the round repeats without it: another node's copy, or the next older step, as on one node.

So a node whose disk was lost, or a replacement that joined with an empty directory, resumes where
the others are, never at step 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from train.checkpointing import plan as planner
from train.checkpointing import snapshot, stream
from train.checkpointing.plan import Copy, Plan, Report, Role
from train.ckpt.decoder import Decoder
from train.ckpt.manager import CheckpointManager, decode
from train.ckpt.manifest import Problem
from train.ckpt.objstore import open_storage
from train.errors import IncompatibleCheckpointError, StorageError
from train.observe import records
from train.runtime import comm
from train.runtime.dist import DistEnv
from train.state import CKPT_FILES, TrainState

log = logging.getLogger("train")
RECORD_TAIL = 16 << 20  # of metrics.jsonl: the newest step logged is near its end
Objects = dict[str, Any]  # a checkpoint's files, decoded


@dataclass(frozen=True)
class Resumed:
    """What the run resumed from (its "resume" row in metrics.jsonl)."""

    step: int
    path: str
    lost_steps: int  # completed steps the record shows beyond it
    skipped: list[str]  # newer checkpoints that were not usable, newest first
    source_rank: int
    received_by: list[int]  # ranks that could not read a copy and received it


def _digest(entries: dict) -> str:
    """The same on every node for the same state (each node's manifest has its own time)."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]


def _listed(managers: list[CheckpointManager | None], run_id: str = "") -> tuple[tuple[Copy, ...], str]:
    """Every checkpoint in every tier this rank reads (None: a tier it does not), newest first;
    those whose manifest or sizes do not check out carry the problem (never chosen, only
    reported as skipped). And why a tier could not be listed at all ("": all were)."""
    found: list[Copy] = []
    for tier, manager in enumerate(managers):
        if manager is None:
            continue
        try:
            found += _tier(tier, manager, run_id if tier == LOCAL_TIER else "")
        except OSError as e:  # the root itself: which checkpoints exist is unknown
            return (), f"cannot list {manager.storage.location('')}: {e.strerror or e}"
    return tuple(sorted(found, key=lambda c: (-c.step, c.tier))), ""


LOCAL_TIER = 1  # the index of the node-local tier in resume()'s managers


def _tier(tier: int, manager: CheckpointManager, run_id: str) -> list[Copy]:
    """``run_id``: a copy stamped with another run's id is not usable ("": any run's is)."""
    try:
        removed = manager.storage.clean_temporaries()
    except OSError as e:  # leftovers stay for the next start; they are never read
        log.warning("could not remove leftover temporaries in %s: %s", manager.storage.location(""), e)
        removed = []
    if removed:
        log.info(
            "removed %d leftover temporary checkpoint dir(s) from an interrupted write in %s",
            len(removed),
            manager.storage.location(""),
        )
    found = []
    for info in manager.list():
        location = manager.storage.location(info.name)
        if not info.valid:
            log.warning("checkpoint %s is not usable (%s); trying the next older one", location, info.reason)
            found.append(Copy(tier, info.name, info.step, location, problem=info.reason))
            continue
        try:
            manifest = manager.manifest(info.name)
        except (Problem, OSError):
            continue  # changed (or failed) since listed
        stamped = manifest.get("run_id")
        if run_id and stamped is not None and stamped != run_id:
            reason = f"it belongs to another run (id {str(stamped)[:40]!r}, this run's is {run_id})"
            log.warning("checkpoint %s is not usable (%s); trying the next older one", location, reason)
            found.append(Copy(tier, info.name, info.step, location, problem=reason))
            continue
        entries = manifest["files"]
        found.append(
            Copy(tier, info.name, info.step, location, _digest(entries), manifest.get("fingerprint"), entries)
        )
    return found


INCOMPATIBLE = "incompatible: "  # an outcome every rank turns into the same permanent error


def _check(state: TrainState, entries: dict, objects: Objects) -> None:
    """Problem unless every part of the checkpoint fits this job: nothing live is touched until
    every rank's copy passed (a half-done restore could not be undone)."""
    if set(objects) != set(entries):
        raise Problem("it does not hold the files its manifest lists")
    try:
        snapshot.check(state, objects)
    except IncompatibleCheckpointError as e:
        raise Problem(f"{INCOMPATIBLE}{e}") from None
    except Exception as e:  # whatever a crafted file makes the checks raise
        raise Problem(f"its contents do not fit this job ({type(e).__name__}: {str(e)[:200]})") from None


def _load(
    env: DistEnv, state: TrainState, managers: list[CheckpointManager], plan: Plan, roles: list[Role]
) -> tuple[Objects, str]:
    """This rank's part of one round: (its files decoded, "" or why they are not usable)."""
    receivers = planner.receivers(roles)
    group = dist.new_group([plan.source, *receivers]) if receivers else None  # every rank calls it
    role = roles[env.rank]
    blobs: dict[str, bytes | memoryview] = {}
    objects: Objects = {}
    try:
        if role.kind == "receive":
            return _receive(env, state, plan.chosen, plan.source, group)
        assert role.copy is not None
        if role.kind == "own":
            reader, name = managers[role.copy.tier], role.copy.name
        else:
            root, _, name = role.copy.location.rstrip("/").rpartition("/")
            reader = CheckpointManager(open_storage(root), keep=1, files=CKPT_FILES)
        relay = None
        if env.rank == plan.source and group is not None:
            sizes = {f: e["size"] for f, e in plan.chosen.entries.items()}
            relay = stream.Relay(sizes, env.device, plan.source, group)
        problem = ""
        try:
            manifest, blobs = reader.read_verified(name, on_chunk=relay.piece if relay else None)
            if _digest(manifest["files"]) != plan.chosen.digest:
                raise Problem("it changed since it was listed")
            objects = decode(blobs)
            _check(state, plan.chosen.entries, objects)
        except Problem as p:
            problem = str(p)
        except Exception as e:  # an I/O error (EIO, ESTALE...): this copy fails, the round goes on
            problem = f"{type(e).__name__}: {e}"
        finally:
            if relay is not None:  # the receivers wait for every chunk, whatever happened here
                relay.finish(blobs)
        if role.kind == "own":
            reader.record(name, problem)
        return (objects if not problem else {}), problem
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def _receive(env: DistEnv, state: TrainState, chosen: Copy, source: int, group) -> tuple[Objects, str]:
    """Each file decoded as it arrives, the model's part straight into the model's own tensors: no
    copy of the checkpoint is ever whole in memory here (if it then fails to verify, the model
    holds part of it: see resume())."""
    objects: Objects = {}
    problems = []
    targets = state.targets()
    for file, entry in chosen.entries.items():
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
            _check(state, chosen.entries, objects)
        except Exception as e:  # never raise alone: the other ranks are waiting for the outcome
            problems.append(str(e) if isinstance(e, Problem) else f"{type(e).__name__}: {e}")
    return (objects if not problems else {}), "; ".join(problems)


def _resync(state: TrainState, env: DistEnv, received: set[int]) -> None:
    """The model of a rank that received into it holds part of a checkpoint that failed: start it
    again from the weights of a rank that never received (every rank starts from the same ones)."""
    clean = min(set(range(env.world_size)) - received)
    for tensor in state.model.state_dict().values():
        dist.broadcast(tensor, clean)


def _nothing(state: TrainState, env: DistEnv, reports: list[Report], received: set[int]) -> None:
    if received:
        _resync(state, env, received)
    last_logged = max((r.last_logged for r in reports), default=0)
    if last_logged:
        log.warning(
            "no valid checkpoint on any node, but metrics.jsonl shows %d completed step(s): "
            "they are lost; starting at step 1",
            last_logged,
        )
    else:
        log.info("no checkpoint to resume from: starting at step 1")


def resume(
    manager: CheckpointManager,
    state: TrainState,
    env: DistEnv,
    fingerprint: str,
    reads: bool,
    local: CheckpointManager | None = None,
    shared: bool = True,
    run_dir: Path | None = None,
    run_id: str = "",
) -> Resumed | None:
    """Collective: restore ``state`` from the newest valid checkpoint on any node; None if there
    is none. ``reads``: this rank reads its node's checkpoints (see replicas.py); ``local``: its
    node-local tier as well (local_tier.py); ``shared``: the nodes share the run directory, so a
    copy of another node's is visible here (otherwise only this node's are: the same path on
    another machine is another disk); ``run_dir``: where metrics.jsonl tells the progress made
    (default: the checkpoint directory's parent); ``run_id``: the run's agreed id, which a local
    copy must carry (if it carries one at all: copies written before ids were stamped)."""
    run_dir = run_dir or Path(manager.storage.location("")).parent
    managers = [manager, *([local] if local is not None else [])]
    copies, unlisted = _listed([manager if reads else None, local], run_id)
    reads_record = reads or local is not None
    last_logged = records.last_step(records.read(run_dir, limit=RECORD_TAIL)) if reads_record else 0
    mine = Report(env.node, copies, last_logged, unlisted)
    reports = [Report.decode(b) for b in comm.all_gather_bytes(mine.encode(), env.device)]
    failed = next((r.unlisted for r in reports if r.unlisted), "")
    if failed:  # every rank together: starting afresh could later prune the checkpoints unseen
        raise StorageError(
            f"{failed}; retrying (check the mount and its permissions)"
            if unlisted
            else "another rank cannot list its checkpoints (see its log)",
            echo=bool(unlisted),
        )
    failures = planner.Failures()
    received: set[int] = set()  # ranks that received (into their model) in any round
    while True:
        try:
            plan = planner.choose(reports, failures.excluded, fingerprint)
        except planner.Foreign as e:
            raise IncompatibleCheckpointError(str(e), echo=env.rank == 0) from None
        if plan is None:
            _nothing(state, env, reports, received)
            return None
        if plan.mixed:
            log.warning(
                "nodes hold different checkpoints of step %d; using rank %d's", plan.chosen.step, plan.source
            )
        roles = planner.roles(plan, reports, shared, failures.forced)
        received.update(planner.receivers(roles))
        objects, problem = _load(env, state, managers, plan, roles)
        outcomes = [b.decode() for b in comm.all_gather_bytes(problem.encode(), env.device)]
        if not any(outcomes):
            break
        incompatible = next((o for o in outcomes if o.startswith(INCOMPATIBLE)), None)
        if incompatible is not None:  # the same data and seed fail everywhere: not worth a fallback
            raise IncompatibleCheckpointError(incompatible[len(INCOMPATIBLE) :], echo=env.rank == 0)
        objects = {}  # not two copies in memory during the next round
        for location, why in failures.add(plan, roles, outcomes):
            log.warning("checkpoint %s is not usable (%s); trying the next older one", location, why)
        for rank, why in enumerate(outcomes):
            if why and roles[rank].kind == "receive" and not outcomes[plan.source]:
                log.warning("checkpoint %s arrived corrupt at rank %d (%s)", plan.chosen.location, rank, why)
        if failures.transfers > 1:
            raise RuntimeError(
                f"checkpoint step {plan.chosen.step} arrived corrupt twice, though its sender "
                "verified it: a network or memory fault? ending this attempt"
            )
    return _restored(state, env, reports, plan, roles, objects, failures.skipped)


def _restored(
    state: TrainState,
    env: DistEnv,
    reports: list[Report],
    plan: Plan,
    roles: list[Role],
    objects: Objects,
    dropped: list[str],
) -> Resumed:
    chosen = plan.chosen
    unusable = {c.name for r in reports for c in r.copies if c.problem and c.step > chosen.step}
    receivers = planner.receivers(roles)
    if env.rank == plan.source and receivers:
        log.info(
            "sent checkpoint step %d to the rank(s) that cannot read a copy of it: %s", chosen.step, receivers
        )
    snapshot.restore(state, objects, env.rank, env.world_size, env.device)
    lost = max(max(r.last_logged for r in reports) - chosen.step, 0)
    log.info(
        "resumed from step %d (%s); %d completed step(s) lost, next step %d",
        chosen.step,
        chosen.location,
        lost,
        chosen.step + 1,
    )
    skipped = sorted(unusable.union(dropped), reverse=True)
    return Resumed(chosen.step, chosen.location, lost, skipped, plan.source, receivers)
