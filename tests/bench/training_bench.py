"""W1-W2: how the job trains (make bench).

W1  steps/s with 2 DataLoader workers / without, one rank, a task whose samples cost CPU time to
    prepare (tests/tasks/costly_items.py, ~7 ms of Python per sample, 8 per step): the workers
    prepare the next batches while the rank computes (target >= 1.5x on 2 cores).
W2  steps/s with --precision bf16 / fp32, the default GPT on 2 ranks, CPU (reported; no target:
    CPUs without native bf16 emulate it).
"""

from __future__ import annotations

import statistics
import sys

from run import MAIN, TORCHRUN, WORK, failure_reason, fresh, job_args, job_step_times, launch, steps_per_s

ONE_RANK = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


def _rate(name: str, torchrun: list, steps: int, **opts: object) -> float:
    run_dir = fresh(WORK / name)
    rc, timed_out = launch([*torchrun, MAIN, *job_args(run_dir, steps, **opts)], name, 600)
    if rc != 0 or timed_out:
        raise RuntimeError(f"{name}: exit {rc}{' (timeout)' if timed_out else ''}: {failure_reason(name)}")
    return steps_per_s(job_step_times(run_dir))


def bench_w1_w2(reps: int, steps: int) -> dict:
    costly = {"task": "tests.tasks.costly_items:build", "global_batch_size": 8}
    out: dict[str, list[float]] = {"main": [], "workers": [], "fp32": [], "bf16": []}
    for i in range(reps):  # alternated, so load drifts hit both sides alike
        out["main"].append(_rate(f"w1_main_{i}", ONE_RANK, steps, **costly))
        out["workers"].append(_rate(f"w1_workers_{i}", ONE_RANK, steps, data__workers=2, **costly))
        out["fp32"].append(_rate(f"w2_fp32_{i}", TORCHRUN, steps, precision="fp32"))
        out["bf16"].append(_rate(f"w2_bf16_{i}", TORCHRUN, steps, precision="bf16"))
    return {k: {"runs": v, "median": statistics.median(v)} for k, v in out.items()}
