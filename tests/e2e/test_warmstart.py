"""Warm restarts (train/runtime/warmstart.py) with real processes.

In the first tests this test process plays torchrun's agent: it starts a real zygote for itself
and real ``python train/main.py`` workers as its children, so each property (exit codes, output,
signals, SIGKILL of the worker, who may connect, the zygote's lifetime) is checked directly. The
last test runs the whole thing under a real torchrun. Bit-exact warm restarts are checked in
test_resume.py, which restarts warm by default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    MAIN,
    REPO,
    metrics_rows,
    newest_checkpoint,
    process_tree,
    start_torchrun,
    tiny_args,
    wait_for_step,
)

from train.runtime import env as procs
from train.runtime import warmstart

ZYGOTE = str(REPO / "train" / "runtime" / "zygote.py")
pytestmark = pytest.mark.skipif(not warmstart.supported(), reason="warm restarts need Linux pidfds")


def alive(pid: int) -> bool:
    try:
        return procs.proc_stat(pid)[0] not in ("Z", "X")
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def zygotes_of(agent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 3 and argv[-3].endswith(b"zygote.py") and argv[-2] == str(agent).encode():
            found.append(int(entry.name))
    return [p for p in found if alive(p)]


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A zygote serving this test process as its agent, once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "zygote.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-u", ZYGOTE, str(os.getpid())], env=env, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not warmstart.listening(os.getpid()):
            assert proc.poll() is None, (tmp_path / "zygote.log").read_text()
            assert time.monotonic() < deadline, "zygote never listened"
            time.sleep(0.1)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def worker(args: list[str], **env: str) -> subprocess.Popen:
    """``python train/main.py`` as torchrun would start it (this process standing in for the agent)."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "FTJOB_FAULT")}
    full_env = {**inherited, "TORCHELASTIC_RUN_ID": "warmstart-test", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-u", MAIN, *args],
        env=full_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def trainer_of(zygote: subprocess.Popen, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [p for p in process_tree(zygote.pid) if p != zygote.pid and alive(p)]
        if children:
            return children[0]
        time.sleep(0.05)
    raise TimeoutError("the zygote forked no trainer")


def test_worker_runs_warm_with_its_own_args_output_and_exit_code(
    zygote: subprocess.Popen, corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    out, err = worker(tiny_args(run_dir, corpus, max_steps=3)).communicate(timeout=120)
    assert "warm restart: trainer forked" in err, err[-3000:]
    assert [r["step"] for r in metrics_rows(run_dir) if r["kind"] == "train"] == [1, 2, 3]

    proc = worker(["--run-dir", str(tmp_path / "x"), "--ckpt.intervall", "5"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2  # a config error keeps its permanent exit code through the stand-in
    assert "--ckpt.intervall" in err

    proc = worker(["--help"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "--ckpt.interval" in out  # the trainer writes to the worker's own stdout
    assert zygote.poll() is None  # one zygote serves any number of workers


def test_signals_reach_the_trainer_and_sigkill_of_the_worker_takes_it_down(
    zygote: subprocess.Popen, corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=100_000, ckpt__interval=1000)
    slow = {"FTJOB_FAULT": "slow:ms=50:restart=any"}

    proc = worker(args, **slow)
    trainer = trainer_of(zygote)
    wait_for_step(run_dir, 3)
    proc.send_signal(signal.SIGTERM)  # what torchrun sends on preemption or a peer's failure
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]  # preempted, saved: the trainer's own exit code
    assert wait_gone(trainer, 10)
    last = max(r["step"] for r in metrics_rows(run_dir) if r["kind"] == "train")
    assert newest_checkpoint(run_dir) == last

    proc = worker(args, **slow)
    trainer = trainer_of(zygote)
    wait_for_step(run_dir, last + 2)
    proc.kill()  # SIGKILL: nothing to forward; the trainer must notice by itself
    proc.communicate(timeout=30)
    assert wait_gone(trainer, 10), "trainer outlived its SIGKILLed worker"

    proc = worker(tiny_args(tmp_path / "crash", corpus, max_steps=5), FTJOB_FAULT="crash:step=2:restart=any")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # the trainer's death by signal, as torchrun would see it


def test_a_trainer_holding_the_gil_dies_with_its_worker(
    zygote: subprocess.Popen, corpus: Path, tmp_path: Path
) -> None:
    """A trainer stuck in C with the GIL held (as a deadlock in a destructor during teardown is)
    runs no Python thread again: the zygote, not the trainer, kills it when its worker goes."""
    run_dir = tmp_path / "run"
    proc = worker(tiny_args(run_dir, corpus, max_steps=100), FTJOB_FAULT="hold_gil:step=3:restart=any")
    trainer = trainer_of(zygote)
    wait_for_step(run_dir, 3)
    time.sleep(0.5)  # holding it now
    proc.kill()
    proc.communicate(timeout=30)
    assert wait_gone(trainer, 5), "a trainer outlived its SIGKILLed worker"
    assert zygote.poll() is None


def test_only_children_of_the_agent_are_served(zygote: subprocess.Popen) -> None:
    # A process that is not the agent's child but knows the address: it must be turned away.
    impostor = (
        f"import os, sys; sys.path.insert(0, {str(REPO)!r}); os.getppid = lambda: {os.getpid()}; "
        f"sys.argv = [{MAIN!r}, '--help']; from train.runtime import warmstart; "
        "warmstart.handoff(); print('cold')"
    )
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "warmstart-test"}
    out = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -c "$0"; true', impostor],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "cold", out.stderr[-2000:]
    assert zygote.poll() is None


def test_zygote_exits_with_its_agent() -> None:
    agent = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; "
            f"p = subprocess.Popen([sys.executable, {ZYGOTE!r}, str(os.getpid())]); print(p.pid)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    zygote_pid = int(agent.stdout)
    assert wait_gone(zygote_pid, 60), "zygote outlived its agent"


def test_torchrun_restart_is_warm_preemptible_and_leaves_no_zygote(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=1000, ckpt__interval=1000)
    proc = start_torchrun(
        args,
        {"FTJOB_FAULT": "slow:ms=40:restart=any"},
        ["--max-restarts=2", "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2"],
    )
    try:
        # A restart within the first seconds of a cold start is cold: the zygote is still
        # importing. Wait for it, then SIGKILL rank 1's worker as a failing node would.
        _wait(lambda: warmstart.listening(proc.pid) and len(_rows(run_dir)) >= 3, proc)
        (rank1,) = [p for p in process_tree(proc.pid) if _environ(p).get("LOCAL_RANK") == "1"]
        os.kill(rank1, signal.SIGKILL)
        _wait(lambda: sum(r.get("restart") == 1 for r in _rows(run_dir)) >= 3, proc)
        proc.send_signal(signal.SIGTERM)  # preemption while the trainers are warm-forked ones
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert stderr.count("warm restart: trainer forked") == 2, stderr[-3000:]
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 143
    last = max(r["step"] for r in _rows(run_dir) if r["restart"] == 1)
    assert newest_checkpoint(run_dir) == last  # signal forwarded, saved, zero steps lost
    assert f"preempted: saved step {last}" in stderr
    deadline = time.monotonic() + 10
    while zygotes_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not zygotes_of(proc.pid), "zygote outlived torchrun"


def _wait(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _rows(run_dir: Path) -> list[dict]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [r for r in metrics_rows(run_dir) if r["kind"] == "train"]
