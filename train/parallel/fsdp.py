"""FSDP2 over the job's ranks: ``--parallel.mode fsdp`` shards every transformer block and the root
over all ranks; ``hsdp`` shards within groups of ``--parallel.shard-size`` consecutive ranks and
replicates across the groups (a 2-D device mesh, replicas outermost).

Applied right after the model is built and moved to its device, before the optimizer: FSDP2
replaces each parameter by a DTensor holding this rank's rows, and the optimizer must see those.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from train import config
from train.errors import ConfigError
from train.runtime.dist import DistEnv


def sharded(cfg: config.Config) -> bool:
    return cfg.parallel.mode != "ddp"


def mesh_shape(cfg: config.Config, env: DistEnv) -> tuple[int, ...]:
    """(ranks,) for fsdp, (replica groups, ranks a group) for hsdp; ConfigError if it does not fit."""
    if env.backend is None:
        raise ConfigError(
            f"--parallel.mode {cfg.parallel.mode} needs a process group: start the job with torchrun "
            "or ftjob (even for one rank), or use --parallel.mode ddp"
        )
    if cfg.parallel.mode == "fsdp":
        return (env.world_size,)
    group = cfg.parallel.shard_size or env.local_world_size
    if env.world_size % group:
        raise ConfigError(
            f"--parallel.mode hsdp: {env.world_size} ranks do not split into shard groups of "
            f"{group}; set --parallel.shard-size to a divisor of the world size"
        )
    return (env.world_size // group, group)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP gathers one at a time: every entry of the model's ModuleLists (a
    transformer's blocks); the rest belongs to the root."""
    return [m for list_ in model.modules() if isinstance(list_, nn.ModuleList) for m in list_]


def shard(model: nn.Module, cfg: config.Config, env: DistEnv) -> DeviceMesh:
    """Shard ``model`` in place (its parameters become DTensors); returns the mesh."""
    shape = mesh_shape(cfg, env)
    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    mesh = init_device_mesh(env.device.type, shape, mesh_dim_names=names)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    # Weights compute in the low precision, gradients are reduced and kept in fp32, as DDP's are.
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return mesh
