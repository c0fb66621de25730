"""Resume and save at a cluster's shape (make bench: X1-X5).

    python tests/bench/scale_bench.py [--quick]     prints the measurements as JSON lines

Two "nodes" on this machine: two torchrun agents rendezvousing over loopback (c10d), each in a home
directory of its own with the same relative ``--run-dir run`` (the same path is another disk on
each node, as on machines without a shared filesystem), R ranks each. A small GPT trains to a
checkpoint, then the job starts again and resumes; its "resume" row in metrics.jsonl tells, per
rank, the bytes pulled from checkpoint storage or from the other node and the host memory at the
peak beyond what the rank holds once resumed (the job measures both itself: bytes through its
checkpoint reader, VmHWM against VmRSS). Global ranks are numbered node after node (torchrun), so
node n holds ranks n*R .. n*R+R-1.

  X1  bytes pulled per node at resume / checkpoint bytes: every node with its own copy; node 1
      with none (it receives node 0's); both from a bucket (a real S3 server on loopback)
  X2  a node's peak host memory at resume beyond what its ranks hold once resumed / state bytes,
      R = 1, 2, 4
  X3  resume time, R = 4 / R = 1
  X4  rank 0's reads 3 s slower per file under --dist.init-timeout-s 5: resumed? in how long
  X5  a new process's first save, writer time / its second save's (keep 3, three older checkpoints
      on disk: nothing verified is read again)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "train" / "main.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MODEL = {"model.n-layer": 4, "model.n-embd": 256, "model.n-head": 4}  # ~38 MB of weights + AdamW
STEP = 4  # the checkpoint resumed from
CACHE = REPO / "runs" / "bench" / "cache"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(steps: int, extra: dict[str, object]) -> list[str]:
    opts: dict[str, object] = {
        "run-dir": "run",
        "data.cache-dir": CACHE,  # the default corpus, prepared once
        "data.seq-len": 64,
        **MODEL,
        "global-batch-size": 8,
        "eval-interval": 0,
        "log-interval": 1,
        "max-steps": steps,
        "ckpt.interval": STEP,
        **extra,
    }
    return [item for k, v in opts.items() for item in (f"--{k}", str(v))]


def run_nodes(
    work: Path, ranks: int, steps: int, fault: str = "", aws: dict[str, str] | None = None, **extra: object
) -> float:
    """Both nodes, to ``steps``; returns the wall time. Raises if either agent fails."""
    port = _port()
    env = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **({"FTJOB_FAULT": fault} if fault else {}))
    env.update(aws or {})
    agents = []
    started = time.monotonic()
    for node in range(2):
        home = work / f"node{node}"
        home.mkdir(parents=True, exist_ok=True)
        cmd = [
            *TORCHRUN,
            "--nnodes=2",
            f"--nproc_per_node={ranks}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id=scale-{port}",
            "--monitor-interval=0.2",
            "--max-restarts=0",
            str(MAIN),
            *_args(steps, extra),
        ]
        with open(home / f"agent-{steps}.log", "w") as out:
            agents.append(subprocess.Popen(cmd, env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT))
    codes = [a.wait(timeout=600) for a in agents]
    if any(codes):
        tail = (work / "node0" / f"agent-{steps}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"agents exited {codes}:\n{tail}")
    return time.monotonic() - started


def resume_row(work: Path) -> dict:
    for node in range(2):
        path = work / f"node{node}" / "run" / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if '"resume"' in line]
            if rows:
                return rows[-1]
    raise RuntimeError("no resume row on either node")


def ckpt_bytes(work: Path) -> int:
    where = work / "node0" / "run" / "checkpoints" / f"step_{STEP:08d}"
    return sum(f.stat().st_size for f in where.iterdir() if f.name != "manifest.json")


def bucket_trial(work: Path, ranks: int) -> dict:
    """X1 from a bucket: --ckpt.dir on a real S3 server on loopback (tests/s3_local.py), which both
    nodes see: rank 0 writes, and each node's leader reads the bucket's copy at resume."""
    sys.path.insert(0, str(REPO / "tests"))
    import s3_local
    import s3fs

    shutil.rmtree(work, ignore_errors=True)
    with s3_local.server(work / "s3") as server:
        server.make_bucket("scale")
        aws = server.env()
        url = "s3://scale/run"
        run_nodes(work, ranks, STEP, aws=aws, **{"ckpt.dir": url})
        wall = run_nodes(work, ranks, STEP + 1, aws=aws, **{"ckpt.dir": url})
        fs = s3fs.S3FileSystem(key=aws["AWS_ACCESS_KEY_ID"], secret=aws["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=aws["AWS_ENDPOINT_URL"], skip_instance_cache=True,
                               client_kwargs={"region_name": "us-east-1"})  # fmt: skip
        files = fs.ls(f"scale/run/step_{STEP:08d}", detail=True)
        size = sum(f["size"] for f in files if not f["name"].endswith("manifest.json"))
    return summary(resume_row(work), ranks, "bucket", size, wall)


def drop_cache(work: Path) -> None:
    """Evict the checkpoints' pages, so the resume's reads come from the disk (as after a reboot)."""
    from ckpt_bench import drop_cache as evict

    evict(list(work.rglob("*.safetensors")))


def summary(row: dict, ranks: int, case: str, size: int, wall: float) -> dict:
    """A trial's figures from the resume row, per node."""
    return {
        "ranks": ranks,
        "case": case,
        "ckpt_bytes": size,
        "pulled_per_node": per_node(row["pulled_bytes"], ranks),
        "disk_per_node": per_node(row["disk_read_bytes"], ranks),
        "reread_per_node": per_node(row["reread_bytes"], ranks),
        "excess_per_node": per_node(row["peak_excess_bytes"], ranks),
        "resume_s": row["seconds"],
        "cpu_s_per_rank": statistics.mean(row["cpu_seconds"]),
        "read_by": row["read_by"],
        "received_by": row["received_by"],
        "wall_s": wall,
    }


