"""S1-S3: the durable tier on S3 against local disk, same state, same process (make bench).

A real S3-compatible server on loopback (tests/s3_local.py: SeaweedFS, auth on) shares the 2 cores
with the client, so throughput here is a floor, not what a cloud bucket gives.

S1  save throughput: CheckpointManager.save (upload + streamed read-back verification) to s3:// vs
    to a local directory, MB/s of checkpoint bytes, median of the rounds.
S2  load throughput: CheckpointManager.load_latest (download, checksums, decode) + TrainState.restore.
S3  the step loop's stall of an async save to S3 (CheckpointWriter, as the trainer calls it) vs a
    memcpy of the state: the network time must stay in the background thread.
S4  peak RSS growth of a save to S3 (staging buffers already there, as from the second save on) and
    of a resume from S3, / the state's tensor bytes: fresh processes, VmHWM (memory_bench.py).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from ckpt_bench import build_state, save_stall, state_tensors, timed

from train.checkpointing.snapshot import Snapshots, restore
from train.ckpt.manager import CheckpointManager, decode
from train.ckpt.objstore import FsspecStorage
from train.ckpt.storage import LocalStorage
from train.ckpt.writer import CheckpointWriter
from train.lm import lm_loss
from train.state import CKPT_FILES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import s3_local

CPU = torch.device("cpu")


def fresh_process_rss(mb: int, url: str) -> dict:
    """S4 in fresh processes (memory_bench.py): the peak RSS growth of a save (the second: staging
    buffers exist) and of a resume from the bucket, VmHWM-based, as M1/M2 measure it locally."""
    script = Path(__file__).with_name("memory_bench.py")
    rows = {}
    for what in ("s3save", "s3load"):
        done = subprocess.run([sys.executable, str(script), what, str(mb), url], capture_output=True,
                              text=True, timeout=600, env=os.environ.copy())  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{what}: {done.stderr[-500:]}")
        rows[what] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")][-1]
    return rows


def _memcpy(tensors: list) -> float:
    buffers = [t.clone() for t in tensors]
    best = float("inf")
    for _ in range(3):
        best = min(best, timed(lambda: [b.copy_(t) for b, t in zip(buffers, tensors, strict=True)]))
    return best


def bench_s3(mb: int, rounds: int, work: Path) -> dict:
    _, state = build_state(mb)
    snapshots = Snapshots(state)  # staging buffers reused from save to save, as in a job
    nbytes = state.nbytes()
    tokens = torch.randint(0, 256, (1, 65), generator=torch.Generator().manual_seed(0))

    def compute() -> None:  # the next step's forward/backward, which the deferred copy overlaps
        lm_loss(state.model, (tokens[:, :-1], tokens[:, 1:])).backward()
        state.model.zero_grad(set_to_none=True)

    out: dict = {"state_mb": nbytes / 1e6, "rounds": rounds}
    with s3_local.server(work / "s3") as server:
        server.make_bucket("bench")
        os.environ.update(server.env())
        tiers = {
            "local": CheckpointManager(LocalStorage(work / "local"), keep=2, files=CKPT_FILES),
            "s3": CheckpointManager(FsspecStorage("s3://bench/run"), keep=2, files=CKPT_FILES),
        }
        for tier, manager in tiers.items():
            saves, loads, stalls = [], [], []
            for r in range(rounds + 1):  # the first: a warm-up
                step = 10 * (r + 1)
                files = snapshots.take(CPU, True)()  # type: ignore[misc]
                t0 = time.perf_counter()
                manager.save(step, files, {})
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                loaded = manager.load_latest()
                restore(state, decode(loaded.blobs), 0, 1)
                loads.append(time.perf_counter() - t0)
                del loaded
                writer = CheckpointWriter(manager, background=True)
                stall, _ = save_stall(writer, step + 5, lambda: snapshots.take(CPU, True), {}, compute)
                writer.close(600)
                stalls.append(stall)
            out[tier] = {"save_s": saves[1:], "load_s": loads[1:], "stall_s": stalls[1:]}
        out["memcpy_s"] = _memcpy(state_tensors(state))
        out["rss"] = fresh_process_rss(mb, "s3://bench/rss")
        out["state_bytes"] = nbytes
        out["ckpt_mb"] = sum(i.size for i in tiers["local"].list()[:1]) / 1e6
    for tier in ("local", "s3"):
        t = out[tier]
        t["save_mb_s"] = out["ckpt_mb"] / statistics.median(t["save_s"])
        t["load_mb_s"] = out["ckpt_mb"] / statistics.median(t["load_s"])
        t["stall_median_s"] = statistics.median(t["stall_s"])
    return out
