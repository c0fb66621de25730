"""The baseline for P4: the naive fault-tolerance pattern most DDP scripts start from.

Plain ``init_process_group("gloo")``; every ``--ckpt-interval`` steps rank 0 ``torch.save``s
model + optimizer to one file (overwritten in place); at start every rank resumes from that file if
it exists. Same model, data, batch and step as bare_ddp.py. Rank 0 appends one JSON line per
completed step to ``--step-log`` (step, time, restart). With ``--crash-step K`` the rank
``--crash-rank`` SIGKILLs itself right after logging step K, on the first attempt only
(TORCHELASTIC_RESTART_COUNT == 0), like FTJOB_FAULT=crash:step=K:rank=R does for the job.

Run under ``torchrun --standalone --nproc_per_node=2 --max-restarts=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from bare_ddp import add_model_args, batch_for, build, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--ckpt", required=True, help="the one checkpoint file")
    p.add_argument("--ckpt-interval", type=int, default=5)
    p.add_argument("--step-log", required=True)
    p.add_argument("--crash-step", type=int, default=0)
    p.add_argument("--crash-rank", type=int, default=1)
    args = p.parse_args()

    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, data = build(args)
    step = 0
    if os.path.exists(args.ckpt):
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optim"])
        step = int(ckpt["step"])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    log = open(args.step_log, "a") if rank == 0 else None  # noqa: SIM115
    while step < args.max_steps:
        batch = batch_for(step + 1, data, perm, args.global_batch_size, rank, world)
        train_step(ddp, model, optimizer, batch)
        step += 1
        if log is not None:
            log.write(json.dumps({"step": step, "time": time.time(), "restart": restart}) + "\n")
            log.flush()
        if step == args.crash_step and rank == args.crash_rank and restart == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if step % args.ckpt_interval == 0 and rank == 0:
            state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
            torch.save(state, args.ckpt)
    if log is not None:
        log.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
