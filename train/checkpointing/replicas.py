"""Every node is a replica: under DDP each node already holds the whole model and optimizer, so
each node's local rank 0 writes its own copy of every checkpoint into its own run directory -
nothing crosses the network to write it, and losing any node (the one with global rank 0
included) loses no checkpoint. At every start the ranks agree on the newest valid checkpoint that
exists on *any* node; the nodes that do not hold it receive it from one that does.

Nodes that share the directory checkpoints go to (``--ckpt.dir``, else the run directory's
checkpoints/: a shared filesystem) are found out at start - each node's local rank 0 leaves a
marker there and looks for the others' - and then only global rank 0 writes, as on one node.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from train.runtime import comm
from train.runtime.dist import DistEnv

log = logging.getLogger("train")


@dataclass(frozen=True)
class Layout:
    writes: bool  # this rank writes (and reads) the durable checkpoints it can see
    shared: bool  # every node sees the same durable checkpoints (one node: True)
    local_writes: bool  # this rank writes (and reads) its node's node-local tier


def layout(root: Path, env: DistEnv, remote: bool = False) -> Layout:
    """Collective on multi-node runs: who writes checkpoints, and whether the nodes share them.
    ``remote``: the durable checkpoints are in object storage - one place every node sees, written
    by global rank 0 alone - while each node still keeps its own node-local tier."""
    nodes = _nodes(root, env)
    if remote:
        return Layout(env.rank == 0, True, nodes.local_writes)
    return nodes


def _nodes(root: Path, env: DistEnv) -> Layout:
    if not env.multi_node:
        return Layout(env.rank == 0, True, env.rank == 0)
    marker = root / f".node-{uuid.uuid4().hex}" if env.local_rank == 0 else None
    if marker is not None:
        root.mkdir(parents=True, exist_ok=True)
        marker.touch()
    names = [n.decode() for n in comm.all_gather_bytes(marker.name.encode() if marker else b"", env.device)]
    sees_another = marker is not None and any(n and n != marker.name and (root / n).exists() for n in names)
    shared = torch.tensor([float(sees_another)], device=env.device)
    dist.all_reduce(shared)  # after every node has looked: the markers may go
    if marker is not None:
        with contextlib.suppress(OSError):
            marker.unlink()
    if shared.item() > 0:
        if env.rank == 0:
            log.info("the nodes share %s: rank 0 alone writes checkpoints", root)
        return Layout(env.rank == 0, True, env.rank == 0)
    if env.rank == 0:
        log.info("each node keeps its own copy of every checkpoint (%s is not shared)", root)
    return Layout(env.local_rank == 0, False, env.local_rank == 0)
