"""One round of the resume's data movement: the chosen checkpoint into every rank, one copy per node.

1. Read. Each node's leader that can see a copy (its own, or a shared directory's, or a bucket's)
   reads it straight into the tensors that keep the bytes (a header's worth through a small
   buffer; from a bucket, through a few ranged reads' buffers), verifies it against its manifest
   and checks that it fits this job. Where that copy is a file on the node's own disk, the node's
   other ranks read it so at the same time: the page cache holds each page once for all of them,
   so the disk is read once. Every rank waits for the slowest in
   short polls (together.py), however slow the storage, up to ``--ckpt.load-timeout-s``. Then
   every rank learns every outcome; if a copy failed, the round ends here (resume.py tries
   without it).
2. Send, where a node could not read the copy itself. From the sender's tensors (each chunk
   built from where its bytes were decoded to: on a GPU, in a device buffer), at the wire's speed: the
   source to the leaders of nodes that see no copy (stream.py; a receiving leader hands each chunk
   on to its node's other ranks as it lands), and a leader whose copy is on shared storage or in a
   bucket to its node's other ranks over the node's group (built once per resume, by its members
   only). A receiver decodes each file as it arrives, the weights straight into its model's own
   tensors (train/ckpt/decoder.py), and checks it as a reader does.

So a node pulls one copy from storage or the network, whatever its number of ranks, and no rank
holds a checkpoint file whole beyond the tensors it keeps anyway (but the small train file): a
sender a few chunks, a receiver a few chunks, a reader a 4 MiB buffer (from a bucket, 5 of 16 MiB).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from train.checkpointing import snapshot, stream, together
from train.checkpointing.plan import Copy, Plan, Role, followers, receivers
from train.ckpt.decoder import Decoder
from train.ckpt.manager import READ, ByteCounter, CheckpointManager
from train.ckpt.manifest import Problem
from train.ckpt.objstore import open_storage
from train.ckpt.storage import LocalStorage, Storage
from train.errors import IncompatibleCheckpointError
from train.runtime import comm
from train.runtime import env as env_facts
from train.runtime.dist import DistEnv
from train.state import CKPT_FILES, TrainState

Objects = dict[str, Any]  # a checkpoint's files, decoded
INCOMPATIBLE = "incompatible: "  # an outcome every rank turns into the same permanent error
REREAD = ByteCounter()  # bytes of a leader's copy this process read again (resume.py reports them)


@dataclass
class Round:
    """What one round left on this rank."""

    objects: Objects  # its files decoded ({} unless every rank's outcome was "")
    outcomes: list[str]  # per rank: "" or why its copy is not usable
    moved: bool  # the send step ran
    dirty: frozenset[int] = frozenset()  # ranks whose model now holds bytes of this round's copy


CLEAN = 0  # the rank that never decodes into its model before a restore (see _decoded)


def check(state: TrainState, entries: dict, objects: Objects) -> None:
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


class NodeGroup:
    """This node's ranks' own group, for a leader's copy to reach the node's other ranks where they
    cannot read it themselves. Built the first time a round needs it, by the node's members only
    (a cluster's nodes build theirs at once, not one after another; whether a round needs it is the
    same answer on all of them), and kept for the resume's later rounds."""

    def __init__(self, ranks: list[int]):
        self.ranks = ranks
        self._group: dist.ProcessGroup | None = None

    def get(self) -> dist.ProcessGroup:
        if self._group is None:
            self._group = dist.new_group(self.ranks, use_local_synchronization=True)
        return self._group

    def close(self) -> None:
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


def run_round(
    env: DistEnv,
    state: TrainState,
    managers: list[CheckpointManager],
    plan: Plan,
    roles: list[Role],
    node: NodeGroup,
    limit: together.Limit,
) -> Round:
    """Collective: this round's read and, if every copy read was good, its send. ``limit``: for
    reading or moving this checkpoint (its bytes are filled in here)."""
    limit = dataclasses.replace(limit, nbytes=sum(e["size"] for e in plan.chosen.entries.values()))
    role = roles[env.rank]
    leader = next(r for r in node.ranks if roles[r].kind != "follow")
    rereads = direct(roles, leader)  # this node's other ranks read the leader's copy themselves
    sending = len(node.ranks) > 1 and not rereads  # else they get it from the leader
    group = node.get() if sending else None  # before any other group: every member is here now
    sends = (env.rank == leader and sending) or (env.rank == plan.source and bool(receivers(roles)))
    work, into_model = _reader(state, managers, plan, roles, env.rank, rereads, sends)
    read = together.run(work, limit, f"reading checkpoint {plan.chosen.location}")
    images, objects, problem = read or ({}, {}, "")
    del read
    outcomes, dirty, awaited = _gather(env, problem, into_model, sending)
    if any(outcomes):
        return Round({}, outcomes, moved=False, dirty=dirty)
    remote = receivers(roles)
    if not remote and not awaited:  # every rank read a copy itself: nothing to move
        return Round(objects, outcomes, moved=False, dirty=dirty)
    cross = dist.new_group([plan.source, *remote]) if remote else None  # every rank calls it
    try:
        got = together.run(
            _send_or_receive(env, state, plan, roles, images, group, cross)
            if role.kind != "follow" or sending
            else None,
            limit,
            f"moving checkpoint {plan.chosen.location} between ranks",
        )
    finally:
        if cross is not None:
            dist.destroy_process_group(cross)
    del images
    if got is not None:
        objects, problem = got
    receives = role.kind == "receive" or (role.kind == "follow" and sending)
    outcomes, moved_into, _ = _gather(env, problem, receives and env.rank != CLEAN)
    return Round(objects if not any(outcomes) else {}, outcomes, moved=True, dirty=dirty | moved_into)