def per_node(values: list[int], ranks: int) -> list[int]:
    return [sum(values[n * ranks : (n + 1) * ranks]) for n in range(len(values) // ranks)]


def trial(work: Path, ranks: int, case: str) -> dict:
    """One train-then-resume; ``case``: local (both nodes hold the checkpoint), other (node 1's
    copy deleted first), slow (rank 0's reads 3 s slower a file, init timeout 5 s)."""
    shutil.rmtree(work, ignore_errors=True)
    run_nodes(work, ranks, STEP)
    size = ckpt_bytes(work)
    if case == "other":
        shutil.rmtree(work / "node1" / "run" / "checkpoints")
    drop_cache(work)
    fault, extra = ("slow_read:ms=3000:rank=0", {"dist.init-timeout-s": 5}) if case == "slow" else ("", {})
    wall = run_nodes(work, ranks, STEP + 1, fault, **extra)
    return summary(resume_row(work), ranks, case, size, wall)


def first_save(work: Path, mb: int, marks: bool = True) -> dict:
    """X5: in a fresh process, the first save's time over the second's (three kept checkpoints);
    ``marks=False``: the verified marks removed first, as before there were any (reference)."""
    code = f"""
import json, shutil, sys, time
sys.path.insert(0, {str(REPO / "tests" / "bench")!r}); sys.path.insert(0, {str(REPO)!r})
import torch
from memory_bench import build_state, manager
from train.checkpointing.snapshot import Snapshots
from pathlib import Path
root, first = Path({str(work)!r}), int(sys.argv[1])
state = build_state({mb}, 0)
snap, m = Snapshots(state), manager(root)
m.keep = 3
# A save elsewhere first: the process's own first-time costs (allocator, page faults) are not
# what is measured, only what the first save in this root reads beyond what any save does. Then
# deleted: a later save writes into the page-cache memory its retention freed a moment before
# (the oldest checkpoint's); in this VM memory not touched for a while costs ~10x more to fill
# (measured: 1.8 s against 0.2 s for 200 MB), so the first save gets the same start.
warm = snap.take(torch.device("cpu"), True)()
manager(root.parent / "warmup").save(first, warm, {{"fingerprint": "bench"}})
shutil.rmtree(root.parent / "warmup")
times = []
for step in range(first, first + (3 if first == 1 else 2)):
    files = snap.take(torch.device("cpu"), True)()
    t0 = time.perf_counter()
    m.save(step, files, {{"fingerprint": "bench"}})
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(work.parent / "warmup", ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def timed(first: int) -> list[float]:
        out = subprocess.run(
            [sys.executable, "-c", code, str(first)], capture_output=True, text=True, env=env
        )
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    timed(1)  # an earlier attempt: steps 1-3 kept
    if not marks:
        (work / "checkpoints" / ".verified.json").unlink()
    first_s, later_s = timed(4)  # the restarted process: its first save (4), then 5
    state = sum(f.stat().st_size for f in (work / "checkpoints" / "step_00000005").iterdir())
    return {"first_s": first_s, "later_s": later_s, "ratio": first_s / later_s, "state_bytes": state}


def measure(work: Path, quick: bool = False) -> dict:
    sys.path.insert(0, str(REPO))
    out: dict = {"trials": []}
    for ranks in (1, 2, 4):
        out["trials"].append(trial(work / f"local{ranks}", ranks, "local"))
    out["trials"].append(trial(work / "other4", 4, "other"))
    out["trials"].append(trial(work / "slow4", 4, "slow"))
    try:
        out["trials"].append(bucket_trial(work / "bucket4", 4))
    except (ImportError, FileNotFoundError) as e:  # no S3 server here: the row says so
        out["bucket_error"] = str(e)
    rounds = [first_save(work / "firstsave", 50 if quick else 200) for _ in range(1 if quick else 3)]
    out["first_save"] = {
        **rounds[0],
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
    }
    out["first_save_unmarked"] = first_save(work / "firstsave", 50 if quick else 200, marks=False)
    shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    result = measure(REPO / "runs" / "bench" / "work" / "scale", quick="--quick" in sys.argv)
    for t in result["trials"]:
        print(json.dumps(t))
    print(json.dumps(result["first_save"]))
    print(json.dumps(result["first_save_unmarked"]))
