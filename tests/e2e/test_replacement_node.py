"""A new node that joins a running job with an empty run directory receives the checkpoint over
the network from a node that holds it, and the job continues at the larger world size.

Real torchrun agents on loopback, each "node" with its own run directory. Each agent runs in a
directory of its own with the same relative ``--run-dir run``: the same path names a different
directory on each node, as on machines without a shared filesystem (with absolute paths the
newcomer could simply read the other node's copy from this machine's disk). Node A starts alone
(``--nnodes=1:2``, hosting the c10d rendezvous store) and writes checkpoints; node B then joins
with nothing. A's agent sees a waiting node and restarts its workers (SIGTERM: A's trainer saves
the step it is at); both nodes resume from that checkpoint, which only A holds, so A sends it to B.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import MAIN, TORCHRUN, free_port, metrics_rows, tiny_args
from test_replicas import checkpoint_steps, kill_tree, train_rows, wait

from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage

STEPS, INTERVAL, BATCH = 100, 5, 8


def node(home: Path, port: int, corpus: Path) -> subprocess.Popen:
    """One node: a torchrun agent whose run directory (``home/run``) no other node can see."""
    home.mkdir()
    (home / "run").mkdir()  # empty: a new machine
    cmd = [
        *TORCHRUN,
        "--nnodes=1:2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=replacement-test",
        "--rdzv-conf=join_timeout=60,last_call_timeout=2,close_timeout=5,"
        "keep_alive_interval=1,keep_alive_max_attempt=3",
        "--monitor-interval=0.2",
        # >= 1 so that restarts are warm ones, as in launch/local.sh; a membership change is no
        # restart (TORCHELASTIC_RESTART_COUNT stays 0), so any retry of a failure shows in the rows.
        "--max-restarts=1",
        MAIN,
        *tiny_args(Path("run"), corpus, max_steps=STEPS, ckpt__interval=INTERVAL),
        "--dist.init-timeout-s",
        "60",
    ]
    env = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    env.update(
        PYTHONUNBUFFERED="1",
        FTJOB_FAULT="slow:ms=100:restart=any",  # timing only: B joins while A is mid-run
        # torch 2.13's c10d handler shares the agent's TCPStore with the workers and publishes its
        # address once, under the first round's key prefix: an agent that first joins in a later
        # round waits for <round>/MASTER_ADDR forever (join_timeout), and the running node times
        # out on torchelastic/role_info. Without sharing, rank 0's agent publishes it every round.
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    with open(home / "agent.log", "w") as out:
        return subprocess.Popen(
            cmd, env=env, cwd=home, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )


def group_rank(log: str) -> int:
    found = re.findall(r"process group up: \w+, rank (\d+)/2\b", log)
    assert len(found) == 1, found  # one start at world size 2
    return int(found[0])


@pytest.mark.timeout(240)
def test_a_new_node_with_an_empty_run_dir_gets_the_checkpoint_and_the_job_grows(
    corpus: Path, tmp_path: Path
) -> None:
    port = free_port()
    homes = {name: tmp_path / f"node{name}" for name in "AB"}
    runs = {name: home / "run" for name, home in homes.items()}
    agents: dict[str, subprocess.Popen] = {}
    try:
        agents["A"] = node(homes["A"], port, corpus)
        wait(lambda: len(checkpoint_steps(runs["A"])) >= 2, "node A's first checkpoints", timeout=90)
        held_when_b_started = max(checkpoint_steps(runs["A"]))
        agents["B"] = node(homes["B"], port, corpus)
        codes = {name: proc.wait(timeout=180) for name, proc in agents.items()}
    finally:
        for proc in agents.values():
            kill_tree(proc)
    logs = {name: (home / "agent.log").read_text() for name, home in homes.items()}
    assert codes == {"A": 0, "B": 0}, "\n\n".join(f"== {n}\n{logs[n][-4000:]}" for n in logs)

    # Steps 1..S alone, S+1..STEPS together: none lost, none repeated, no failure retried.
    rows = train_rows(runs["A"]) + train_rows(runs["B"])  # global rank 0 writes them, on either node
    alone = [r["step"] for r in rows if r["world_size"] == 1]
    together = [r["step"] for r in rows if r["world_size"] == 2]
    assert alone, "node A never trained alone"
    resumed_at = alone[-1]
    assert alone == list(range(1, resumed_at + 1))
    assert held_when_b_started <= resumed_at < STEPS, "node B did not join while A was training"
    assert together == list(range(resumed_at + 1, STEPS + 1))
    assert {r["restart"] for r in rows} == {0}
    # The sampler's cursor counts samples, not steps: it carries on across the world-size change,
    # so each step takes the next BATCH positions of the permutation (split over 1, then 2 ranks).
    assert [r["samples"] for r in rows] == [BATCH * r["step"] for r in rows]

    # Both nodes resumed from A's checkpoint of step S; A sent it, B received it.
    rank_a, rank_b = group_rank(logs["A"]), group_rank(logs["B"])
    assert {rank_a, rank_b} == {0, 1}
    written = [run for run in runs.values() if (run / "metrics.jsonl").exists()]
    resumes = [r for run in written for r in metrics_rows(run) if r["kind"] == "resume"]
    assert len(resumes) == 1, resumes  # A's first start found nothing: no resume row
    resume = resumes[0]
    assert (resume["step"], resume["source_rank"], resume["lost_steps"]) == (resumed_at, rank_a, 0)
    assert resume["received_by"] == [rank_b]
    assert re.search(
        rf"\[rank{rank_a}\] .*sent checkpoint step {resumed_at} to the rank\(s\) that cannot read a "
        rf"copy of it: \[{rank_b}\]",
        logs["A"],
    )
    assert re.search(rf"\[rank{rank_b}\] .*resumed from step {resumed_at} ", logs["B"]), logs["B"][-3000:]
    assert "starting at step 1" not in logs["B"]

    # B is a replica now: its own valid checkpoints, all written after it joined, the same final state.
    infos = CheckpointManager(LocalStorage(runs["B"] / "checkpoints"), keep=1).list(deep=True)
    assert infos and all(i.valid for i in infos), [(i.step, i.reason) for i in infos]
    assert checkpoint_steps(runs["B"])[-1] == STEPS and min(checkpoint_steps(runs["B"])) > resumed_at
    final = {
        name: json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())
        for name, run in runs.items()
    }
    assert final["A"]["files"] == final["B"]["files"]  # sizes and checksums of every file
