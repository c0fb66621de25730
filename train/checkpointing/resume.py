"""Resume on every start: the newest valid checkpoint on any node, and every rank loads that one.

1. Each rank that writes checkpoints (one per node: replicas.py; in both tiers: local_tier.py)
   lists its checkpoints - manifests and file sizes, nothing read yet - and every rank receives
   every list.
2. Every rank applies the same rule to the same lists (plan.py), so no two can pick different
   checkpoints: the newest step on any node; the lowest rank that holds it sends it.
3. One rank per node (its leader) reads and verifies a copy it can see (its node's own, or one
   in a shared directory), or receives one from the source over the network if its node sees
   none; the node's other ranks get the bytes from their leader (fetch.py). So a node pulls one
   copy, whatever its number of ranks, and slow storage is waited for in short polls
   (together.py), never inside a collective whose timeout could end every start.
4. The outcomes are shared. If any copy failed (checksum, decoding, does not fit the model) the
   round repeats without it: another node's copy, or the next older step, as on one node.

So a node whose disk was lost, or a replacement that joined with an empty directory, resumes where
the others are, never at step 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from train.checkpointing import fetch, snapshot
from train.checkpointing import plan as planner
from train.checkpointing.fetch import INCOMPATIBLE, Objects
from train.checkpointing.plan import Copy, Plan, Report, Role
from train.checkpointing.together import Limit
from train.ckpt.manager import CheckpointManager, bytes_read
from train.ckpt.manifest import Problem
from train.config import CkptConfig
from train.errors import IncompatibleCheckpointError, StorageError
from train.observe import records
from train.runtime import comm
from train.runtime import env as env_facts
from train.runtime.dist import DistEnv
from train.state import TrainState

log = logging.getLogger("train")
RECORD_TAIL = 16 << 20  # of metrics.jsonl: the newest step logged is near its end


@dataclass(frozen=True)
class Resumed:
    """What the run resumed from (its "resume" row in metrics.jsonl)."""

    step: int
    path: str
    lost_steps: int  # completed steps the record shows beyond it
    skipped: list[str]  # newer checkpoints that were not usable, newest first
    source_rank: int
    received_by: list[int]  # node leaders that could not read a copy and received it
    read_by: list[int]  # ranks that read a copy from storage (at most one a node)
    # What it cost, per rank: bytes pulled from checkpoint storage (manifests too) or from another
    # node; bytes of its leader's copy read again from the node's page cache; bytes the kernel
    # fetched from storage devices for it (page cache hits do not count); host memory at the peak
    # beyond what the rank holds once resumed; the CPU seconds its process spent (every thread: on
    # a node with a core per rank the resume's time does not grow with the ranks while this does
    # not). And the seconds from the start of the resume to its end on the slowest rank.
    pulled_bytes: list[int] = field(default_factory=list)
    reread_bytes: list[int] = field(default_factory=list)
    disk_read_bytes: list[int] = field(default_factory=list)
    peak_excess_bytes: list[int] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0


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


LOAD_LIMIT = Limit(
    CkptConfig.load_timeout_s, "--ckpt.load-timeout-s", 0, CkptConfig.slowest_mb_s
)  # the defaults
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
    limit: Limit = LOAD_LIMIT,
) -> Resumed | None:
    """Collective: restore ``state`` from the newest valid checkpoint on any node; None if there
    is none. ``reads``: this rank reads its node's checkpoints (see replicas.py); ``local``: its
    node-local tier as well (local_tier.py); ``shared``: the nodes share the run directory, so a
    copy of another node's is visible here (otherwise only this node's are: the same path on
    another machine is another disk); ``run_dir``: where metrics.jsonl tells the progress made
    (default: the checkpoint directory's parent); ``run_id``: the run's agreed id, which a local
    copy must carry (if it carries one at all: copies written before ids were stamped);
    ``limit``: the longest a rank's read (or the send after it) may take, its bytes aside."""
    before = _Counts(
        time.monotonic(), time.process_time(), bytes_read(), fetch.REREAD.total, env_facts.disk_read_bytes()
    )
    pulled = 0
    env_facts.reset_peak()
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
    received: set[int] = set()  # ranks whose model took bytes of a copy in any round (fetch.Round.dirty)
    with _node_group(env, reports) as node:
        while True:
            try:
                plan = planner.choose(reports, failures.excluded, fingerprint)
            except planner.Foreign as e:
                raise IncompatibleCheckpointError(str(e), echo=env.rank == 0) from None
            if plan is None:
                _nothing(state, env, reports, received)
                return None
            if plan.mixed:
                step, source = plan.chosen.step, plan.source
                log.warning("nodes hold different checkpoints of step %d; using rank %d's", step, source)
            roles = planner.roles(plan, reports, shared, failures.forced)
            done = fetch.run_round(env, state, managers, plan, roles, node, limit)
            received.update(done.dirty)
            if done.moved and roles[env.rank].kind == "receive":
                pulled += sum(e["size"] for e in plan.chosen.entries.values())
            if not any(done.outcomes):
                resumed = _restored(state, env, reports, plan, roles, done.objects, failures.skipped)
                break
            _failed(env, plan, roles, done.outcomes, failures)
    del done  # the decoded files: what the state does not hold now is freed before the peak is read
    return _with_costs(resumed, env, before, pulled)


@dataclass(frozen=True)
class _Counts:
    time: float
    cpu: float
    read: int
    reread: int
    disk: int


def _with_costs(resumed: Resumed, env: DistEnv, before: _Counts, received: int) -> Resumed:
    """``resumed`` with what the resume cost every rank (one small all-gather)."""
    resident, peak = env_facts.memory()
    mine = [
        received + bytes_read() - before.read,
        fetch.REREAD.total - before.reread,
        env_facts.disk_read_bytes() - before.disk,
        max(peak - resident, 0),
        round(time.process_time() - before.cpu, 3),
        time.monotonic() - before.time,
    ]
    costs = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(mine).encode(), env.device)]
    pulled, reread, disk, excess, cpu, seconds = zip(*costs, strict=True)
    return dataclasses.replace(
        resumed,
        pulled_bytes=list(pulled),
        reread_bytes=list(reread),
        disk_read_bytes=list(disk),
        peak_excess_bytes=list(excess),
        cpu_seconds=list(cpu),
        seconds=round(max(seconds), 3),
    )


