"""The README's recovery picture, from a real run with injected failures:
``python tests/bench/report_demo.py [--out tests/bench/recovery-demo.png]`` (~3 min on 2 cores).

Two one-rank "nodes" on this box (two ftjob launchers, an elastic c10d rendezvous hosted by the
first, one shared run dir), a small GPT, a durable checkpoint every 20 steps and a node-local one
every 5:
1. rank 1 is SIGKILLed after step 60 (fault injection): torchrun restarts both, warm;
2. after step 120 the second node is lost (its launcher, agent and worker SIGKILLed): the first
   goes on alone at world size 1;
3. after step 180 the first node gets SIGTERM (a preemption): it saves and exits 143;
4. the job is launched again, one node with two ranks, and finishes at step 300.
Then ``python -m train.report RUN_DIR --plot OUT`` - its text goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FTJOB = [sys.executable, str(REPO / "launch" / "ftjob.py")]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if '"kind": "train"' in x and x.endswith("}")]
    return max(steps, default=0)


def _wait(run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _last_step(run_dir) < step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} not reached")
        time.sleep(0.2)


def _kill_tree(proc: subprocess.Popen) -> None:
    """The launcher, its torchrun and the workers (each in a process group of its own)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import process_tree

    for pid in process_tree(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).with_name("recovery-demo.png")))
    p.add_argument("--work", default=str(REPO / "runs" / "report-demo"))
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    run_dir = work / "run"
    job = ["--run-dir", str(run_dir), "--max-steps", "300", "--model.n-layer", "2", "--model.n-embd", "64",
           "--ckpt.interval", "20", "--ckpt.local-interval", "5", "--ckpt.local-dir", str(work / "local"),
           "--eval-interval", "50", "--sample-bytes", "0", "--log-interval", "20"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FTJOB_FAULT": "slow:ms=40:restart=any;crash:step=60:rank=1",
    }
    endpoint = f"127.0.0.1:{_port()}"
    nodes = []
    logs = work / "logs"
    logs.mkdir(parents=True)
    for n in range(2):
        cmd = [*FTJOB, "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={endpoint}", "--rdzv-id=report-demo", "--", *job]  # fmt: skip
        with open(logs / f"node{n}.log", "w") as log:
            nodes.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True, cwd=REPO)
            )
        time.sleep(1.0)  # the first node hosts the rendezvous store
    try:
        _wait(run_dir, 120)
        _kill_tree(nodes[1])  # node loss
        _wait(run_dir, 180)
        nodes[0].send_signal(signal.SIGTERM)  # preemption
        print("first launch exited", nodes[0].wait(timeout=120), file=sys.stderr)
    finally:
        for proc in nodes:
            if proc.poll() is None:
                _kill_tree(proc)
    again = subprocess.run([*FTJOB, "--nproc-per-node=2", "--", *job], env={**env, "FTJOB_FAULT": ""},
                           cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    if again.returncode != 0:
        print(again.stderr[-3000:], file=sys.stderr)
        return again.returncode
    report = subprocess.run(
        [sys.executable, "-m", "train.report", str(run_dir), "--plot", args.out], cwd=REPO
    )
    return report.returncode


if __name__ == "__main__":
    sys.exit(main())
