"""Who resumes from what: pure functions over what every rank reported at start.

Every rank gets every rank's Report (train/checkpointing/resume.py gathers them) and applies these
functions to the same lists, so no two ranks can pick different checkpoints, and the rule is
unit-tested without a process group. The choice itself is train/ckpt/select.py's, the rule a plain
loop's ``load_latest`` uses too; this adds who holds the chosen step and who reads, copies or
receives it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from train.ckpt import select

DURABLE, LOCAL = 0, 1  # tiers, in the order preferred on equal steps


@dataclass(frozen=True)
class Copy:
    """One checkpoint one rank can read, as listed: its manifest and file sizes, nothing read yet."""

    tier: int
    name: str
    step: int
    location: str = ""
    digest: str = ""  # of the manifest's file list: the same on every node for the same state
    fingerprint: str | None = None
    entries: dict[str, dict] = field(default_factory=dict)  # file -> {"size", "xxh3_64"}
    problem: str = ""  # why it is not usable as listed ("": it may be)


@dataclass(frozen=True)
class Report:
    """What one rank found at start."""

    node: int
    copies: tuple[Copy, ...] = ()
    last_logged: int = 0  # the newest step the run's record shows
    unlisted: str = ""  # why a tier of this rank could not be listed at all ("": every tier was)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def decode(raw: bytes) -> Report:
        data = json.loads(raw)
        copies = tuple(Copy(**c) for c in data["copies"])
        return Report(data["node"], copies, data["last_logged"], data.get("unlisted", ""))


@dataclass(frozen=True)
class Plan:
    """One round of the resume: the step every rank loads, and who holds it."""

    chosen: Copy
    source: int  # the lowest rank holding it: it sends it to the ranks that cannot read a copy
    holders: dict[int, Copy]  # rank -> its own copy of the chosen state
    mixed: bool = False  # some node holds another state under the same step


@dataclass(frozen=True)
class Role:
    # read its own copy, read another node's, receive one from the source over the network, or
    # take its node leader's (whichever of the others that rank does): one copy per node
    kind: Literal["own", "copy", "receive", "follow"]
    copy: Copy | None = None
    leader: int = -1  # a follower's: the rank on its node that reads or receives


class Foreign(Exception):
    """The newest checkpoint was written by another model or config."""

    def __init__(self, copy: Copy, fingerprint: str):
        super().__init__(
            f"checkpoint {copy.location} was written by a different model/config "
            f"(fingerprint {copy.fingerprint} != {fingerprint}); "
            "resume with the original --task/--model/--data settings or use a new --run-dir"
        )


def choose(reports: list[Report], excluded: set[tuple[int, str]], fingerprint: str) -> Plan | None:
    """The round's plan, None if no usable checkpoint is left; ``excluded``: (rank, location) of
    copies that failed when read. Raises Foreign."""
    copies = {
        (rank, c.location): c
        for rank, r in enumerate(reports)
        for c in r.copies
        if not c.problem and (rank, c.location) not in excluded
    }
    listed = [
        select.Listed(c.step, rank, c.tier, where, compatible=c.fingerprint == fingerprint)
        for (rank, where), c in copies.items()
    ]
    try:
        pick = select.newest(listed)
    except select.Incompatible as e:
        raise Foreign(copies[(e.listed.holder, e.listed.location)], fingerprint) from None
    if pick is None:
        return None
    chosen = copies[(pick.holder, pick.location)]
    same_step = [
        (rank, c) for (rank, _), c in copies.items() if c.step == chosen.step and c.fingerprint == fingerprint
    ]
    holders: dict[int, Copy] = {}
    for rank, c in sorted(same_step, key=lambda rc: (rc[0], rc[1].tier)):
        if c.digest == chosen.digest:
            holders.setdefault(rank, c)
    mixed = any(c.digest != chosen.digest for _, c in same_step)
    return Plan(chosen, pick.holder, holders, mixed)


_PREFERRED = {"own": 0, "copy": 1, "receive": 2}  # what a node's leader does, best first


def roles(plan: Plan, reports: list[Report], shared: bool, forced: set[int]) -> list[Role]:
    """What each rank does this round: on each node one rank (the leader) reads a copy or
    receives one; the node's other ranks follow it, so a node pulls one copy from storage or the
    network whatever its number of ranks. ``shared``: the nodes see one durable directory;
    ``forced``: ranks that failed to read another node's copy before: their node receives now."""
    forced_nodes = {reports[rank].node for rank in forced}
    alone = []
    for rank, report in enumerate(reports):
        if rank in plan.holders:
            alone.append(Role("own", plan.holders[rank]))
            continue
        role = Role("receive")
        if report.node not in forced_nodes:
            for holder, c in sorted(plan.holders.items()):
                # A shared directory shares the durable tier; a node-local tier is only ever its node's.
                if (shared and c.tier == DURABLE) or reports[holder].node == report.node:
                    role = Role("copy", c)
                    break
        alone.append(role)
    out = list(alone)
    for ranks in node_ranks(reports).values():
        leader = min(ranks, key=lambda r: (_PREFERRED[alone[r].kind], r))
        for rank in ranks:
            if rank != leader:
                out[rank] = Role("follow", leader=leader)
    return out


