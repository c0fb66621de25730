"""The node-local tier of a sharded run between nodes (train/checkpointing/ring.py, local_shards.py):
who keeps whose shards, which steps the surviving nodes can restore and what must travel (pure),
and the transfers themselves over a real 2-rank gloo group: files of several chunks cross in both
directions at once and land whole; a node lacking a step receives it whole, manifest included; a
file that cannot be had fails its receiver, and no rank hangs."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
from test_gloo import run_group

from train.checkpointing import local_shards, ring
from train.ckpt import manifest as mf
from train.ckpt import shards as fmt


def test_each_node_keeps_its_partners_shards_only_where_it_lacks_them() -> None:
    fsdp = ring.Ring(world=4, per_node=2, shards=4)  # two nodes of two ranks
    assert [fsdp.sends_to(r) for r in range(4)] == [2, 3, 0, 1]
    assert [fsdp.receives_from(r) for r in range(4)] == [2, 3, 0, 1]
    three = ring.Ring(world=6, per_node=2, shards=6)
    assert [three.sends_to(r) for r in range(6)] == [2, 3, 4, 5, 0, 1]
    assert [three.receives_from(r) for r in range(6)] == [4, 5, 0, 1, 2, 3]
    hsdp = ring.Ring(world=4, per_node=2, shards=2)  # a shard group a node: every node a replica
    assert [hsdp.sends_to(r) for r in range(4)] == [None] * 4 and all(map(hsdp.writes, range(4)))
    wide = ring.Ring(world=8, per_node=2, shards=4)  # shard groups of two nodes
    assert [wide.sends_to(r) for r in range(8)] == [2, 3, 4, 5, 6, 7, 0, 1]
    narrow = ring.Ring(world=4, per_node=4, shards=2)  # one node, two replicas on it
    assert [narrow.writes(r) for r in range(4)] == [True, True, False, False]
    assert [narrow.sends_to(r) for r in range(4)] == [None] * 4


def _copy(name: str, held: list[str], files: list[str], save: str = "a") -> dict:
    return {"name": name, "save": save, "files": files, "held": held, "size": 100}


def test_the_ring_runs_only_where_ranks_are_numbered_node_by_node() -> None:
    """Partners are found by rank number: torchrun's numbering, the same ranks on every node."""
    torchrun = [(r // 2, r % 2, 2) for r in range(6)]
    assert ring.numbering_problem(torchrun) == ""
    assert ring.numbering_problem([(0, 0, 1)]) == ""
    uneven = [(0, 0, 2), (0, 1, 2), (1, 0, 1)]
    assert "different numbers of ranks (1, 2)" in ring.numbering_problem(uneven)
    interleaved = [(0, 0, 2), (1, 0, 2), (0, 1, 2), (1, 1, 2)]
    assert ring.numbering_problem(interleaved) == "rank 1 is local rank 0 of node 1, not 1 of 0"


def test_a_step_is_restorable_only_while_the_nodes_together_hold_every_file() -> None:
    files = ["s0", "s1", "s2", "train"]
    found = {  # three nodes of one rank, node 1 lost (a fresh node 1 holds nothing)
        0: [_copy("step_00000009", ["s0", "s2", "train"], files), _copy("step_00000006", ["s0"], files)],
        2: [_copy("step_00000009", ["s2", "s1", "train"], files)],
    }
    copies = local_shards.plan(found)
    assert [c.name for c in copies] == ["step_00000009"]  # step 6: s1, s2 and train are gone
    assert local_shards.plan({0: [_copy("step_00000003", ["s0"], files)]}) == []
    # Two saves of one step (two attempts) never make one copy; what is malformed is dropped.
    split = {0: [_copy("step_00000009", ["s0", "s1"], files, "a")], 2: [_copy("step_00000009", ["s2", "train"], files, "b")]}
    bad = [{"name": "../x", "save": "a", "files": [], "held": [], "size": 1}, "junk", _copy("step_00000004", [], ["../s"])]
    assert local_shards.plan(split) == [] and local_shards.plan({0: bad}) == []
    # First the manifest and train file to the node lacking the step, then what each node reads.
    first = local_shards.transfers(copies[0], {r: {"manifest.json", "train"} for r in (0, 1, 2)})
    assert first == [("manifest.json", 0, 1), ("train", 2, 1)]  # from both holders, not one
    then = local_shards.transfers(copies[0], {0: {"s0", "train"}, 1: {"s1", "train"}, 2: {"s2", "train"}})
    assert then == [("s1", 2, 1), ("train", 0, 1)]  # node 1 holds nothing in this copy's lists
    copies[0].holders[1] = ["manifest.json", "train"]  # as complete() records the first moves
    assert local_shards.transfers(copies[0], {1: {"s1", "train"}}) == [("s1", 2, 1)]


def _transfer_worker(env, root: str) -> dict:
    from train.ckpt.manager import CheckpointManager
    from train.ckpt.storage import LocalStorage

    pg = dist.new_group([0, 1], backend="gloo")
    mine = Path(root) / f"node{env.rank}"
    storage = LocalStorage(mine)
    # Both ways at once: files of several chunks, made of pieces that do not line up with chunks.
    pieces = [os.urandom(ring.CHUNK - 7), os.urandom(3), os.urandom(ring.CHUNK + 1000)]
    entry = fmt.entry_of(pieces)
    into = storage.join(".tmp-exchange")
    other = 1 - env.rank
    got = ring.exchange(pg, other, (f"shard-{env.rank}", entry, pieces), other, f"shard-{other}", into)
    into.close()
    sent = b"".join(pieces)
    received = (mine / ".tmp-exchange" / f"shard-{other}").read_bytes()
    # Rank 0 sends a file under a name rank 1 does not expect; rank 1 has nothing to send: each
    # receiver refuses (OSError), and both exchanges run to their end (no rank left waiting).
    into = storage.join(".tmp-refused")
    outgoing = ("../evil", entry, pieces) if env.rank == 0 else None
    try:
        ring.exchange(pg, other, outgoing, other, f"shard-{other}", into)
        refused = ""
    except OSError as e:
        refused = str(e)
    into.close()
    # A node lacking a step receives it whole; then a file the sender cannot have fails its receiver.
    manager = CheckpointManager(storage, keep=2)
    files = {"a.bin": os.urandom(3 * ring.CHUNK // 2), "b.bin": b"b"}
    if env.rank == 0:
        pending = storage.begin("step_00000005")
        for file, data in files.items():
            pending.write(file, data)
        pending.write(mf.MANIFEST, mf.build_from(5, {f: fmt.entry_of([d]) for f, d in files.items()}, {}))
        pending.commit()
    outcome = []
    for copy in ("whole", "lacking b.bin"):
        if env.rank == 0 and copy != "whole":
            (mine / "step_00000005" / "b.bin").unlink()
        elif env.rank == 1 and copy != "whole":
            storage.delete("step_00000005")
        transfers = [(mf.MANIFEST, 0, 1), ("a.bin", 0, 1), ("b.bin", 0, 1)]
        try:
            local_shards.fetch("step_00000005", transfers, manager, env, pg, copy[:4])
            problem = ""
        except OSError as e:
            problem = str(e)
        landed = {f: (mine / "step_00000005" / f).read_bytes() for f in files if (mine / "step_00000005" / f).exists()}
        outcome.append((problem, landed if env.rank else files, sorted(landed)))
    return {"got": got[0] if got else None, "sent": sent, "received": received, "outcome": outcome,
            "refused": refused, "left": sorted(p.name for p in (mine / ".tmp-refused").iterdir())}  # fmt: skip


def test_files_cross_between_nodes_whole_and_a_missing_one_fails_only_its_receiver(tmp_path: Path) -> None:
    (zero, _), (one, _) = run_group(_transfer_worker, str(tmp_path))
    assert zero["got"] == "shard-1" and one["got"] == "shard-0"
    assert zero["received"] == one["sent"] and one["received"] == zero["sent"]
    assert "had nothing to send" in zero["refused"] and "not 'shard-0'" in one["refused"]
    assert zero["left"] == one["left"] == []
    # A node lacking the step receives all of it, the sender's bytes.
    assert one["outcome"][0] == ("", zero["outcome"][0][1], ["a.bin", "b.bin"])
    (sender, _, _), (receiver, _, kept) = zero["outcome"][1], one["outcome"][1]
    assert "b.bin" in sender and "b.bin" in receiver  # the sender lacks it; its receiver is told
    assert kept == []  # and nothing of the incomplete copy was put in place
