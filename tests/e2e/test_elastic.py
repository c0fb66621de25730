"""Node loss: two torchrun agents (two "nodes") on loopback; one dies with its worker.

The survivor re-rendezvouses at world size 1 and resumes from the last checkpoint. The agents'
restart counters now differ (only the survivor counted a restart), which is exactly the case where
TORCHELASTIC_RESTART_COUNT cannot name an attempt and stale store keys would break a plain
init_process_group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import MAIN, REPO, TORCHRUN, free_port, metrics_rows, process_tree, tiny_args, train_losses


def agent(args: list[str], port: int, env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        *TORCHRUN,
        "--nnodes=1:2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=elastic-test",
        # keep_alive_*: as launch/local.sh sets them (a lost node is declared dead after ~3 s).
        "--rdzv-conf=join_timeout=60,last_call_timeout=2,close_timeout=5,"
        "keep_alive_interval=1,keep_alive_max_attempt=3",
        "--monitor-interval=0.2",
        "--max-restarts=3",
        MAIN,
        *args,
    ]
    return subprocess.Popen(
        cmd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_losing_a_node_continues_at_the_smaller_world_size(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=40, ckpt__interval=5)
    # slow: timing only, the kill lands mid-run; await_zygote: the survivor's restart is a warm one.
    env = {"FTJOB_FAULT": "await_zygote:step=1;slow:ms=60:restart=any"}
    port = free_port()
    survivor, victim = agent(args, port, env), None
    try:
        time.sleep(1.0)  # the first agent hosts the rendezvous store
        victim = agent(args, port, env)
        deadline = time.monotonic() + 120
        while max(train_losses(run_dir), default=0) < 12 if (run_dir / "metrics.jsonl").exists() else True:
            assert time.monotonic() < deadline, "the two-node job never reached step 12"
            time.sleep(0.1)
        for pid in process_tree(victim.pid):  # the node is gone: agent and worker at once
            os.kill(pid, signal.SIGKILL)
        killed = time.time()
        output, _ = survivor.communicate(timeout=180)
    finally:
        for p in (survivor, victim):
            if p is not None and p.poll() is None:
                for pid in process_tree(p.pid):
                    os.kill(pid, signal.SIGKILL)
    assert survivor.returncode == 0, output[-4000:]
    rows = metrics_rows(run_dir)
    sizes = [r["world_size"] for r in rows if r["kind"] == "train"]
    assert sizes[0] == 2 and sizes[-1] == 1
    assert "warm restart: trainer forked" in output
    first_alone = min(r["time"] for r in rows if r["kind"] == "train" and r["world_size"] == 1)
    print(f"\nnode loss: kill -> first step at world size 1 in {first_alone - killed:.1f} s")
    assert sorted(train_losses(run_dir)) == list(range(1, 41))
    resumes = [r for r in rows if r["kind"] == "resume"]
    assert resumes and resumes[-1]["step"] % 5 == 0
    assert "resuming, but not bit-exact" in output  # 2 ranks' RNG streams, now 1 rank
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 0