def _gather(
    env: DistEnv, problem: str, into_model: bool, sending: bool = False
) -> tuple[list[str], frozenset[int], bool]:
    """Every rank's outcome ("" or why its copy failed), the ranks that decoded into their own
    model, and whether any node's leader sends its copy to the node's other ranks (both known only
    where they run: a node's mount table decides)."""
    mine = json.dumps([problem, into_model, sending]).encode()
    said = [json.loads(b) for b in comm.all_gather_bytes(mine, env.device)]
    dirty = frozenset(r for r, (_, into, _) in enumerate(said) if into)
    return [str(p) for p, _, _ in said], dirty, any(s for _, _, s in said)


def _reader(
    state: TrainState,
    managers: list[CheckpointManager],
    plan: Plan,
    roles: list[Role],
    rank: int,
    rereads: bool,
    sends: bool,
) -> tuple[Callable[[], tuple[dict, Objects, str]] | None, bool]:
    """This rank's part of the read step, and whether it decodes into its own model: a leader reads
    its copy; where that copy is a file on the node's own disk the node's other ranks read it too,
    at the same time (the page cache holds each page once, whoever asked first: the disk is read
    once), each verifying what it read. Every reader reads each byte straight into the tensor that
    keeps it where it can (on a GPU, or from a bucket: through a few host buffers). ``rereads``:
    direct() of this node's leader; ``sends``: this rank passes its copy on, from those tensors
    (it keeps each file's Decoder)."""
    role = roles[rank]
    into_model = rank != CLEAN
    if role.kind in ("own", "copy"):
        return lambda: _read_leader(state, managers, plan, role, into_model, sends), into_model
    copy = roles[role.leader].copy if role.kind == "follow" else None
    if copy is None or not rereads:
        return None, False
    root, _, name = copy.location.rstrip("/").rpartition("/")
    again = LocalStorage(root)
    return lambda: ({}, *_read_decoded(state, plan.chosen, again, name, REREAD, into_model)), into_model


def _read_leader(
    state: TrainState,
    managers: list[CheckpointManager],
    plan: Plan,
    role: Role,
    into_model: bool,
    sends: bool,
) -> tuple[dict, Objects, str]:
    """A leader's read of its copy: (each file's Decoder if it ``sends``, the files decoded, "" or
    why not usable), the bytes counted as read from storage."""
    reader, name = _manager_of(managers, role)
    try:
        same = reader.manifest(name)["files"] == plan.chosen.entries
        problem = "" if same else "it changed since it was listed"
    except Problem as p:
        problem = str(p)
    except OSError as e:  # an I/O error (EIO, ESTALE...): this copy fails, the round goes on
        problem = f"{type(e).__name__}: {e}"
    objects: Objects = {}
    images: dict[str, Decoder] = {}
    if not problem:
        kept = images if sends else None
        objects, problem = _read_decoded(state, plan.chosen, reader.storage, name, READ, into_model, kept)
    if role.kind == "own":
        reader.record(name, problem)
    return (images, objects, "") if not problem else ({}, {}, problem)


def _manager_of(managers: list[CheckpointManager], role: Role) -> tuple[CheckpointManager, str]:
    """The manager a leader reads its copy through, and the copy's name there."""
    assert role.copy is not None
    if role.kind == "own":
        return managers[role.copy.tier], role.copy.name
    root, _, name = role.copy.location.rstrip("/").rpartition("/")
    return CheckpointManager(open_storage(root), keep=1, files=CKPT_FILES), name


def direct(roles: list[Role], leader: int) -> bool:
    """Whether the leader's node reads the leader's copy too rather than being sent it: a file on
    the node's own filesystem, whose pages the page cache holds once for every reader (one read
    from the disk for the node, every rank decoding at once, nothing copied between ranks). Not on
    a filesystem a network may serve (each read could be another pull), not from a bucket, not
    when received. Called by the leader's node only: it reads this node's mount table."""
    copy = roles[leader].copy
    return copy is not None and "://" not in copy.location and env_facts.on_local_filesystem(copy.location)


