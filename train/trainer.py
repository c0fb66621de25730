"""The training function, top to bottom: set-up, resume, then each step - the step itself, what the
ranks agree on, logging, the checkpoints due, evaluation."""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from train import config, rng
from train.checkpointing.checkpointer import Checkpointer
from train.checkpointing.sharded import ShardedCheckpointer
from train.errors import EXIT_PREEMPTED
from train.loader import Batches
from train.observe.metrics import Metrics
from train.parallel import fsdp
from train.runtime import dist as distributed
from train.runtime import faults, preempt, private, warmstart
from train.runtime.dist import DistEnv
from train.runtime.watchdog import Watchdog
from train.sampler import GlobalSampler, plan_batches
from train.state import TrainState
from train.step import (
    build_optimizer,
    compile_cache,
    evaluate,
    lr_schedule,
    train_step,
    warm_up_buckets,
    wrap,
)
from train.task import Task, load_task

log = logging.getLogger("train")


def build(cfg: config.Config, env: DistEnv) -> tuple[Task, TrainState]:
    """The task and everything a checkpoint holds, as a fresh run starts them."""
    # Same initial weights everywhere (DDP would broadcast them anyway), then per-rank streams.
    rng.seed_all(cfg.seed)
    task = load_task(cfg.task)(cfg)
    task.model.to(env.device)
    if fsdp.sharded(cfg):  # before the optimizer: it must hold the sharded parameters
        fsdp.shard(task.model, cfg, env)
    rng.seed_all(cfg.seed + 1000 * env.rank)
    optimizer = build_optimizer(task.model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.optim, cfg.max_steps))
    scaler = torch.amp.GradScaler(env.device.type) if cfg.precision == "fp16" else None
    sampler = GlobalSampler(len(task.train_data), cfg.seed)
    return task, TrainState(task.model, optimizer, scheduler, sampler, scaler)


def write_config(cfg: config.Config, run_dir: Path) -> None:
    try:
        private.write_replace(
            run_dir / "config.json", (json.dumps(config.to_dict(cfg), indent=2) + "\n").encode()
        )
    except OSError as e:  # a full disk: the checkpoint policy reports it, this is no reason to stop
        log.warning("config.json not written: %s", e.strerror or e)


def train(cfg: config.Config, env: DistEnv) -> int:
    """Train to ``--max-steps``; 0 when done, EXIT_PREEMPTED when a stop signal ended it (saved)."""
    run_dir = Path(cfg.run_dir)
    plan = plan_batches(cfg.global_batch_size, env.world_size, cfg.micro_batch_size)
    if env.is_main:
        write_config(cfg, run_dir)
    compile_cache(cfg)
    task, state = build(cfg, env)
    with ExitStack() as stack:
        metrics = stack.enter_context(
            Metrics(
                run_dir,
                env.is_main,
                cfg.max_steps,
                cfg.log_interval,
                plan.global_batch_size,
                tensorboard=cfg.log.tensorboard,
            )
        )
        checkpointer = stack.enter_context(
            ShardedCheckpointer(
                cfg, env, state, config.fingerprint(cfg), metrics.event, fsdp.mesh_shape(cfg, env)
            )
            if fsdp.sharded(cfg)
            else Checkpointer(cfg, env, state, config.fingerprint(cfg), metrics.event)
        )
        resumed = checkpointer.resume()
        warm = warmstart.warm_ms() is not None
        metrics.start(state.step, restart=env.restart, world_size=env.world_size, warm=warm)
        if resumed is not None:
            metrics.event("resume", **vars(resumed))
        model = wrap(task.model, cfg, env)
        warm_up_buckets(task, model, state, plan, env)
        batches = None
        if cfg.data.workers:  # from the resumed cursor on; the workers end with this block
            batches = stack.enter_context(
                Batches(
                    task.train_data,
                    state.sampler,
                    plan,
                    env.rank,
                    env.device,
                    cfg.data.workers,
                    task.collate_fn,
                )
            )
        stop = stack.enter_context(preempt.StopSignals())
        watchdog = stack.enter_context(Watchdog(cfg.watchdog, env.rank, cfg.run_dir))
        first_step = state.step + 1
        log.info(
            "training steps %d..%d: %d ranks x %d micro-batch x %d accumulation = %d samples/step",
            first_step,
            cfg.max_steps,
            env.world_size,
            plan.micro_batch_size,
            plan.accum_steps,
            plan.global_batch_size,
        )

        while state.step < cfg.max_steps:
            t0 = time.perf_counter()
            local_loss, lr = train_step(task, model, state, plan, env, cfg, batches)
            # The step's one all-reduce: the loss, a stop signal on any rank, the savers' state.
            loss, agreed = checkpointer.agree(local_loss, stop.requested)
            step_time = time.perf_counter() - t0
            if state.step == first_step:  # set-up is over: a dead peer should now fail fast
                distributed.set_timeout(cfg.dist.timeout_s)
            watchdog.progress(state.step, step_time)
            metrics.train_step(
                state.step, loss, lr, state.sampler.cursor, step_time, env.world_size, env.restart
            )
            faults.after_step(state.step, agreed.busy)
            final = state.step >= cfg.max_steps
            with watchdog.paused():  # saves and evaluation are no steps
                if checkpointer.after_step(state.step, agreed, final):
                    log.warning(
                        "preempted: saved step %d; exit %d asks the scheduler to requeue",
                        state.step,
                        EXIT_PREEMPTED,
                    )
                    return EXIT_PREEMPTED
                if cfg.eval_interval and (state.step % cfg.eval_interval == 0 or final):
                    val = evaluate(task, cfg, plan, env)
                    if val is not None:
                        metrics.val(state.step, val)

        if task.sample_fn is not None and (env.is_main or fsdp.sharded(cfg)):
            text = task.sample_fn(task.model)  # sharded: every rank's forward gathers the weights
            if env.is_main:
                log.info("sample:\n%s", text)
        log.info("done: %d steps, checkpoints in %s", state.step, config.ckpt_dir(cfg))
    return 0
