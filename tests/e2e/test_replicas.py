"""Every node a replica, with real torchrun agents on loopback, each "node" with its own run dir
(two machines without a shared filesystem): losing the node that holds global rank 0 - and every
checkpoint it wrote - costs at most the steps since the last checkpoint, never the run.

The rendezvous store is a separate process here, as an etcd or a dedicated host would be, so that
killing either agent leaves the rendezvous alive (with c10d's default the first agent hosts it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STORE, agent, free_port, kill_tree, metrics_rows, tiny_args, wait


def train_rows(run_dir: Path) -> list[dict]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [r for r in metrics_rows(run_dir) if r["kind"] == "train"]


def checkpoint_steps(run_dir: Path, tier: str = "checkpoints") -> list[int]:
    root = run_dir / tier
    return (
        sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit()) if root.exists() else []
    )


# With a node-local tier (every 3 steps; durable every 20) the survivor resumes from its own local
# copy instead: tests/s3/test_s3_nodes.py (make test-s3, in CI) and `make bench` L3.
@pytest.mark.parametrize("local_interval", [0])
def test_losing_rank_0s_node_and_its_disk_resumes_from_the_other_nodes_copy(
    corpus: Path, tmp_path: Path, local_interval: int
) -> None:
    """Without a node-local tier (durable every 5), the survivor resumes from its own durable copy;
    with one (``local_interval``), from its own local copy."""
    port, steps = free_port(), 60
    interval, lost_at_most = (20, 3) if local_interval else (5, 5)
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], stdout=subprocess.PIPE, text=True)
    agents: list[subprocess.Popen] = []
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "ready"
        dirs = [tmp_path / f"node{i}" / "run" for i in range(2)]
        cache = tmp_path / "cache"

        def args(run_dir: Path) -> list[str]:
            tier = {"ckpt__local_interval": local_interval, "ckpt__local_dir": run_dir.parent / "local"}
            return [
                *tiny_args(run_dir, corpus, max_steps=steps, ckpt__interval=interval, **tier),
                "--data.cache-dir",
                str(cache),
            ]

        agents = [agent(args(dirs[i]), port, tmp_path / f"agent{i}.log") for i in range(2)]
        wait(lambda: any(len(train_rows(d)) >= 12 for d in dirs), "two nodes training")
        holder = next(i for i in range(2) if train_rows(dirs[i]))  # rank 0 writes metrics in its dir
        other = 1 - holder
        own = dirs[other] / "checkpoints"
        if local_interval:  # its own local tier: <local dir>/<run id>
            wait(lambda: (dirs[other] / ".run-id").exists(), "the node without rank 0 starting")
            own = dirs[other].parent / "local" / (dirs[other] / ".run-id").read_text().strip()
        wait(lambda: checkpoint_steps(own.parent, own.name), "the node without rank 0 keeping a copy")
        kill_tree(agents[holder])  # the node and its disk are gone: agent, worker, and its run dir
        killed_at = max(r["step"] for r in train_rows(dirs[holder]))
        copies = checkpoint_steps(own.parent, own.name)

        # The survivor is rank 0 now and writes metrics in its own dir: it must resume from its copy.
        wait(lambda: len(train_rows(dirs[other])) >= 3, "the survivor training alone")
        first = train_rows(dirs[other])[0]
        resumes = [r for r in metrics_rows(dirs[other]) if r["kind"] == "resume"]
        assert resumes and resumes[0]["step"] >= max(copies) > 0, (resumes, copies)
        assert resumes[0]["path"].startswith(str(own)), resumes[0]  # its own copy, of the newest tier
        assert first["step"] == resumes[0]["step"] + 1 and first["world_size"] == 1
        # At most one interval of work lost (+1: the kill may land while the next save is written).
        assert killed_at - resumes[0]["step"] <= lost_at_most + 1

        code = agents[other].wait(timeout=240)
        assert code == 0, (tmp_path / f"agent{other}.log").read_text()[-3000:]
        rows = train_rows(dirs[other])
        assert rows[-1]["step"] == steps and [r["step"] for r in rows] == list(
            range(first["step"], steps + 1)
        )
        assert steps in checkpoint_steps(dirs[other])
    finally:
        for proc in agents:
            kill_tree(proc)
        store.kill()
        store.wait()


@pytest.mark.parametrize("shared", ["run-dir", "ckpt-dir"])
def test_shared_storage_is_detected_where_checkpoints_go(corpus: Path, tmp_path: Path, shared: str) -> None:
    """A shared run dir with a node-local --ckpt.dir: every node writes its own copy. Node-local run
    dirs with a shared --ckpt.dir: rank 0 alone writes it (two writers of one step would collide)."""
    port, steps = free_port(), 12
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], stdout=subprocess.PIPE, text=True)
    agents: list[subprocess.Popen] = []
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "ready"
        run_dirs = (
            [tmp_path / "shared-run"] * 2 if shared == "run-dir" else [tmp_path / f"run{i}" for i in range(2)]
        )
        ckpt_dirs = (
            [tmp_path / "shared-ckpt"] * 2
            if shared == "ckpt-dir"
            else [tmp_path / f"ckpt{i}" for i in range(2)]
        )
        agents = [
            agent(
                [
                    *tiny_args(
                        run_dirs[i], corpus, max_steps=steps, ckpt__interval=4, ckpt__dir=ckpt_dirs[i]
                    ),
                    "--data.cache-dir",
                    str(tmp_path / "cache"),
                ],
                port,
                tmp_path / f"agent{i}.log",
            )
            for i in range(2)
        ]
        codes = [proc.wait(timeout=180) for proc in agents]
        logs = [(tmp_path / f"agent{i}.log").read_text() for i in range(2)]
        assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
        said = "".join(logs)
        if shared == "ckpt-dir":
            assert "the nodes share" in said and "is not shared" not in said
            assert "ENOTEMPTY" not in said and "checkpoint save failed" not in said
            assert checkpoint_steps(tmp_path, "shared-ckpt") == [4, 8, 12]
        else:
            assert "is not shared" in said
            for i in range(2):  # each node its own copy of every checkpoint
                assert checkpoint_steps(tmp_path, f"ckpt{i}") == [4, 8, 12]
    finally:
        for proc in agents:
            kill_tree(proc)
        store.kill()
        store.wait()
