"""A sharded run across two nodes loses the node that holds global rank 0: the survivor resumes from
its node-local tier, which keeps the lost node's shards as well (the ring), so the loss costs at
most --ckpt.local-interval steps. Real torchrun agents of 2 ranks each on loopback, each "node"
with its own run dir and local dir; the rendezvous store is a process of its own (an etcd or a
dedicated host), so that killing either agent leaves it alive. `make test-fsdp`; `make bench` F5."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from pathlib import Path

from conftest import agent, kill_tree, metrics_rows, rendezvous_store, tiny_args, wait

STEPS, LOCAL_INTERVAL, DURABLE_INTERVAL = 60, 3, 30


def _train_rows(run_dir: Path) -> list[dict]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [r for r in metrics_rows(run_dir) if r["kind"] == "train"]


def _shards(local: Path) -> set[str]:
    """The shard files of the newest node-local copy under ``local`` (<local dir>/<run id>/step_*)."""
    steps = sorted(local.glob("*/step_*"))
    return {p.name for p in steps[-1].glob("shard-*")} if steps else set()


def _start(tmp_path: Path, corpus: Path, port: int, node: Path) -> subprocess.Popen:
    """One node's torchrun agent: its own run dir and local dir, the shared --ckpt.dir."""
    args = tiny_args(node / "run", corpus, max_steps=STEPS, ckpt__interval=DURABLE_INTERVAL,
                     ckpt__dir=tmp_path / "shared-ckpt", ckpt__local_interval=LOCAL_INTERVAL,
                     ckpt__local_dir=node / "local", parallel__mode="fsdp")  # fmt: skip
    node.mkdir(parents=True, exist_ok=True)
    args += ["--data.cache-dir", str(tmp_path / "cache")]
    return agent(args, port, node / "agent.log", per_node=2, rdzv_id="ring-test")


EVERY_SHARD = {f"shard-0000{i}-of-00004.safetensors" for i in range(4)}


def lose_rank_0s_node(tmp_path: Path, corpus: Path) -> dict:
    """Two nodes of 2 ranks under fsdp; the node holding global rank 0 is SIGKILLed once the other
    keeps a full node-local copy. Returns what happened (for the test and for `make bench` F5)."""
    agents: list[subprocess.Popen] = []
    nodes = [tmp_path / f"node{i}" for i in range(2)]
    with rendezvous_store() as port, contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [kill_tree(proc) for proc in agents])
        agents = [_start(tmp_path, corpus, port, node) for node in nodes]
        wait(lambda: any(len(_train_rows(n / "run")) >= 10 for n in nodes), "two nodes training", timeout=180)
        holder = next(i for i in range(2) if _train_rows(nodes[i] / "run"))  # rank 0 logs in its run dir
        other = nodes[1 - holder]
        wait(lambda: _shards(other / "local") == EVERY_SHARD, "the other node keeping every shard")
        kill_tree(agents[holder])  # the node is gone, and its disks with it
        killed_at = max(r["step"] for r in _train_rows(nodes[holder] / "run"))
        wait(lambda: len(_train_rows(other / "run")) >= 3, "the survivor training alone")
        code = agents[1 - holder].wait(timeout=300)
        log = (other / "agent.log").read_text()
        assert code == 0, log[-4000:]
        resumes = [r for r in metrics_rows(other / "run") if r["kind"] == "resume"]
        return {"killed_at": killed_at, "resume": resumes[0], "rows": _train_rows(other / "run"),
                "local": other / "local", "log": log}  # fmt: skip


def test_losing_rank_0s_node_resumes_from_the_other_nodes_local_copy_of_its_shards(
    corpus: Path, tmp_path: Path
) -> None:
    seen = lose_rank_0s_node(tmp_path, corpus)
    resume, rows = seen["resume"], seen["rows"]
    assert resume["path"].startswith(str(seen["local"])), resume  # not the durable step 30 or none
    # At most one local interval lost (+1: the kill may land while the next local save is written).
    assert seen["killed_at"] - resume["step"] <= LOCAL_INTERVAL + 1, (seen["killed_at"], resume)
    assert rows[0]["step"] == resume["step"] + 1 and rows[0]["world_size"] == 2
    assert [r["step"] for r in rows] == list(range(resume["step"] + 1, STEPS + 1))
    assert "resumed from step" in seen["log"]


def test_a_rebooted_node_receives_the_shards_its_ranks_read_and_the_replay_is_bit_exact(
    corpus: Path, tmp_path: Path
) -> None:
    """Both agents SIGKILLed, one node's local tier wiped (a reboot: its RAM disk is gone), both
    restarted: the job resumes from the node-local step the other node holds whole; the rebooted
    node receives the manifest, the train file and the two shards its ranks read - not the other
    two - and the steps trained again lose exactly what they lost before."""
    agents: list[subprocess.Popen] = []
    nodes = [tmp_path / f"node{i}" for i in range(2)]
    with rendezvous_store() as port, contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: [kill_tree(proc) for proc in agents])
        agents = [_start(tmp_path, corpus, port, node) for node in nodes]
        wait(
            lambda: (
                any(len(_train_rows(n / "run")) >= 12 for n in nodes)
                and all(_shards(n / "local") == EVERY_SHARD for n in nodes)
            ),
            "both nodes keeping every shard, 12 steps in",
            timeout=180,
        )
        for proc in agents:
            kill_tree(proc)
        rows = {r["step"]: r["loss"] for n in nodes for r in _train_rows(n / "run")}
        shutil.rmtree(nodes[1] / "local")
        kept = sorted((nodes[0] / "local").glob("*/step_*"))[-1].name
        for node in nodes:
            (node / "agent.log").rename(node / "agent-before.log")
        agents = [_start(tmp_path, corpus, port, node) for node in nodes]
        codes = [proc.wait(timeout=300) for proc in agents]
        logs = [(n / "agent.log").read_text() for n in nodes]
        assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        resumes = [r for n in nodes for r in metrics_rows(n / "run") if r["kind"] == "resume"]
        assert [r["step"] for r in resumes] == [int(kept[5:])] and "/local/" in resumes[0]["path"], resumes
        received = [int(n) for n in re.findall(r"received (\d+) file\(s\) this node lacked", logs[1])]
        assert sorted(received) == [2, 2], logs[1][-3000:]  # manifest + train, then its 2 shards
        again = [
            r
            for n in nodes
            for r in _train_rows(n / "run")
            if r["step"] in rows and r["time"] > resumes[0]["time"]
        ]
        assert again and all(r["loss"] == rows[r["step"]] for r in again)  # bit-exact replay
        assert max(r["step"] for n in nodes for r in _train_rows(n / "run")) == STEPS
