"""The image for real: docker/Dockerfile built on a local Debian base (tests/docker/engine.sh), torch
from this machine's local wheel; the container trains with 2 ranks as uid 1000 on a read-only root,
`docker stop` saves and exits 143, and a second container resumes from that step.

Root only (a Docker engine); skipped elsewhere unless FTJOB_REQUIRE_DOCKER=1 (CI), then it fails.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, free_port

pytestmark = pytest.mark.timeout(1800)
REQUIRED = os.environ.get("FTJOB_REQUIRE_DOCKER") == "1"


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}: {(done.stdout + done.stderr)[-4000:]}")
    return done


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def wheelhouse(where: Path) -> Iterator[str]:
    """Every package the image needs, downloaded here as this machine's pip finds them (its local
    torch wheel, its index and certificates), served over http on loopback: the build (host
    network) installs from it alone."""
    # torch pinned as `make setup` pins it: an open range would fetch the multi-GB CUDA build.
    need = ["torch==2.13.0", f"{REPO}[etcd,s3]", "setuptools>=77", "wheel"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "-d", str(where), *need],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()), functools.partial(_Quiet, directory=str(where))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.geteuid() != 0:
        if REQUIRED:
            pytest.fail("FTJOB_REQUIRE_DOCKER=1 but not root: the Docker tests cannot run")
        pytest.skip("needs root: a Docker engine")
    base = subprocess.run(
        ["bash", str(REPO / "tests" / "docker" / "engine.sh")], capture_output=True, text=True, timeout=1200
    )
    assert base.returncode == 0, base.stderr[-3000:]
    tag = f"ftjob-test:{uuid.uuid4().hex[:8]}"
    with wheelhouse(tmp_path_factory.mktemp("wheels")) as wheels:
        args = ["--build-arg", f"BASE={base.stdout.strip()}", "--build-arg", f"WHEELS={wheels}"]
        docker(
            "build", "--network", "host", "-f", "docker/Dockerfile", "-t", tag, *args, str(REPO), timeout=1500
        )
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)


def train_rows(runs: Path) -> list[dict]:
    path = runs / "job" / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]


def run_container(image: str, runs: Path, name: str, steps: int) -> None:
    job = ["--run-dir", "runs/job", "--data.cache-dir", "runs/cache", "--max-steps", str(steps),
           "--model.n-layer", "1", "--model.n-embd", "32", "--model.n-head", "2", "--data.seq-len", "32",
           "--global-batch-size", "8", "--ckpt.interval", "1000", "--sample-bytes", "0",
           "--eval-interval", "0"]  # fmt: skip
    docker("run", "-d", "--name", name, "--network", "none", "--read-only", "--tmpfs", "/tmp",
           "--shm-size", "256m", "-v", f"{runs}:/workspace/runs", "-e", "FTJOB_FAULT=slow:ms=100:restart=any",
           image, "--nproc-per-node=2", "--", *job)  # fmt: skip


def test_the_image_trains_as_uid_1000_on_a_read_only_root_stops_with_143_and_resumes(
    image: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, 1000, 1000)
    first, second = f"ftjob-a-{uuid.uuid4().hex[:6]}", f"ftjob-b-{uuid.uuid4().hex[:6]}"
    try:
        run_container(image, runs, first, steps=100_000)
        deadline = time.monotonic() + 300
        while len(train_rows(runs)) < 5:
            state = docker("inspect", "-f", "{{.State.Running}}", first).stdout.strip()
            assert state == "true" and time.monotonic() < deadline, docker("logs", first).stderr[-3000:]
            time.sleep(0.5)
        stopped = time.monotonic()
        docker("stop", "-t", "60", first, timeout=120)
        took = time.monotonic() - stopped
        code = int(docker("inspect", "-f", "{{.State.ExitCode}}", first).stdout)
        logs = docker("logs", first).stderr
        assert code == 143, logs[-3000:]
        last = max(r["step"] for r in train_rows(runs))
        assert f"preempted: saved step {last}" in logs
        assert (runs / "job" / "checkpoints" / f"step_{last:08d}" / "manifest.json").is_file()
        assert (runs / "job" / "metrics.jsonl").stat().st_uid == 1000  # written as uid 1000

        run_container(image, runs, second, steps=last + 5)
        assert int(docker("wait", second, timeout=300).stdout) == 0, docker("logs", second).stderr[-3000:]
        logs = docker("logs", second).stderr
        assert f"resumed from step {last}" in logs and "0 completed step(s) lost" in logs
        assert max(r["step"] for r in train_rows(runs)) == last + 5
        print(f"docker stop -> container exited 143 in {took:.1f} s")
    finally:
        docker("rm", "-f", first, second, check=False)
