"""The training function, top to bottom: set-up, resume, the step, checkpoints, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from train import comm, config, faults, preempt, replicas, rng, warmstart
from train import dist as distributed
from train.ckpt.manager import CheckpointManager
from train.ckpt.objstore import FsspecStorage, open_storage
from train.ckpt.writer import CheckpointWriter
from train.errors import EXIT_PREEMPTED, ConfigError, StorageError
from train.loader import Batches
from train.local_tier import LocalTier
from train.metrics import Metrics
from train.private import Untrusted, private_dir
from train.resume import resume
from train.sampler import BatchPlan, GlobalSampler, plan_batches
from train.saving import SavePolicy
from train.snapshot import Snapshots
from train.state import CKPT_FILES, TrainState
from train.task import Task, collate, load_task
from train.watchdog import Watchdog

log = logging.getLogger("train")


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


def _is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), DDP)  # compiled or not


def compiled(model: torch.nn.Module, cfg: config.Config) -> torch.nn.Module:
    # Inductor's default cache is /tmp/torchinductor_<user>, which another user could create first.
    cache = Path(cfg.data.cache_dir).expanduser() / "inductor"
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        private_dir(cache, create=True)  # compiled code is loaded from it: it must be ours alone
    except Untrusted as e:
        raise ConfigError(f"--compile: {e}; set --data.cache-dir to a directory of your own") from None
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    return torch.compile(model)


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
    env: distributed.DistEnv,
    grad_clip: float,
    before_update: Callable[[], None],
    precision: str = "fp32",
    batches: Batches | None = None,
) -> tuple[torch.Tensor, float]:
    """One optimizer step; returns this rank's mean loss over its micro-batches and the step's LR.

    ``before_update`` runs right before the weights change (a background checkpoint copy may still
    be reading them until then). ``batches``: DataLoader workers' micro-batches, in the sampler's
    order (None: built here from the sampler's indices).
    """
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
            with autocast(env.device, precision):
                loss = task.loss_fn(model, batch).float() / plan.accum_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    if scaler is not None:
        scaler.unscale_(state.optimizer)  # clipping sees the true gradients
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    before_update()
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
    task: Task, model: torch.nn.Module, state: TrainState, plan: BatchPlan, env: distributed.DistEnv
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
def evaluate(task: Task, cfg: config.Config, plan: BatchPlan, env: distributed.DistEnv) -> float | None:
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


def train(cfg: config.Config, env: distributed.DistEnv) -> int:
    run_dir = Path(cfg.run_dir)
    plan = plan_batches(cfg.global_batch_size, env.world_size, cfg.micro_batch_size)
    fingerprint = config.fingerprint(cfg)
    if env.is_main:
        try:
            (run_dir / "config.json").write_text(json.dumps(config.to_dict(cfg), indent=2) + "\n")
        except OSError as e:  # a full disk: the checkpoint policy reports it, this is no reason to stop
            log.warning("config.json not written: %s", e.strerror or e)

    # Same initial weights everywhere (DDP would broadcast them anyway), then per-rank streams.
    rng.seed_all(cfg.seed)
    task = load_task(cfg.task)(cfg)
    task.model.to(env.device)
    rng.seed_all(cfg.seed + 1000 * env.rank)
    optimizer = build_optimizer(task.model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.optim, cfg.max_steps))
    scaler = torch.amp.GradScaler(env.device.type) if cfg.precision == "fp16" else None
    sampler = GlobalSampler(len(task.train_data), cfg.seed)
    state = TrainState(task.model, optimizer, scheduler, sampler, scaler)
    snapshots = Snapshots(state)  # one set of staging buffers for both tiers

    storage = open_storage(config.ckpt_dir(cfg))
    manager = CheckpointManager(storage, keep=cfg.ckpt.keep, files=CKPT_FILES)
    # One bucket prefix is one directory every node sees: written by rank 0 alone, as a shared one.
    nodes = replicas.layout(run_dir, env, remote=isinstance(storage, FsspecStorage))
    writes = nodes.writes
    tier = LocalTier(cfg.ckpt, run_dir, nodes.local_writes)
    resumed = resume(
        manager,
        state,
        env,
        fingerprint,
        reads=writes,
        local=tier.manager,
        shared=nodes.shared,
        run_dir=run_dir,
    )
    model = (
        DDP(task.model, device_ids=[env.device] if env.device.type == "cuda" else None)
        if env.backend
        else task.model
    )
    if cfg.compile:  # DDP first, then compile (DDP's graph breaks at its buckets); the state keeps task.model
        model = compiled(model, cfg)

    warm_up_buckets(task, model, state, plan, env)

    with ExitStack() as stack:
        # Always a background thread: with --ckpt.async false the loop waits for it right away,
        # but in short shared waits, so no other rank sits in a collective meanwhile.
        writer = CheckpointWriter(manager, background=True)
        # On the way out, wait for a save in flight, but never for one that is hung.
        stack.push(lambda kind, *_: writer.close(0 if kind is StorageError else cfg.ckpt.save_timeout_s))
        policy = SavePolicy(writer, manager, cfg.ckpt, env, writes or tier.writing, tier)
        metrics = Metrics(
            run_dir,
            env.is_main,
            state.step,
            cfg.max_steps,
            cfg.log_interval,
            plan.global_batch_size,
            tensorboard=cfg.log.tensorboard,
        )
        stack.callback(metrics.close)
        warm = warmstart.warm_ms() is not None
        metrics.event("start", restart=env.restart, world_size=env.world_size, warm=warm, step=state.step)
        if resumed is not None:
            metrics.event("resume", **resumed)
        policy.on_failure = lambda line: metrics.event("checkpoint_failed", step=state.step, error=line)
        batches = None
        if cfg.data.workers:  # from the resumed cursor on; the workers end with this block
            batches = Batches(
                task.train_data, state.sampler, plan, env.rank, env.device, cfg.data.workers, task.collate_fn
            )
            stack.callback(batches.close)
        stop = stack.enter_context(preempt.StopSignals())
        watchdog = stack.enter_context(Watchdog(cfg.watchdog, env.rank, cfg.run_dir))
        meta = {"world_size": env.world_size, "fingerprint": fingerprint, "config": config.to_dict(cfg)}

        def save(last: bool = False) -> None:
            """``last``: the final or preemption save, which every rank waits for."""
            blocking = last or not cfg.ckpt.async_save
            t0 = time.perf_counter()
            if last or policy.local_busy:
                policy.settle()  # the previous save first: one in flight at most
            writer.save(state.step, lambda: snapshots.take(env.device, writes), meta, precheck=check_space)
            if blocking:
                policy.settle(final=last)
            stall = time.perf_counter() - t0 if blocking else writer.stall_s
            metrics.event("checkpoint", step=state.step, stall_s=stall)

        def save_local() -> None:
            snapshot = lambda: snapshots.take(env.device, tier.writing)  # noqa: E731
            precheck = lambda: tier.before_save(state.nbytes())  # noqa: E731
            writer.save(state.step, snapshot, meta, precheck=precheck, manager=tier.manager)
            if not cfg.ckpt.async_save:
                policy.settle()
            if tier.writing:
                metrics.event("checkpoint", step=state.step, stall_s=writer.stall_s, tier="local")

        def check_space() -> None:
            policy.before_save(state.nbytes())

        log.info(
            "training steps %d..%d: %d ranks x %d micro-batch x %d accumulation = %d samples/step",
            state.step + 1,
            cfg.max_steps,
            env.world_size,
            plan.micro_batch_size,
            plan.accum_steps,
            plan.global_batch_size,
        )
        preempted, final = False, state.step >= cfg.max_steps
        while not final:
            t0 = time.perf_counter()
            local_loss, lr = train_step(
                task, model, state, plan, env, cfg.optim.grad_clip, writer.wait_staged, cfg.precision, batches
            )
            # One small all-reduce per step carries the logged loss and everything the ranks must
            # agree on at this boundary: a stop signal on any rank, and rank 0's saving state (a
            # save still running, hung, or failed for good). No extra collective, no rank acting alone.
            flags = torch.tensor([float(stop.requested), *policy.local_flags()], dtype=torch.float32)
            stats = torch.cat([local_loss.reshape(1).float(), flags.to(env.device)])
            if env.backend:
                dist.all_reduce(stats)
            loss = float(stats[0] / env.world_size)
            values = stats[1:].tolist()
            preempted = values[0] > 0
            save_busy = policy.act(values[1:])
            step_time = time.perf_counter() - t0
            if state.step == (resumed or {}).get("step", 0) + 1:
                distributed.set_timeout(cfg.dist.timeout_s)
            watchdog.progress(state.step, step_time)
            metrics.train_step(
                state.step, loss, lr, state.sampler.cursor, step_time, env.world_size, env.restart
            )
            faults.after_step(state.step)
            final = state.step >= cfg.max_steps
            due = bool(cfg.ckpt.interval) and state.step % cfg.ckpt.interval == 0
            with watchdog.paused():
                if final or preempted:
                    save(last=True)
                elif due and not save_busy:
                    save()
                elif due:
                    log.warning(
                        "skipping the checkpoint of step %d: the previous one is still being "
                        "written (slow storage?)",
                        state.step,
                    )
                    metrics.event("checkpoint_skipped", step=state.step, why="previous save still running")
                elif tier.due(state.step) and not (save_busy or policy.local_busy):
                    save_local()  # skipped while any save runs: the next interval comes soon
                if cfg.eval_interval and (state.step % cfg.eval_interval == 0 or final) and not preempted:
                    val = evaluate(task, cfg, plan, env)
                    if val is not None:
                        metrics.val(state.step, val)
            if preempted and not final:
                break
        if not final:
            log.warning(
                "preempted: saved step %d; exit %d asks the scheduler to requeue", state.step, EXIT_PREEMPTED
            )
            return EXIT_PREEMPTED
        if env.is_main and task.sample_fn is not None:
            log.info("sample:\n%s", task.sample_fn(task.model))
        tier.remove()  # the final checkpoint is durable
        log.info("done: %d steps, checkpoints in %s", state.step, manager.storage.location(""))
    return 0