def node_ranks(reports: list[Report]) -> dict[int, list[int]]:
    """Each node's ranks, in rank order."""
    nodes: dict[int, list[int]] = {}
    for rank, report in enumerate(reports):
        nodes.setdefault(report.node, []).append(rank)
    return nodes


def receivers(roles_: list[Role]) -> list[int]:
    """The ranks that receive the checkpoint from the source over the network (node leaders)."""
    return [rank for rank, role in enumerate(roles_) if role.kind == "receive"]


def readers(roles_: list[Role]) -> list[int]:
    """The ranks that read a copy from storage: one per node that can see one."""
    return [rank for rank, role in enumerate(roles_) if role.kind in ("own", "copy")]


def followers(roles_: list[Role], leader: int) -> list[int]:
    return [rank for rank, role in enumerate(roles_) if role.kind == "follow" and role.leader == leader]


@dataclass
class Failures:
    """What the rounds so far left out; each failed round adds to it (the same on every rank)."""

    excluded: set[tuple[int, str]] = field(default_factory=set)  # copies that failed when read
    forced: set[int] = field(default_factory=set)  # ranks that receive from now on
    skipped: list[str] = field(default_factory=list)  # checkpoint names dropped, in order
    transfers: int = 0  # rounds in which only a transfer failed (the sender's copy was fine)

    def add(self, plan: Plan, roles_: list[Role], outcomes: list[str]) -> list[tuple[str, str]]:
        """After a round in which some rank's copy failed (``outcomes``: "" or why, per rank).
        Returns (location, why) of each copy dropped, for the log."""
        sender_ok = not outcomes[plan.source]
        transfer_only, dropped = True, []
        for rank, problem in enumerate(outcomes):
            if not problem:
                continue
            role = roles_[rank]
            if role.kind == "follow":
                continue  # its leader's outcome tells a bad copy; alone, it is a failed transfer
            if role.kind == "copy":
                self.forced.add(rank)  # it cannot read that copy after all: it receives one next time
                transfer_only = False
                continue
            if role.kind == "receive" and sender_ok:
                continue  # corrupt in transit: no copy is dropped, the transfer is tried again
            transfer_only = False
            if role.kind == "own" and role.copy is not None:
                culprit = (rank, role.copy.location)
            else:
                culprit = (plan.source, plan.chosen.location)
            if culprit not in self.excluded:
                self.excluded.add(culprit)
                self.skipped.append(culprit[1].rstrip("/").rpartition("/")[2])
                dropped.append((culprit[1], problem))
        self.transfers += transfer_only
        return dropped
