"""Resume from the node-local tier of a sharded run: its checkpoints are spread over the nodes.

Each node keeps its own ranks' shards and its partner's (ring.py), so after a node is lost its
shards live on in the next node's copy. At resume every node's first rank lists its node's copies
(bounded, in a shared poll); every rank then applies the same rule to the same lists
(``plan``): a step is usable only if the nodes together still hold every file of it. For that
step (``complete``), a node lacking it first receives its manifest and train file; then each rank
names the files that hold the rows it holds now, and its node's first rank receives those its
node lacks, each from the first node that holds it, written beside the node's own and checked
against its manifest entry. Then every rank reads its rows from its own node's copy, as from a
durable checkpoint (reshard.py). A node receives what its ranks read, never the whole model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from train.checkpointing import ring, together
from train.checkpointing.together import Limit
from train.ckpt import manifest as mf
from train.ckpt import shards as fmt
from train.ckpt.fs import fsync_path
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import TMP_PREFIX, Unreadable
from train.errors import StorageError
from train.runtime import comm
from train.runtime.dist import DistEnv
from train.state import TRAIN_FILE

log = logging.getLogger("train")
TRANSPORT = "transfer between nodes failed: "


@dataclass
class LocalCopy:
    """A step of the node-local tier that the nodes together can restore."""

    name: str
    size: int
    holders: dict[int, list[str]] = field(default_factory=dict)  # a node's first rank: files it holds


def inventory(manager: CheckpointManager, run_id: str) -> list[dict[str, Any]]:
    """A node's first rank: its node's sharded copies of this run, with the files each holds."""
    storage, out = manager.storage, []
    storage.clean_temporaries()
    for name in storage.names():
        try:
            manifest = manager.manifest(name)
        except (mf.Problem, OSError, Unreadable):
            continue
        if manifest.get("run_id") != run_id or not fmt.is_sharded(manifest):
            continue
        files = manifest["files"]
        held = []
        for file, entry in files.items():
            with contextlib.suppress(OSError, Unreadable):
                if storage.size(name, file) == entry["size"]:
                    held.append(file)
        size = sum(e["size"] for e in files.values())
        save = str(manifest.get("save", ""))
        out.append({"name": name, "save": save, "files": sorted(files), "held": sorted(held), "size": size})
    return out


def _well_formed(copy: object) -> bool:
    """Whether an inventory entry (from another rank: untrusted) is one plan() can use."""
    if not isinstance(copy, dict):
        return False
    name, files, held, size = (copy.get(k) for k in ("name", "files", "held", "size"))
    return (
        isinstance(name, str)
        and mf.step_of(name) is not None
        and isinstance(copy.get("save"), str)
        and isinstance(size, int)
        and size >= 0
        and all(isinstance(x, list) and all(map(mf.plain_file_name, x)) for x in (files, held))
    )


def plan(found: dict[int, list[dict[str, Any]]]) -> list[LocalCopy]:
    """Pure: ``found`` ({a node's first rank: its inventory}) -> the steps the nodes together can
    restore (every file of one save of the step held by some node), newest first. Copies of one
    step by two saves (attempts) never mix."""
    by_save: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for leader, copies in found.items():
        for copy in copies if isinstance(copies, list) else ():
            if _well_formed(copy):
                by_save.setdefault((copy["name"], copy["save"]), {})[leader] = copy
    usable = []
    for name, save in sorted(by_save, key=lambda k: (mf.step_of(k[0]) or -1, k[1]), reverse=True):
        holders = by_save[name, save]
        first = holders[min(holders)]
        if set(first["files"]) <= {f for copy in holders.values() for f in copy["held"]}:
            usable.append(LocalCopy(name, first["size"], {r: c["held"] for r, c in holders.items()}))
    return usable  # a step missing a file lost it with its node and that node's partner


def transfers(copy: LocalCopy, needs: dict[int, set[str]]) -> list[tuple[str, int, int]]:
    """Pure: (file, from rank, to rank) that give each node's first rank the files its node needs
    (``needs``; the manifest comes with the step: a node holding the step has it). Each file comes
    from the holder with the fewest moves so far (no one node sends everything), and the moves are
    ordered in rounds - every receiver's first, then every receiver's second... - so that pairs
    without a rank in common run at once; one order every rank computes alike."""
    load = dict.fromkeys(copy.holders, 0)
    out: list[tuple[int, int, str, int]] = []  # (round, to, file, from)
    for leader in sorted(needs):
        has = set(copy.holders.get(leader, ())) | ({mf.MANIFEST} if leader in copy.holders else set())
        for turn, file in enumerate(sorted(needs[leader] - has)):
            holders = [h for h, held in copy.holders.items() if file == mf.MANIFEST or file in held]
            if holders:
                src = min(holders, key=lambda h: (load[h], h))
                load[src] += 1
                out.append((turn, leader, file, src))
    return [(file, src, dst) for _, dst, file, src in sorted(out)]


def listed(manager: CheckpointManager | None, env: DistEnv, run_id: str, limit: Limit) -> list[LocalCopy]:
    """Collective: the node-local steps the job can restore, newest first (none without a tier)."""
    leader = env.local_rank == 0 and manager is not None

    def look() -> str:
        try:
            return json.dumps(inventory(manager, run_id))  # type: ignore[arg-type]
        except (OSError, Unreadable):
            return ""  # this node's copies cannot be listed: they do not count

    mine = together.run(look if leader else None, limit, "listing node-local checkpoints") or ""
    said = comm.all_gather_bytes(json.dumps([manager is not None, mine]).encode(), env.device)
    told = [json.loads(raw) for raw in said]
    if not all(has for has, _ in told):  # a rank without its node's directory could not read it
        return []
    return plan({rank: json.loads(found) for rank, (_, found) in enumerate(told) if found})


def complete(
    copy: LocalCopy,
    manager: CheckpointManager,
    env: DistEnv,
    pg: dist.ProcessGroup | None,
    token: str,
    limit: Limit,
    needs: Callable[[str], list[str]],
) -> str:
    """Collective: every node's copy of ``copy`` made whole for the rows its ranks hold now, and
    no more: first the manifest and train file to the nodes that lack them, then each rank names
    the files its rows are in (``needs(name)``, read from its node's manifest) and its node's first
    rank receives those it lacks. "" or why not (the same on every rank)."""
    per_node = env.local_world_size
    leaders = list(range(0, env.world_size, per_node))
    first = transfers(copy, {leader: {mf.MANIFEST, TRAIN_FILE} for leader in leaders})
    reason = _everywhere(
        lambda: fetch(copy.name, first, manager, env, pg, f"{token}-1"), env, limit, copy.name
    )
    if reason:
        return reason
    for file, _, dst in first:  # every rank saw every move succeed: the same view everywhere
        copy.holders.setdefault(dst, []).append(file)
    box: dict[str, list[str]] = {}
    reason = _everywhere(lambda: box.setdefault("files", needs(copy.name)), env, limit, copy.name)
    if reason:
        return reason
    said = comm.all_gather_bytes(json.dumps(box.get("files", [])).encode(), env.device)
    wanted: dict[int, set[str]] = {leader: set() for leader in leaders}
    for rank, raw in enumerate(said):
        wanted[rank - rank % per_node].update(json.loads(raw))
    then = transfers(copy, wanted)
    return _everywhere(lambda: fetch(copy.name, then, manager, env, pg, f"{token}-2"), env, limit, copy.name)


def _everywhere(work: Callable[[], object], env: DistEnv, limit: Limit, name: str) -> str:
    """Collective: ``work`` on every rank's thread under the shared polls; "" or the first rank's
    problem, the same on every rank."""
    try:
        together.run(work, limit, f"completing node-local checkpoint {name}")
        reason = ""
    except StorageError:
        raise  # past its limit: the attempt ends, as for any read at resume
    except (OSError, mf.Problem) as e:
        reason = str(e) or type(e).__name__
    except Exception as e:  # the transport's own (gloo): no further transfer is to be trusted
        reason = f"{TRANSPORT}{type(e).__name__}: {str(e).strip()[:300]}"
    problems = comm.all_gather_bytes(reason.encode(), env.device)
    return next((f"rank {r}: {p.decode()}" for r, p in enumerate(problems) if p), "")


def fetch(
    name: str,
    moves: list[tuple[str, int, int]],
    manager: CheckpointManager,
    env: DistEnv,
    pg: dist.ProcessGroup | None,
    token: str,
) -> None:
    """On every rank's thread: this rank's part of ``moves``, in their one global order (so every
    pair meets), then the files received put beside the node's own. OSError if any failed (after
    the rest ran: the others must not wait for this rank)."""
    mine = [t for t in moves if env.rank in t[1:]]
    if not mine:
        return
    assert pg is not None, "transfers between nodes without the ring's group"
    storage, errors, into = manager.storage, [], None
    tmp = f"{TMP_PREFIX}{name}-fetch-{token}"
    try:
        if any(dst == env.rank for _, _, dst in mine):
            into = storage.join(tmp)
    except OSError as e:  # still takes what is sent to it, and drops it: no sender waits
        errors.append(e)
    try:
        for file, src, dst in mine:
            try:
                if src == env.rank:
                    try:
                        entry = _entry(manager, name, file)
                    except (OSError, Unreadable, mf.Problem) as e:
                        entry = None
                        errors.append(OSError(str(e)))
                    ring.send_file(pg, dst, storage.root / name / file, entry)
                else:
                    ring.receive_file(pg, src, into, file)
            except OSError as e:
                errors.append(e)
    finally:
        if into is not None:
            into.close()
    if errors:
        raise errors[0]
    if into is not None:
        received = sum(1 for _, _, dst in mine if dst == env.rank)
        _put_in_place(storage.root, tmp, name)
        log.info(
            "node-local checkpoint %s: received %d file(s) this node lacked from other nodes", name, received
        )


def _entry(manager: CheckpointManager, name: str, file: str) -> dict[str, Any]:
    if file == mf.MANIFEST:  # the manifest itself: its bytes' own entry, for the transfer
        return fmt.entry_of([manager.storage.read(name, mf.MANIFEST, limit=mf.MANIFEST_LIMIT)])
    return manager.manifest(name)["files"][file]


def _put_in_place(root: os.PathLike, tmp: str, name: str) -> None:
    """Files received for ``name``: beside the node's own files of the same save, or the whole
    copy where the node had none of that save (the manifest came with them: a directory of that
    name there holds another save's files, never to be mixed with these)."""
    source, target = os.path.join(root, tmp), os.path.join(root, name)
    if os.path.isdir(target) and os.path.exists(os.path.join(source, mf.MANIFEST)):
        shutil.rmtree(target)
    if not os.path.isdir(target):
        os.rename(source, target)
    else:
        for file in os.listdir(source):
            os.rename(os.path.join(source, file), os.path.join(target, file))
        os.rmdir(source)
    fsync_path(target)
    fsync_path(root)
