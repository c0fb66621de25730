"""Shared helpers: a tiny corpus and model so real torchrun runs take seconds, free ports, metrics."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
MAIN = str(REPO / "train" / "main.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~150 KB of real text (the stdlib's json and email packages), the same on every machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
    out.write_bytes(b"\n".join(p.read_bytes() for p in files))
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path):
    """``reference_run(**overrides)``: the run dir of an uninterrupted 2-rank torchrun run with
    those tiny_args overrides, run once per session and shared by every test comparing with it."""
    done: dict[str, Path] = {}

    def get(**overrides: object) -> Path:
        key = repr(sorted(overrides.items()))
        if key not in done:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            result = run_torchrun(tiny_args(run_dir, corpus, **overrides))
            assert result.returncode == 0, result.stderr[-3000:]
            done[key] = run_dir
        return done[key]

    return get


def tiny_args(run_dir: Path, corpus: Path, **overrides: object) -> list[str]:
    """CLI args for a ~30k-parameter model on the tiny corpus; override with key=value (dots as __)."""
    opts: dict[str, object] = {
        "run-dir": run_dir,
        "data.path": corpus,
        "data.cache-dir": run_dir.parent / f"{run_dir.name}-cache",
        "data.seq-len": 32,
        "model.n-layer": 1,
        "model.n-embd": 32,
        "model.n-head": 2,
        "global-batch-size": 8,
        "sample-bytes": 0,
        "eval-interval": 0,
        "log-interval": 10,
        "max-steps": 30,
        "ckpt.interval": 10,
    }
    for key, value in overrides.items():
        opts[key.replace("__", ".").replace("_", "-")] = value
    return [item for k, v in opts.items() for item in (f"--{k}", str(v))]


def run_torchrun(
    args: list[str],
    nproc: int = 2,
    max_restarts: int = 0,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    cmd = [
        *TORCHRUN,
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        *(extra or []),
        MAIN,
        *args,
    ]
    full_env = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _local_sh(args: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    full = {k: v for k, v in os.environ.items() if k not in ("FTJOB_FAULT", "FTJOB_STATUS_FILE")}
    torchrun = Path(sys.executable).parent / "torchrun"
    full.update({"PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "NPROC": "2", "MAX_RESTARTS": "0", **env})
    if torchrun.exists():
        full["TORCHRUN"] = str(torchrun)
    full.setdefault("TORCHRUN_ARGS", "--monitor-interval=0.2")
    return ["bash", str(REPO / "launch" / "local.sh"), *args], full


def launch_local(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """The job through launch/local.sh (the ftjob launcher, torchrun, 2 ranks, no restarts unless
    MAX_RESTARTS says otherwise), as a scheduler runs it."""
    cmd, full = _local_sh(args, env)
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def start_local(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """launch_local(), started: stdout and stderr are pipes."""
    cmd, full = _local_sh(args, env)
    return subprocess.Popen(cmd, env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun puts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def metrics_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; for a step logged twice (re-run after a resume) the last row wins."""
    return {r["step"]: r["loss"] for r in metrics_rows(run_dir) if r["kind"] == "train"}


def start_torchrun(args: list[str], env: dict[str, str], extra: list[str]) -> subprocess.Popen:
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2", *extra, MAIN, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen(
        cmd, env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def newest_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").iterdir() if p.name[5:].isdigit()]
    return max(steps)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    # ~3 checkpoints of the tiny model (~0.3 MB each) fit; --ckpt.keep 3 needs 4.
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k,mode=0700", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real S3-compatible server on loopback (tests/s3_local.py), authentication on."""
    import s3_local

    with s3_local.server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> dict[str, str]:
    """The AWS variables for the server, set in this process too; a fresh bucket in env["BUCKET"]."""
    if s3_server.proc is None:  # a test stopped it
        s3_server.start()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = f"t{abs(hash(request.node.nodeid)) % 10**10:010d}"
    s3_server.make_bucket(bucket)
    return {**s3_server.env(), "BUCKET": bucket}


# A rendezvous store in a process of its own, as an etcd or a dedicated host would be, so that
# killing any agent of a multi-node test leaves the rendezvous alive (with c10d's default the
# first agent hosts it).
STORE = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False,
                      timeout=timedelta(seconds=300))
print("ready", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def rendezvous_store() -> Iterator[int]:
    """STORE running on a free port (yielded) for the block's agents."""
    port = free_port()
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "ready"
        yield port
    finally:
        store.kill()
        store.wait()


def wait(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in process_tree(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def agent(
    args: list[str], port: int, log: Path, per_node: int = 1, rdzv_id: str = "replica-test"
) -> subprocess.Popen:
    """One "node" of an elastic job (1 to 2 nodes) on loopback: a torchrun agent of ``per_node``
    ranks, restarted up to 5 times, its workers' steps at least 80 ms (time to act between them)."""
    cmd = [*TORCHRUN, "--nnodes=1:2", f"--nproc_per_node={per_node}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
           "--rdzv-conf=is_host=false,join_timeout=60,last_call_timeout=2,close_timeout=5,"
           "keep_alive_interval=1,keep_alive_max_attempt=3",
           "--monitor-interval=0.2", "--max-restarts=5", MAIN, *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FTJOB_FAULT": "slow:ms=80:restart=any"}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=out, stderr=out)