def _send_or_receive(
    env: DistEnv,
    state: TrainState,
    plan: Plan,
    roles: list[Role],
    images: dict[str, Decoder],
    node: dist.ProcessGroup | None,
    cross: dist.ProcessGroup | None,
) -> Callable[[], tuple[Objects, str] | None] | None:
    """This rank's part of the send step (None: nothing to do). ``node``: this node's group where
    its ranks get the copy from their leader (None: they read it themselves, or it has one rank)."""
    role, rank = roles[env.rank], env.rank
    sizes = {f: e["size"] for f, e in plan.chosen.entries.items()}
    mine = followers(roles, rank) if node is not None else []
    if role.kind == "follow":
        return lambda: _receive(env, state, plan.chosen, role.leader, node, None)
    if role.kind == "receive":
        assert cross is not None
        return lambda: _receive(env, state, plan.chosen, plan.source, cross, node if mine else None)
    sends = []
    if rank == plan.source and cross is not None:
        sends.append(lambda: stream.send_files(images, sizes, env.device, rank, cross))
    if mine:
        sends.append(lambda: stream.send_files(images, sizes, env.device, rank, node))
    if not sends:
        return None

    def send_all() -> None:  # to other nodes and to this one at once: neither waits for the other
        helpers = [threading.Thread(target=s, name="ftjob resume send", daemon=True) for s in sends[1:]]
        for helper in helpers:
            helper.start()
        sends[0]()
        for helper in helpers:
            helper.join()

    return send_all


def _read_decoded(
    state: TrainState,
    chosen: Copy,
    storage: Storage,
    name: str,
    counter: ByteCounter,
    into_model: bool,
    images: dict[str, Decoder] | None = None,
) -> tuple[Objects, str]:
    """A copy read in pieces: each straight into the tensor it belongs to where the decoder has
    one on the host and the storage can (Decoder.slot: a local file), else through the storage's
    buffers (one of 4 MiB; a bucket's 5 of 16 MiB); checked as it is read."""

    def feed_file(file: str, size: int, decoder: Decoder) -> str:
        hasher = xxhash.xxh3_64()

        def piece(view: memoryview) -> None:
            hasher.update(view)
            counter.add(len(view))
            decoder.feed(torch.from_numpy(np.frombuffer(view, dtype=np.uint8)))

        # Read straight into the tensors that keep the bytes where it can: one copy, not two.
        storage.stream(name, file, size, piece, into=decoder.slot)
        return hasher.hexdigest()

    return _decoded(state, chosen, feed_file, "as read", into_model, images)


def _receive(
    env: DistEnv,
    state: TrainState,
    chosen: Copy,
    source: int,
    group: dist.ProcessGroup | None,
    onward: dist.ProcessGroup | None,
) -> tuple[Objects, str]:
    """The checkpoint from ``source`` over ``group``. ``onward``: this node's group, whose other
    ranks get every chunk from here as it lands."""
    assert group is not None
    forward = stream.Forward(env.device, env.rank, onward) if onward is not None else None

    def feed_file(file: str, size: int, decoder: Decoder) -> str:
        feed = decoder.feed
        if forward is not None:

            def feed(chunk: torch.Tensor) -> None:
                forward.send(chunk)
                decoder.feed(chunk)

        return stream.receive(size, env.device, source, group, feed)

    return _decoded(state, chosen, feed_file, "as received", env.rank != CLEAN)


FeedFile = Callable[[str, int, Decoder], str]  # (file, size, its decoder) -> the bytes' xxh3


def _decoded(
    state: TrainState,
    chosen: Copy,
    feed_file: FeedFile,
    how: str,
    into_model: bool,
    images: dict[str, Decoder] | None = None,
) -> tuple[Objects, str]:
    """Each file decoded as its bytes arrive (``feed_file`` hands them on and returns their
    checksum), with ``into_model`` the model's part straight into the model's own tensors: no
    copy of the checkpoint is ever whole in memory here (``images``: each file's Decoder, kept to
    pass the file on from where it landed). If it then fails to verify, the model
    holds part of it: resume() starts such models again from rank CLEAN's, which never decodes
    into its own (its model file goes to fresh memory, copied in only by a restore)."""
    objects: Objects = {}
    problems = []
    targets = state.targets() if into_model else {}
    for file, entry in chosen.entries.items():
        decoder = Decoder(file, entry["size"], targets.get(file), state.device_for(file))
        try:
            digest = feed_file(file, entry["size"], decoder)
        except Exception as e:  # an I/O error reading the copy again: this rank's copy fails
            problems.append(f"{file}: {type(e).__name__}: {e}")
            continue
        if digest != entry["xxh3_64"]:
            problems.append(f"{file}: checksum mismatch {how}")
            continue
        try:
            objects[file] = decoder.result()
            if images is not None:
                images[file] = decoder
        except Exception as e:  # as decode() does: whatever a malformed file raises
            problems.append(f"{file} does not deserialise: {str(e)[:200] or type(e).__name__}")
    if not problems:
        try:
            check(state, chosen.entries, objects)
        except Exception as e:  # never raise alone: the other ranks are waiting for the outcome
            problems.append(str(e) if isinstance(e, Problem) else f"{type(e).__name__}: {e}")
    return (objects if not problems else {}), "; ".join(problems)
