"""N1-N2: a node lost and a node joining, through the launcher with its default settings (make bench).

Two one-rank "nodes" on loopback, each `launch/ftjob.py --nnodes=1:2` (the launcher's rendezvous
settings, nothing tuned here) with its own run dir, default GPT, checkpoints every 50 steps (the
default) and a node-local one every 5.

N1  kill -9 of a whole node (launcher, torchrun, worker) at a random instant -> the first step the
    survivor completes at world size 1. etcd rendezvous: the first node is killed (under c10d it
    hosts the store, and its loss ends the job: a relaunch's matter); c10d: the other node.
N2  a new node (empty run dir) started after that -> the first step completed at world size 2.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from local_tier_bench import _free_port, _remove_local
from run import LOGS, REPO, WORK, _descendants, _signal, fresh, job_args, jsonl, trials

sys.path.insert(0, str(REPO / "tests"))
import etcd_local

FTJOB = REPO / "launch" / "ftjob.py"


def _node(name: str, run_dir: Path, backend: str, endpoint: str, rdzv_id: str) -> subprocess.Popen:
    args = job_args(run_dir, 100_000, ckpt__interval=50, ckpt__local_interval=5)
    cmd = [sys.executable, str(FTJOB), "--nnodes=1:2", "--nproc-per-node=1", f"--rdzv-backend={backend}",
           f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", "--", *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True, cwd=REPO)


def _first_step(dirs: list[Path], world: int, after: float, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [r["time"] for d in dirs for r in jsonl(d / "metrics.jsonl")
                 if r.get("kind") == "train" and r["world_size"] == world and r["time"] > after]  # fmt: skip
        if times:
            return min(times)
        time.sleep(0.1)
    raise RuntimeError(f"no step at world size {world} within {timeout:.0f} s")


def trial(i: int, backend: str) -> dict:
    name, rng = f"n_{backend}_{i}", random.Random(i)
    dirs = [fresh(WORK / f"{name}_node{n}" / "run") for n in range(3)]
    nodes: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        if backend == "etcd-v2":
            endpoint = stack.enter_context(etcd_local.server(WORK / f"{name}_etcd"))
        else:
            endpoint = f"127.0.0.1:{_free_port()}"
        try:
            for n in range(2):
                nodes.append(_node(f"{name}_node{n}", dirs[n], backend, endpoint, name))
                time.sleep(1.0)  # under c10d the first node hosts the store
            _first_step(dirs[:2], 2, 0, timeout=180)
            time.sleep(5 + rng.uniform(0, 3))  # past the first steps, at a random instant
            victim = 0 if backend == "etcd-v2" else 1
            _signal([nodes[victim].pid, *_descendants(nodes[victim].pid)], signal.SIGKILL)
            killed = time.time()
            lost = _first_step(dirs[:2], 1, killed) - killed
            joined = time.time()
            nodes.append(_node(f"{name}_node2", dirs[2], backend, endpoint, name))
            grown = _first_step(dirs, 2, joined) - joined
            return {"loss_s": lost, "rejoin_s": grown}
        finally:
            for p in nodes:
                _signal([p.pid, *_descendants(p.pid)], signal.SIGKILL)
                p.wait()
            for run_dir in dirs:  # the killed node's local checkpoints would stay in RAM until reboot
                _remove_local(run_dir)


def bench_n1_n2(count: int) -> dict:
    by_backend = [(b, lambda i, b=b: trial(i, b)) for b in ("etcd-v2", "c10d")]
    return trials(by_backend, count)  # alternated round by round: machine noise hits both alike
