"""L1-L3: the node-local tier (--ckpt.local-interval K) on the default model, 2 ranks (make bench).

L1  steps/s with a local checkpoint every K steps (and the durable default every 50) / steps/s
    without any checkpoint, runs alternated
L2  steps lost to a SIGKILL of a random rank at a random instant (last step logged before the
    kill - step resumed from), every trial
L3  the same for the loss of a whole node: two torchrun agents on loopback, each with its own run
    directory and local directory, one of them killed with all its processes at a random instant
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from run import (
    LOGS,
    MAIN,
    TORCHRUN,
    WORK,
    _descendants,
    _signal,
    fresh,
    job_args,
    jsonl,
    run_job,
    say,
    steps_per_s,
    trials,
)

K = 5


def _rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in jsonl(run_dir / "metrics.jsonl") if r.get("kind") == kind]


def bench_l1(reps: int, steps: int) -> dict:
    variants = {"none": {}, "local": {"ckpt.interval": 50, "ckpt.local-interval": K}}
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    for i in range(reps):
        for v, opts in variants.items():  # the default local dir (/dev/shm): what a user gets
            times[v].append(run_job(f"l1_{v}_{i}", steps, timeout=600, **opts))
            say(f"L1 {v:5s} {i}: {steps_per_s(times[v][-1]):.3f} steps/s")
    return {"times": times, "steps": steps}


def _wait_for(path: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _rows(path, "train")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: never reached step {step}")
        time.sleep(0.1)


def _lost(dirs: list[Path], killed: float) -> dict:
    """Steps completed (logged by rank 0, in whichever dir it wrote) before the kill, minus the
    step the first resume after it started from."""
    done = max(r["step"] for d in dirs for r in _rows(d, "train") if r["time"] <= killed)
    resumes = [r for d in dirs for r in _rows(d, "resume") if r["time"] > killed]
    if not resumes:
        raise RuntimeError("no resume after the kill")
    resumed = min(resumes, key=lambda r: r["time"])
    return {"done": done, "resumed": resumed["step"], "lost": done - resumed["step"], "path": resumed["path"]}


def l2_trial(i: int, steps: int) -> dict:
    name, rng = f"l2_{i}", random.Random(i)
    run_dir = fresh(WORK / name)
    args = job_args(run_dir, steps, ckpt__interval=50, ckpt__local_interval=K)  # local dir: /dev/shm
    env = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            [str(c) for c in [*TORCHRUN, "--max-restarts=2", MAIN, *args]], env=env, stdout=log, stderr=log
        )
        try:
            _wait_for(run_dir, 12, proc)
            time.sleep(rng.uniform(0, 3))  # a random instant, not a step boundary
            workers = [p for p in _descendants(proc.pid) if "train/main.py" in _cmdline(p)]
            victim = rng.choice(sorted(workers)) if workers else None
            if victim is None:
                raise RuntimeError("no worker to kill")
            os.kill(victim, signal.SIGKILL)
            killed = time.time()
            if proc.wait(timeout=300) != 0:
                raise RuntimeError(f"{name}: exit {proc.returncode}")
        finally:
            if proc.poll() is None:
                _signal(_descendants(proc.pid), signal.SIGKILL)
                proc.kill()
    return _lost([run_dir], killed)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


STORE = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False,
                      timeout=timedelta(seconds=300))
print("ready", flush=True)
time.sleep(900)
"""


RDZV_CONF = (
    "is_host=false,join_timeout=60,last_call_timeout=2,close_timeout=5,keep_alive_interval=1,"
    "keep_alive_max_attempt=3"
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def l3_trial(i: int, steps: int) -> dict:
    """Two one-rank nodes; the rendezvous store is a process of its own (as an etcd would be), so
    either node may go. Kill the node holding rank 0 in even trials, the other in odd ones."""
    name, rng, port = f"l3_{i}", random.Random(100 + i), _free_port()
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], stdout=subprocess.PIPE, text=True)
    agents: list[subprocess.Popen] = []
    dirs = [fresh(WORK / f"{name}_node{n}" / "run") for n in range(2)]
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "ready"
        for n, run_dir in enumerate(dirs):
            args = job_args(run_dir, steps, ckpt__interval=50, ckpt__local_interval=K)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1"]
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={name}"]
            cmd += [f"--rdzv-conf={RDZV_CONF}", "--monitor-interval=0.2", "--max-restarts=3"]
            with open(LOGS / f"{name}_node{n}.log", "w") as log:
                agents.append(
                    subprocess.Popen([*cmd, str(MAIN), *args], stdout=log, stderr=log, start_new_session=True)
                )
        deadline = time.monotonic() + 180
        while not any(len(_rows(d, "train")) >= 12 for d in dirs):
            if time.monotonic() > deadline or any(a.poll() is not None for a in agents):
                raise RuntimeError(f"{name}: the two nodes never trained together")
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 3))
        holder = next(n for n in range(2) if _rows(dirs[n], "train"))
        victim = holder if i % 2 == 0 else 1 - holder
        _signal([agents[victim].pid, *_descendants(agents[victim].pid)], signal.SIGKILL)
        killed = time.time()
        if agents[1 - victim].wait(timeout=300) != 0:
            raise RuntimeError(f"{name}: the surviving node exited {agents[1 - victim].returncode}")
        return {**_lost(dirs, killed), "killed": "rank 0's node" if victim == holder else "the other node"}
    finally:
        for a in agents:
            if a.poll() is None:
                _signal([a.pid, *_descendants(a.pid)], signal.SIGKILL)
        store.kill()
        store.wait()
        for run_dir in dirs:  # the killed node's local checkpoints would stay in RAM until reboot
            _remove_local(run_dir)


def _remove_local(run_dir: Path) -> None:
    from train.checkpointing.local_tier import local_root

    root = local_root("", run_dir, create=False)
    if root is not None and root.is_relative_to("/dev/shm"):
        shutil.rmtree(root, ignore_errors=True)


def bench_l2_l3(count: int, steps: int) -> dict:
    return trials([("l2", lambda i: l2_trial(i, steps)), ("l3", lambda i: l3_trial(i, steps))], count)
