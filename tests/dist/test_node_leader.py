"""One read per node, over real 2-rank gloo groups on one "node": rank 0 (the node's leader) reads
and verifies the checkpoint; rank 1 reads the same file again from the page cache (the copy is on
this machine's own disk), or, where it could not (shared storage, a bucket), gets it from rank 0
over the node's group."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch.distributed as dist
from test_gloo import FINGERPRINT, _manager, _tiny_state, _train_a_little, run_group

from train.checkpointing.snapshot import Snapshots

ONE_NODE = {"LOCAL_RANK": "{rank}", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}


def _worker(env, run_dir: str, sent: bool) -> dict:
    from train.checkpointing import fetch
    from train.checkpointing.replicas import layout
    from train.checkpointing.resume import resume

    if sent:  # as on a filesystem a network serves: the leader sends its verified copy
        fetch.direct = lambda roles, leader: False
    state = _tiny_state(seed=10)
    _train_a_little(state, steps=3)
    files = Snapshots(state).take(env.device, env.rank == 0)  # collective
    if files is not None:
        _manager(run_dir).save(3, files(), {"fingerprint": FINGERPRINT})
    dist.barrier()
    nodes = layout(Path(run_dir), env)
    fresh = _tiny_state(seed=500 + env.rank)
    resumed = resume(_manager(run_dir), fresh, env, FINGERPRINT, reads=nodes.writes, shared=nodes.shared)
    return {
        "resumed": resumed and vars(resumed),
        "weights": safetensors.torch.save(fresh.model.state_dict()),
        "optimizer": safetensors.torch.save(
            {k: v for k, v in fresh.optimizer.state_dict()["state"][0].items() if k != "step"}
        ),
    }


def _check(tmp_path: Path, sent: bool) -> dict:
    (r0, _), (r1, _) = run_group(_worker, str(tmp_path), sent, extra_env=ONE_NODE)
    saved = (tmp_path / "checkpoints" / "step_00000003" / "model.safetensors").read_bytes()
    assert safetensors.torch.load(r0["weights"]).keys() == safetensors.torch.load(saved).keys()
    assert r0["weights"] == r1["weights"]  # both hold the saved state, not their own init
    assert r0["optimizer"] == r1["optimizer"]  # the optimizer's moments too
    resumed = r0["resumed"]
    assert resumed == r1["resumed"] and resumed["step"] == 3
    assert resumed["read_by"] == [0] and resumed["received_by"] == []
    size = sum(p.stat().st_size for p in (tmp_path / "checkpoints" / "step_00000003").iterdir())
    assert resumed["pulled_bytes"][1] == 0 and resumed["pulled_bytes"][0] >= size - 4096
    return resumed


def test_the_other_rank_of_a_node_reads_the_verified_copy_again_from_the_page_cache(tmp_path: Path) -> None:
    resumed = _check(tmp_path, sent=False)
    assert resumed["reread_bytes"][0] == 0 and resumed["reread_bytes"][1] > 0


def test_where_it_cannot_the_node_leader_sends_it_over_the_nodes_group(tmp_path: Path) -> None:
    resumed = _check(tmp_path, sent=True)
    assert resumed["reread_bytes"] == [0, 0]


def _failed_in_place_worker(env, run_dirs: list[str]) -> dict:
    """Every rank saves the same state into its node's run dir (one dir: one node of 2 ranks; two:
    two nodes of 1), the optimizer file's last byte flipped: the model file reads into place
    (checksum fine), then the optimizer's fails, and no older checkpoint is left."""
    from train.checkpointing.replicas import layout
    from train.checkpointing.resume import resume

    own = Path(run_dirs[env.rank % len(run_dirs)])
    nodes = layout(own, env)
    state = _tiny_state(seed=10)
    _train_a_little(state, steps=3)
    files = Snapshots(state).take(env.device, nodes.writes)  # collective
    if files is not None:
        _manager(own).save(3, files(), {"fingerprint": FINGERPRINT})
        optim = own / "checkpoints" / "step_00000003" / "optim.safetensors"
        data = bytearray(optim.read_bytes())
        data[-1] ^= 0xFF
        optim.write_bytes(bytes(data))
    dist.barrier()
    fresh = _tiny_state(seed=500)  # the job's initial weights: the same on every rank
    init = safetensors.torch.save(fresh.model.state_dict())
    resumed = resume(_manager(own), fresh, env, FINGERPRINT, reads=nodes.writes, shared=nodes.shared)
    return {"resumed": resumed, "init": init, "weights": safetensors.torch.save(fresh.model.state_dict())}


def test_a_copy_read_into_place_that_then_fails_leaves_every_model_as_it_started(tmp_path: Path) -> None:
    """A rank that read the model file into its own parameters before another file failed its
    checksum starts again from a rank that never did (rank 0 decodes its model file apart)."""
    shapes = {
        "one node, 2 ranks": ([str(tmp_path / "a")], ONE_NODE),
        "two nodes, 1 rank each": (
            [str(tmp_path / "b0"), str(tmp_path / "b1")],
            {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "{rank}"},
        ),
    }
    for shape, (run_dirs, env) in shapes.items():
        for value, _ in run_group(_failed_in_place_worker, run_dirs, extra_env=env):
            assert value["resumed"] is None, shape
            assert value["weights"] == value["init"], f"{shape}: a model kept bytes of the failed copy"
