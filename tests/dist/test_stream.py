"""Streaming a checkpoint to the ranks that lack it, over real 2-rank gloo groups: bytes arrive
whole and in order, the sender building each chunk from where it holds the file; a sender that
cannot still completes the protocol (no rank hangs); a copy that fails verification makes every
rank fall back together."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import xxhash
from test_gloo import FINGERPRINT, _manager, _tiny_state, _train_a_little, run_group

from train.checkpointing import stream
from train.checkpointing.snapshot import Snapshots

FILES = {"a.bin": 2 * stream.CHUNK + 12345, "b.bin": 5, "empty.bin": 0, "c.bin": stream.CHUNK}


class _Held:
    """A file as a rank holds it after decoding (stands in for train.ckpt.decoder.Decoder);
    ``fails_at``: the offset from which it can give no byte back."""

    on_host = True

    def __init__(self, data: bytes, fails_at: int | None = None):
        self.data, self.fails_at, self.asked = data, fails_at, []

    def copy_out(self, at: int, into) -> None:
        self.asked.append(into.numel())
        if self.fails_at is not None and at + into.numel() > self.fails_at:
            raise OSError("gone")
        into.copy_(torch.frombuffer(bytearray(self.data[at : at + into.numel()]), dtype=torch.uint8))


def _stream_worker(env, fails_at: int | None) -> dict:
    group = dist.new_group([0, 1])
    if env.rank == 0:
        blobs = {f: os.urandom(n) for f, n in FILES.items()}
        held = {f: _Held(b, fails_at if f == "a.bin" else None) for f, b in blobs.items()}
        if fails_at is not None:
            del held["c.bin"]  # and one file it holds no copy of at all
        stream.send_files(held, FILES, env.device, 0, group)
        sha = {f: hashlib.sha256(b).hexdigest() for f, b in blobs.items()}
        xxh3 = {f: xxhash.xxh3_64(b).hexdigest() for f, b in blobs.items()}
        return {"sha": sha, "xxh3": xxh3, "asked": max(n for h in held.values() for n in h.asked or [0])}
    got, digests, landed = {}, {}, []
    for f, n in FILES.items():
        hasher = hashlib.sha256()

        def on_chunk(piece, hasher=hasher) -> None:
            landed.append(piece.numel())
            hasher.update(piece.numpy())

        digests[f] = stream.receive(n, env.device, 0, group, on_chunk)
        got[f] = hasher.hexdigest()
    dist.destroy_process_group(group)
    return {"sha": got, "xxh3": digests, "landed": landed}


def test_files_stream_whole_and_in_order_from_where_the_sender_holds_them(tmp_path: Path) -> None:
    (sent, _), (received, _) = run_group(_stream_worker, None)
    assert received["sha"] == sent["sha"]
    assert received["xxh3"] == sent["xxh3"]  # what the receiver checksummed on its thread
    assert sum(received["landed"]) == sum(FILES.values())
    assert max(received["landed"]) == stream.CHUNK  # in chunks, never a whole file at once
    assert sent["asked"] == stream.CHUNK  # the sender too builds one chunk at a time


def test_a_sender_that_cannot_build_a_chunk_still_sends_every_chunk(tmp_path: Path) -> None:
    (sent, log), (received, _) = run_group(_stream_worker, stream.CHUNK + 7)
    # The receiver got the announced sizes (zeros from the failing chunk on; all zeros for the
    # file not held), so those files' checksums fail and the others arrive whole; no hang.
    bad = ("a.bin", "c.bin")
    assert all(received["xxh3"][f] != sent["xxh3"][f] for f in bad)
    assert {f: d for f, d in received["xxh3"].items() if f not in bad} == {
        f: d for f, d in sent["xxh3"].items() if f not in bad
    }
    assert any("could not send a checkpoint file" in line for line in log)


def _fallback_worker(env, run_dirs: list[str]) -> dict:
    from train.checkpointing.replicas import layout
    from train.checkpointing.resume import resume

    # Node 1 got further (step 5) but its copy of step 5 is corrupt; both nodes hold a step 3 of
    # their own (different states: they trained differently).
    state = _tiny_state(seed=10 + env.rank)
    own = Path(run_dirs[env.rank])
    nodes = layout(own, env)
    _train_a_little(state, steps=3)
    _manager(own).save(3, Snapshots(state).take(env.device, True)(), {"fingerprint": FINGERPRINT})
    if env.rank == 1:
        _train_a_little(state, steps=2)
        _manager(own).save(5, Snapshots(state).take(env.device, True)(), {"fingerprint": FINGERPRINT})
        model = own / "checkpoints" / "step_00000005" / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
    else:
        Snapshots(state).take(env.device, True)  # the snapshot is collective
    dist.barrier()
    fresh = _tiny_state(seed=500 + env.rank)
    resumed = resume(_manager(own), fresh, env, FINGERPRINT, reads=nodes.writes, shared=nodes.shared)
    return {"resumed": resumed and vars(resumed), "weights": safetensors.torch.save(fresh.model.state_dict())}


def test_a_corrupt_newest_copy_makes_every_rank_fall_back_together(tmp_path: Path) -> None:
    run_dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    nodes = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "{rank}"}
    (r0, log0), (r1, log1) = run_group(_fallback_worker, run_dirs, extra_env=nodes)
    # Round 1: node 1 streams its step 5 to node 0; both find it corrupt. Round 2: step 3, of
    # which the nodes hold different states: the lowest rank's wins and goes to the other node.
    for r in (r0, r1):
        assert r["resumed"]["step"] == 3 and r["resumed"]["source_rank"] == 0
        assert r["resumed"]["skipped"] == ["step_00000005"] and r["resumed"]["received_by"] == [1]
    assert r0["weights"] == r1["weights"]
    saved = safetensors.torch.load_file(
        str(Path(run_dirs[0]) / "checkpoints" / "step_00000003" / "model.safetensors")
    )
    assert safetensors.torch.load(r0["weights"]).keys() == saved.keys()
    assert any("step_00000005 is not usable" in line and "checksum mismatch" in line for line in log0 + log1)


def _one_node_saves(env, run_dirs: list[str], steps: int, saver: int):
    """Each rank a node with a run dir of its own; rank ``saver``'s node trains and saves ``steps``."""
    from train.checkpointing.replicas import layout

    own = Path(run_dirs[env.rank])
    state = _tiny_state(seed=10 + env.rank)
    _train_a_little(state, steps=steps)
    files = Snapshots(state).take(env.device, env.rank == saver)  # collective
    if files is not None:
        _manager(own).save(steps, files(), {"fingerprint": FINGERPRINT})
    return own, layout(own, env)


