"""One optimizer step and what it is made of: the optimizer and its schedule, mixed precision,
the DDP (and compiled) model, evaluation. train/trainer.py calls these in order."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.nn.parallel import DistributedDataParallel as DDP

from train import config, rng
from train.errors import ConfigError
from train.loader import Batches
from train.parallel import fsdp
from train.runtime import comm
from train.runtime.dist import DistEnv
from train.runtime.private import Untrusted, trusted_tree
from train.sampler import BatchPlan
from train.state import TrainState
from train.task import Task, collate


def lr_schedule(cfg: config.OptimConfig, max_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min((step - cfg.warmup_steps) / max(max_steps - cfg.warmup_steps, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: config.OptimConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def compile_cache(cfg: config.Config) -> None:
    """With --compile, before anything of torch's asks for its cache (torch then fixes it for the
    process): compiled code is loaded from there, so nobody else may write it, nor swap it or a
    directory above it. Inductor's default, /tmp/torchinductor_<user>, another user could create
    first; a preset TORCHINDUCTOR_CACHE_DIR is held to the same rule."""
    if not cfg.compile:
        return
    preset = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if preset and Path(preset) == Path(default_cache_dir()).absolute():
        preset = None  # torch's own default, set by torch itself once something asked for it
    cache = Path(preset) if preset else Path(cfg.data.cache_dir).expanduser() / "inductor"
    try:
        trusted_tree(cache, create=not preset)
    except (Untrusted, OSError) as e:
        where = "TORCHINDUCTOR_CACHE_DIR" if preset else "--data.cache-dir"
        raise ConfigError(f"--compile: {e}; point {where} at a directory of your own") from None
    try:  # torch 2.13 keeps its precompiled headers there whatever TORCHINDUCTOR_CACHE_DIR says
        trusted_tree(Path(default_cache_dir()), create=True)
    except (Untrusted, OSError) as e:
        raise ConfigError(f"--compile: {e}; remove it, or set TMPDIR to a directory of your own") from None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)


def wrap(model: torch.nn.Module, cfg: config.Config, env: DistEnv) -> torch.nn.Module:
    """The model the steps run: DDP across ranks (unless FSDP2 shards it), then compiled if asked
    (DDP's graph breaks at its buckets). Checkpoints keep the plain module's names: the state
    holds ``model`` itself."""
    if env.backend and not fsdp.sharded(cfg):  # FSDP2 sharded the model in place (build())
        model = DDP(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def _is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), DDP)  # compiled or not


def autocast(device: torch.device, precision: str):
    """The forward's autocast for --precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_step(
    task: Task,
    model: torch.nn.Module,
    state: TrainState,
    plan: BatchPlan,
    env: DistEnv,
    cfg: config.Config,
    batches: Batches | None = None,
) -> tuple[torch.Tensor, float]:
    """One optimizer step; returns this rank's mean loss over its micro-batches and the step's LR.
    ``batches``: DataLoader workers' micro-batches, in the sampler's order (None: built here from
    the sampler's indices)."""
    micro_batches = state.sampler.step_indices(plan, env.rank) if batches is None else [[]] * plan.accum_steps
    loss_sum = torch.zeros((), device=env.device)
    scaler = state.scaler
    for m, indices in enumerate(micro_batches):
        if batches is not None:
            batch = batches.next()
        else:
            batch = collate([task.train_data[i] for i in indices], env.device, task.collate_fn)
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = m == plan.accum_steps - 1 or not _is_ddp(model)
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(env.device, cfg.precision):
                loss = task.loss_fn(model, batch).float() / plan.accum_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    if scaler is not None:
        scaler.unscale_(state.optimizer)  # clipping sees the true gradients
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
    lr = state.optimizer.param_groups[0]["lr"]
    if scaler is not None:
        # On inf/nan the scaler skips the update; the step still counts, and consumes its data.
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.sampler.advance(plan)
    state.step += 1
    return loss_sum, lr


def warm_up_buckets(
    task: Task, model: torch.nn.Module, state: TrainState, plan: BatchPlan, env: DistEnv
) -> None:
    """One throwaway forward/backward, so that every start reaches its first real step alike.

    DDP reorders its gradient buckets after the first backward. With 3+ ranks the summation order
    of an element depends on its place in the bucket, so a resumed run (first step: initial
    layout) and an uninterrupted one (rebuilt layout) would differ in the last bits. Eval mode and
    forked RNG keep dropout streams and buffers untouched; the gradients are thrown away.
    With 1 or 2 ranks every element is a sum of at most two addends, exact in any order, so the
    throwaway step (a full step's time on every restart) is skipped.
    """
    if not _is_ddp(model) or env.world_size <= 2:
        return
    indices = state.sampler.step_indices(plan, env.rank)[0]
    batch = collate([task.train_data[i] for i in indices], env.device, task.collate_fn)
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        task.loss_fn(model, batch).backward()
        model.train()
    state.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(task: Task, cfg: config.Config, plan: BatchPlan, env: DistEnv) -> float | None:
    if task.val_data is None or len(task.val_data) == 0:
        return None
    model = task.model
    # A task's evaluation may draw random numbers; the training streams must not notice.
    streams = rng.capture(env.device)
    model.eval()
    per_rank = plan.micro_batch_size
    total = torch.zeros((), device=env.device)
    for b in range(cfg.eval_batches):
        start = (b * env.world_size + env.rank) * per_rank
        indices = [i % len(task.val_data) for i in range(start, start + per_rank)]
        batch = collate([task.val_data[i] for i in indices], env.device, task.collate_fn)
        with autocast(env.device, cfg.precision):
            total += task.loss_fn(model, batch).float()
    model.train()
    rng.restore(streams, env.device)
    return float(comm.mean(total / cfg.eval_batches))