@contextlib.contextmanager
def _node_group(env: DistEnv, reports: list[Report]) -> Iterator[fetch.NodeGroup]:
    """This node's group for the resume's rounds, built if one needs it."""
    node = fetch.NodeGroup(planner.node_ranks(reports)[env.node])
    try:
        yield node
    finally:
        node.close()


def _failed(
    env: DistEnv, plan: Plan, roles: list[Role], outcomes: list[str], failures: planner.Failures
) -> None:
    """After a round in which some copy failed: what the next round leaves out (or raises)."""
    incompatible = next((o for o in outcomes if o.startswith(INCOMPATIBLE)), None)
    if incompatible is not None:  # the same data and seed fail everywhere: not worth a fallback
        raise IncompatibleCheckpointError(incompatible[len(INCOMPATIBLE) :], echo=env.rank == 0)
    for location, why in failures.add(plan, roles, outcomes):
        log.warning("checkpoint %s is not usable (%s); trying the next older one", location, why)
    for rank, why in enumerate(outcomes):
        if why and roles[rank].kind in ("receive", "follow") and not outcomes[plan.source]:
            log.warning("checkpoint %s arrived corrupt at rank %d (%s)", plan.chosen.location, rank, why)
    if failures.transfers > 1:
        raise RuntimeError(
            f"checkpoint step {plan.chosen.step} arrived corrupt twice, though its sender "
            "verified it: a network or memory fault? ending this attempt"
        )


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
    readers = planner.readers(roles)
    return Resumed(chosen.step, chosen.location, lost, skipped, plan.source, receivers, readers)