def _transfer_fault_worker(env, run_dirs: list[str], corrupt_times: int) -> dict:
    from train.checkpointing import stream as stream_mod
    from train.checkpointing.resume import resume

    own, nodes = _one_node_saves(env, run_dirs, steps=3, saver=0)
    if env.rank == 1:
        # Stands in for a fault on the wire or in this node's memory: the first file received
        # arrives with a checksum that does not match, ``corrupt_times`` times.
        real, left = stream_mod.receive, [corrupt_times]

        def faulty(*args, **kwargs):
            digest = real(*args, **kwargs)
            if left[0] > 0:
                left[0] -= 1
                return "0" * 16
            return digest

        stream_mod.receive = faulty
    dist.barrier()
    fresh = _tiny_state(seed=500 + env.rank)
    try:
        resumed = resume(_manager(own), fresh, env, FINGERPRINT, reads=nodes.writes, shared=nodes.shared)
    except RuntimeError as e:
        return {"error": str(e)}
    return {"resumed": resumed and vars(resumed), "weights": safetensors.torch.save(fresh.model.state_dict())}


def test_a_copy_corrupted_in_transit_is_sent_again_not_dropped(tmp_path: Path) -> None:
    run_dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    nodes = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "{rank}"}
    (r0, _), (r1, log1) = run_group(_transfer_fault_worker, run_dirs, 1, extra_env=nodes)
    for r in (r0, r1):  # the sender's copy verified: it is sent again, not dropped for an older step
        assert r["resumed"]["step"] == 3 and r["resumed"]["skipped"] == []
    assert r0["weights"] == r1["weights"]
    # Corrupt every time: the attempt ends on every rank (a restart), it never falls back to step 1.
    (e0, _), (e1, _) = run_group(_transfer_fault_worker, [str(tmp_path / "a"), str(tmp_path / "b")], 9, extra_env=nodes)
    assert "arrived corrupt twice" in e0["error"] and "arrived corrupt twice" in e1["error"]


def _failed_only_copy_worker(env, run_dirs: list[str]) -> dict:
    from train.checkpointing.resume import resume

    # Node 1 holds the only checkpoint, and it is corrupt; node 0 holds none, so its rank would
    # receive the copy straight into its model, but only once node 1 has read and verified it.
    own, nodes = _one_node_saves(env, run_dirs, steps=2, saver=1)
    if env.rank == 1:
        model = own / "checkpoints" / "step_00000002" / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
    dist.barrier()
    fresh = _tiny_state(seed=500 + env.rank)
    init = safetensors.torch.save(fresh.model.state_dict())
    resumed = resume(_manager(own), fresh, env, FINGERPRINT, reads=nodes.writes, shared=nodes.shared)
    return {"resumed": resumed and vars(resumed), "init": init, "weights": safetensors.torch.save(fresh.model.state_dict())}


def test_a_copy_that_fails_at_its_reader_never_reaches_another_rank(tmp_path: Path) -> None:
    run_dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    nodes = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "{rank}"}
    (r0, log0), (r1, _) = run_group(_failed_only_copy_worker, run_dirs, extra_env=nodes)
    assert r0["resumed"] is None and r1["resumed"] is None  # step 1: no valid checkpoint anywhere
    # Nothing is sent before every reader verified its copy: rank 0's model was never touched.
    assert r0["weights"] == r0["init"]
    # Rank 1 read its copy into its own model (it keeps no other copy to send from), so it starts
    # again from the weights of a rank that never did: rank 0's (in a job, every rank's initial ones).
    assert r1["weights"] == r0["init"]
    assert any("step_00000002 is not usable" in line for line in log0)
