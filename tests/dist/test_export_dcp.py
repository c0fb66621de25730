"""An exported DCP directory loads in a real 2-rank gloo group, into tensors sharded across the
ranks (as torchtitan's FSDP model loads it): the export is a world of one, read at any world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_gloo import run_group

from train.ckpt.__main__ import main
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage

pytestmark = pytest.mark.timeout(120)


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {"blocks.0.w": torch.randn(9, 4), "head.b": torch.randn(7).to(torch.bfloat16)}


def _load_sharded(env, out: str) -> dict[str, bool]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (env.world_size,))
    full = _weights()
    into = {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in full.items()}
    dcp.load(into, checkpoint_id=out)
    return {k: bool(torch.equal(v.full_tensor(), full[k])) for k, v in into.items()}


def test_a_dcp_export_loads_sharded_across_two_ranks(tmp_path: Path) -> None:
    CheckpointManager(LocalStorage(tmp_path / "run" / "checkpoints"), keep=1).save(
        7, {"model.safetensors": {f"module.{k}": v for k, v in _weights().items()}}, {}
    )
    out = tmp_path / "dcp"
    assert main(["export", str(tmp_path / "run"), "--format", "dcp", "--out", str(out)]) == 0
    for value, _ in run_group(_load_sharded, str(out)):
        assert value == {"blocks.0.w": True, "head.b": True}
