"""Two torchrun agents on loopback, each "node" with its own run dir and local tier, the durable
checkpoints in one bucket: rank 0 alone writes the bucket, every node keeps its own node-local
tier, and losing the node that holds global rank 0 costs at most the local interval."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import free_port, metrics_rows, tiny_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_replicas import STORE, agent, checkpoint_steps, kill_tree, train_rows, wait

from train.ckpt.objstore import FsspecStorage


def test_losing_rank_0s_node_resumes_from_the_survivors_local_tier(
    corpus: Path, tmp_path: Path, s3_env: dict
) -> None:
    url = f"s3://{s3_env['BUCKET']}/run"
    port, steps, local_interval = free_port(), 60, 3
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], stdout=subprocess.PIPE, text=True)
    agents: list[subprocess.Popen] = []
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "ready"
        dirs = [tmp_path / f"node{i}" / "run" for i in range(2)]

        def args(run_dir: Path) -> list[str]:
            tier = {"ckpt__local_interval": local_interval, "ckpt__local_dir": run_dir.parent / "local"}
            opts = {"max_steps": steps, "ckpt__interval": 20, "ckpt__dir": url, **tier}
            return [*tiny_args(run_dir, corpus, **opts), "--data.cache-dir", str(tmp_path / "cache")]

        agents = [agent(args(dirs[i]), port, tmp_path / f"agent{i}.log") for i in range(2)]
        wait(lambda: any(len(train_rows(d)) >= 12 for d in dirs), "two nodes training")
        holder = next(i for i in range(2) if train_rows(dirs[i]))
        other = 1 - holder
        wait(lambda: (dirs[other] / ".run-id").exists(), "the node without rank 0 starting")
        own = dirs[other].parent / "local" / (dirs[other] / ".run-id").read_text().strip()
        wait(lambda: checkpoint_steps(own.parent, own.name), "the node without rank 0 keeping a local copy")
        assert not (dirs[other] / "checkpoints").exists()  # the durable tier is the bucket's alone
        kill_tree(agents[holder])
        killed_at = max(r["step"] for r in train_rows(dirs[holder]))

        wait(lambda: len(train_rows(dirs[other])) >= 3, "the survivor training alone")
        resumes = [r for r in metrics_rows(dirs[other]) if r["kind"] == "resume"]
        assert resumes and resumes[0]["path"].startswith(str(own)), resumes  # its own local copy
        assert killed_at - resumes[0]["step"] <= local_interval + 1, (killed_at, resumes[0])

        code = agents[other].wait(timeout=240)
        assert code == 0, (tmp_path / f"agent{other}.log").read_text()[-3000:]
        assert FsspecStorage(url).names()[-1] == f"step_{steps:08d}"
        assert train_rows(dirs[other])[-1]["step"] == steps
    finally:
        for proc in agents:
            kill_tree(proc)
        store.kill()
        store.wait()
