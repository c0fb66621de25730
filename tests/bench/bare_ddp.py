"""The baseline for T1: the smallest DDP training loop that does the job's math, and nothing else.

Same GPT (train.model), same TokenWindows data (train.data.prepare), same global batch, same AdamW
settings and gradient clipping as ``train/main.py`` with its defaults; plain
``init_process_group("gloo")``; no checkpoints, no metrics file, no loss all-reduce, no watchdog.
Rank 0 keeps the wall-clock time at which each step finished and writes them, after the loop, to
``--times-out`` (JSON), so the harness measures steps/s exactly as it does for the job.

Run under torchrun: ``torchrun --standalone --nproc_per_node=2 tests/bench/bare_ddp.py --steps 60``.
Also imported by seed_train.py for the model/data/step it shares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from train.config import Config, ModelConfig  # noqa: E402
from train.lm.data import TokenWindows, prepare  # noqa: E402
from train.lm.model import GPT  # noqa: E402


def add_model_args(p: argparse.ArgumentParser) -> None:
    d = Config()
    p.add_argument("--cache-dir", default=d.data.cache_dir)
    p.add_argument("--seq-len", type=int, default=d.data.seq_len)
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size)
    p.add_argument("--n-layer", type=int, default=d.model.n_layer)
    p.add_argument("--n-head", type=int, default=d.model.n_head)
    p.add_argument("--n-embd", type=int, default=d.model.n_embd)
    p.add_argument("--seed", type=int, default=d.seed)


def build(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, TokenWindows]:
    """Model, optimizer and data with the job's default hyper-parameters."""
    d = Config()
    torch.manual_seed(args.seed)
    model = GPT(ModelConfig(args.n_layer, args.n_head, args.n_embd, d.model.dropout), args.seq_len)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": d.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=d.optim.lr,
        betas=(d.optim.beta1, d.optim.beta2),
        foreach=True,
    )
    train_bin, _ = prepare(d.data.path, args.cache_dir, d.data.val_every)
    return model, optimizer, TokenWindows(train_bin, args.seq_len)


def batch_for(
    step: int, data: TokenWindows, perm: torch.Tensor, gbs: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of global batch ``step`` (1-based) in a fixed permutation."""
    per_rank = gbs // world
    start = ((step - 1) * gbs + rank * per_rank) % (len(perm) - per_rank)
    xs, ys = zip(*(data[int(i)] for i in perm[start : start + per_rank]), strict=True)
    return torch.stack(xs), torch.stack(ys)


def train_step(
    ddp: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]
) -> None:
    x, y = batch
    logits = ddp(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), Config().optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--times-out", default=None)
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, data = build(args)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    times = []
    for step in range(1, args.steps + 1):
        train_step(ddp, model, optimizer, batch_for(step, data, perm, args.global_batch_size, rank, world))
        times.append(time.time())
    if rank == 0 and args.times_out:
        tmp = f"{args.times_out}.{os.getpid()}.tmp"
        Path(tmp).write_text(json.dumps({"times": times}))
        os.replace(tmp, args.times_out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
