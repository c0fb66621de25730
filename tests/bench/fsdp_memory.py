"""F1-F2 (make bench): one sharded save as each rank's step loop and memory see it.

    torchrun --nproc_per_node=2 tests/bench/fsdp_memory.py RUN_DIR

The job's own pieces - the GPT sharded by FSDP2 (8 x 512, fsdp over 2 ranks), its AdamW state after
a step, the ShardedCheckpointer - driven directly, so nothing else (the next step's temporaries,
the data) moves the numbers:
F1  the step loop's stall of an async save: the save call plus the wait for its copy in the
    optimizer's step hook after the next forward/backward, saves 2-6 (the first allocates the
    staging buffers), against a memcpy of the rank's shard bytes (best of 3);
F2  a rank's peak RSS growth during its first save, staging buffers allocated, written, read
    back and committed (VmHWM, reset right before), / its shard bytes.
Prints one JSON line per rank.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from memory_bench import _reset_peak, _status, emit  # noqa: E402

from train import config, trainer  # noqa: E402
from train.checkpointing import shards  # noqa: E402
from train.checkpointing.boundary import Agreement  # noqa: E402
from train.checkpointing.sharded import ShardedCheckpointer  # noqa: E402
from train.parallel import fsdp  # noqa: E402
from train.runtime import dist as distributed  # noqa: E402


def memcpy_s(nbytes: int) -> float:
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def main(run_dir: Path) -> None:
    env = distributed.setup("gloo", 120)
    big = ["--model.n-layer", "8", "--model.n-embd", "512", "--model.n-head", "8", "--data.seq-len", "32"]
    cache = str(REPO / "runs" / "bench" / "cache")
    cfg = config.parse(
        ["--run-dir", str(run_dir), "--parallel.mode", "fsdp", *big, "--data.cache-dir", cache]
    )
    task, state = trainer.build(cfg, env)
    idx = torch.randint(0, 256, (2, 32))
    task.model(idx).float().sum().backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    checkpointer = ShardedCheckpointer(
        cfg, env, state, config.fingerprint(cfg), lambda *a, **k: None, fsdp.mesh_shape(cfg, env)
    )
    tensors, _ = shards.split(state)
    mine = [shards.local(t) for t in tensors.values() if shards.is_split(t) or env.rank == 0]
    shard_bytes = sum(t.numel() * t.element_size() for t in mine)
    base = _reset_peak()
    checkpointer._save(1, Agreement(), last=True)  # written and committed when this returns
    growth = _status("VmHWM") - base
    stalls = []
    for step in range(2, 7):
        t0 = time.perf_counter()
        checkpointer._save(step, Agreement())
        call = time.perf_counter() - t0
        task.model(idx).float().sum().backward()  # the next step's forward/backward, as in training
        t1 = time.perf_counter()
        checkpointer._wait_staged()  # what the next optimizer step waits for, if the copy is not done
        stalls.append(call + time.perf_counter() - t1)
        state.optimizer.zero_grad(set_to_none=True)
        checkpointer._settle()
    emit(
        {
            "rank": env.rank,
            "shard_bytes": shard_bytes,
            "growth": growth,
            "stalls": stalls,
            "memcpy_s": memcpy_s(shard_bytes),
        }
    )
    distributed.teardown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
