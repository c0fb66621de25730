"""F1-F4: sharded training (--parallel.mode fsdp) and its checkpoints, from real torchrun jobs (make bench).

F1, F2  one sharded save as a rank's step loop and memory see it (fsdp_memory.py, the job's own
    pieces driven directly): the stall / a memcpy of the rank's shard; peak RSS growth / its shard;
F3  a resume that reshards (a real fsdp job's checkpoint of 2 ranks read by a 1-rank job: each
    shard file's rows by byte range, verified by block, restored) / a plain read of the same
    files from the page cache (both warm, best of 3 each);
F4  steps/s fsdp / ddp, the default GPT on 2 ranks (reported).
The model of F1-F3: GPT 8 x 512 (25 M parameters, ~300 MB of weights and AdamW moments), 2 ranks.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from run import (
    BENCH,
    LOGS,
    MAIN,
    TORCHRUN,
    WORK,
    failure_reason,
    fresh,
    job_args,
    job_step_times,
    jsonl,
    launch,
    steps_per_s,
)

BIG = {"model__n_layer": 8, "model__n_embd": 512, "model__n_head": 8, "data__seq_len": 32}
BIG_BATCH = 2


def _plain_read_s(files: list[Path]) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                buf = bytearray(f.stat().st_size)
                fh.readinto(buf)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_f1_f2() -> dict:
    """The harness (fsdp_memory.py): each rank's JSON line."""
    run_dir = fresh(WORK / "f_memory")
    rc, timed_out = launch([*TORCHRUN, BENCH / "fsdp_memory.py", run_dir], "f_memory", 600)
    if rc or timed_out:
        raise RuntimeError(f"f_memory: exit {rc}: {failure_reason('f_memory')}")
    lines = (LOGS / "f_memory.log").read_text().splitlines()
    return {"ranks": [json.loads(line) for line in lines if line.startswith("{")]}


def bench_f3(steps: int) -> dict:
    """A fsdp job of 2 ranks, then its last checkpoint resumed by 1 rank."""
    run_dir = fresh(WORK / "f_big")
    opts = {**BIG, "parallel__mode": "fsdp", "global_batch_size": BIG_BATCH, "ckpt__interval": steps}
    rc, timed_out = launch([*TORCHRUN, MAIN, *job_args(run_dir, steps, **opts)], "f_big", 900)
    if rc or timed_out:
        raise RuntimeError(f"f_big: exit {rc}: {failure_reason('f_big')}")
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    one = [*TORCHRUN[:-1], "--nproc_per_node=1"]
    times, pulled = [], None
    for i in range(3):  # best of 3, as the plain read it is compared with
        resume_dir = fresh(WORK / "f_resume")
        args = job_args(resume_dir, steps, **{**opts, "ckpt__dir": str(run_dir / "checkpoints")})
        rc, timed_out = launch([*one, MAIN, *args], f"f_resume{i}", 600)
        if rc or timed_out:
            raise RuntimeError(f"f_resume{i}: exit {rc}: {failure_reason(f'f_resume{i}')}")
        resumed = next(r for r in jsonl(resume_dir / "metrics.jsonl") if r.get("kind") == "resume")
        times.append(resumed["seconds"])
        pulled = resumed.get("pulled_bytes")
    shards = sorted(ckpt.glob("shard-*.safetensors"))
    return {
        "resume_s": min(times),
        "resume_runs": times,
        "pulled": pulled,
        "plain_read_s": _plain_read_s(shards),
        "shard_file_bytes": sum(f.stat().st_size for f in shards),
    }


def bench_f4(reps: int, steps: int) -> dict:
    out: dict[str, list[float]] = {"fsdp": [], "ddp": []}
    for i in range(reps):  # alternated, so load drifts hit both sides alike
        for mode in ("ddp", "fsdp"):
            run_dir = fresh(WORK / f"f4_{mode}_{i}")
            rc, timed_out = launch(
                [*TORCHRUN, MAIN, *job_args(run_dir, steps, parallel__mode=mode)], f"f4_{mode}_{i}", 600
            )
            if rc or timed_out:
                raise RuntimeError(f"f4_{mode}_{i}: exit {rc}: {failure_reason(f'f4_{mode}_{i}')}")
            out[mode].append(steps_per_s(job_step_times(run_dir)))
    return {k: {"runs": v, "median": statistics.median(v)} for k, v in out.items()}


def bench_f5(trials: int, work: Path) -> list[dict]:
    """F5: the node holding global rank 0 of a 2-node x 2-rank fsdp run SIGKILLed (tests/fsdp/
    test_fsdp_nodes.py's scenario): steps lost = the last step it logged - the survivor's resume."""
    import sys
    import sysconfig

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here.parent / "fsdp")]
    from test_fsdp_nodes import LOCAL_INTERVAL, lose_rank_0s_node

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = work / "corpus.txt"  # the tests' tiny corpus (their tiny model too)
    work.mkdir(parents=True, exist_ok=True)
    texts = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
    corpus.write_bytes(b"\n".join(p.read_bytes() for p in texts))
    out = []
    for i in range(trials):
        try:
            seen = lose_rank_0s_node(work / f"trial{i}", corpus)
            local = seen["resume"]["path"].startswith(str(seen["local"]))
            out.append({"lost": seen["killed_at"] - seen["resume"]["step"], "local": local,
                        "k": LOCAL_INTERVAL})  # fmt: skip
        except Exception as e:  # a trial that fails is reported, not hidden
            out.append({"error": f"{type(e).__name__}: {str(e)[:300]}"})
    return out
