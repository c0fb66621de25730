"""P1 and P2 on one device, for the GPU check (tests/gpu/check.sh); runs on CPU too (for testing).

    python tests/gpu/p1p2.py --device cuda --mb 50 500

P1: time the step loop is blocked by one async save (save() + the next forward/backward's wait
before optimizer.step) / time of copying the whole state into preallocated pinned host buffers.
P2: steps/s of the job with a checkpoint every 50 steps / without, from metrics.jsonl, one GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "bench")]

import torch  # noqa: E402
from ckpt_bench import model_config  # noqa: E402

from train import config  # noqa: E402
from train.checkpointing.snapshot import Snapshots  # noqa: E402
from train.ckpt.manager import CheckpointManager  # noqa: E402
from train.ckpt.storage import LocalStorage  # noqa: E402
from train.ckpt.writer import CheckpointWriter  # noqa: E402
from train.lm import lm_loss  # noqa: E402
from train.lm.model import GPT  # noqa: E402
from train.sampler import GlobalSampler  # noqa: E402
from train.state import TrainState  # noqa: E402
from train.step import build_optimizer, lr_schedule  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def p1(mb: float, device: torch.device, rounds: int) -> dict:
    cfg = config.Config()
    cfg.model = model_config(mb, cfg.data.seq_len)
    model = GPT(cfg.model, cfg.data.seq_len).to(device)
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg.optim, 100))
    state = TrainState(model, opt, sched, GlobalSampler(1000, 0))
    snapshots = Snapshots(state)
    x = torch.randint(0, 256, (4, 129), device=device)

    def fwd_bwd() -> None:
        lm_loss(model, (x[:, :-1], x[:, 1:])).backward()

    fwd_bwd()
    opt.step()
    tensors = list(model.state_dict().values()) + [
        t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    ]
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=device.type == "cuda") for t in tensors]

    def memcpy() -> float:
        sync(device)
        t0 = time.perf_counter()
        for b, t in zip(pinned, tensors, strict=True):
            b.copy_(t, non_blocking=True)
        sync(device)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as d:
        writer = CheckpointWriter(CheckpointManager(LocalStorage(d), keep=1), background=True)
        stalls, copies = [], []
        for step in range(rounds + 1):
            copies.append(min(memcpy() for _ in range(3)))
            sync(device)
            t0 = time.perf_counter()
            writer.save(step, lambda: snapshots.take(device, True), {})
            blocked = time.perf_counter() - t0
            fwd_bwd()  # what the deferred copy overlaps with
            t1 = time.perf_counter()
            writer.wait_staged()
            stalls.append(blocked + time.perf_counter() - t1)
            opt.zero_grad(set_to_none=True)
            writer.wait()
    stall, copy = statistics.median(stalls[1:]), statistics.median(copies[1:])
    return {"mb": mb, "stall_ms": stall * 1e3, "memcpy_ms": copy * 1e3, "ratio": stall / copy}


def steps_per_s(run_dir: Path, interval: int, steps: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(REPO / "train/main.py"),
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(steps),
        "--ckpt.interval",
        str(interval),
        "--eval-interval",
        "0",
        "--sample-bytes",
        "0",
        "--model.n-layer",
        "5",
        "--model.n-embd",
        "256",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if r["kind"] == "train"][10:]
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mb", type=float, nargs="+", default=[50, 500])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--p2-steps", type=int, default=160)
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}")
    for mb in args.mb:
        r = p1(mb, device, args.rounds)
        print(
            f"P1 {r['mb']:.0f} MB: stall {r['stall_ms']:.2f} ms / memcpy {r['memcpy_ms']:.2f} ms "
            f"= {r['ratio']:.3f} (target <= 1.0)"
        )
    with tempfile.TemporaryDirectory() as d:
        with_ckpt = steps_per_s(Path(d) / "a", 50, args.p2_steps)
        without = steps_per_s(Path(d) / "b", 0, args.p2_steps)
    print(f"P2: {with_ckpt:.2f} / {without:.2f} steps/s = {with_ckpt / without:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
