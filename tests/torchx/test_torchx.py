"""launch/torchx_component.py under TorchX's real CLI and local scheduler (make test-torchx).

TorchX comes from its own venv (TORCHX=.venv-torchx/bin/torchx, made by the Makefile); the job's
`ftjob` from this Python's venv, found on PATH as a node finds it in the image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, metrics_rows, tiny_args, train_losses

TORCHX = os.environ.get("TORCHX") or shutil.which("torchx")
COMPONENT = f"{REPO / 'launch' / 'torchx_component.py'}:ftjob"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def _torchx() -> None:
    if not TORCHX or not Path(TORCHX).exists():
        if os.environ.get("FTJOB_REQUIRE_TORCHX") == "1":
            pytest.fail("FTJOB_REQUIRE_TORCHX=1 but no torchx: run `make test-torchx`")
        pytest.skip("torchx is not installed (make test-torchx makes .venv-torchx)")


def torchx_run(
    tmp_path: Path, job_args: list[str], j: str = "1x2", component_args: tuple[str, ...] = (), **env: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """`torchx run -s local_cwd` of the component; its result and the replicas' record."""
    log_dir = tmp_path / "torchx"
    cmd = [TORCHX, "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}", COMPONENT, "-j", j,
           *component_args, "--", *job_args]  # fmt: skip
    full = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    full.update(env, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    full.setdefault("TORCHRUN_ARGS", "")
    done = subprocess.run(cmd, env=full, cwd=REPO, capture_output=True, text=True, timeout=500)
    records = list(log_dir.rglob("SUCCESS"))
    assert records, f"no record of the app in {log_dir}: {done.stderr[-3000:]}"
    return done, json.loads(records[0].read_text())


def exit_codes(record: dict) -> list[int]:
    return [r["exitcode"] for replicas in record["roles"].values() for r in replicas]


def test_a_killed_worker_recovers_and_the_run_is_the_uninterrupted_one(
    corpus: Path, tmp_path: Path, reference_run
) -> None:
    run_dir = tmp_path / "run"
    done, record = torchx_run(tmp_path, tiny_args(run_dir, corpus), FTJOB_FAULT="crash:step=12:rank=1")
    assert done.returncode == 0 and exit_codes(record) == [0], done.stderr[-3000:]
    assert any(r.get("restart") == 1 for r in metrics_rows(run_dir)), "the worker was not restarted"
    assert "resumed from step 10" in done.stderr
    assert train_losses(run_dir) == train_losses(reference_run())


def test_two_nodes_rendezvous_on_the_first_nodes_host(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = str(free_port())
    done, record = torchx_run(
        tmp_path, tiny_args(run_dir, corpus, max_steps=5), j="2x1", component_args=("--rdzv_port", port)
    )
    assert done.returncode == 0 and exit_codes(record) == [0, 0], done.stderr[-3000:]
    assert max(r["step"] for r in metrics_rows(run_dir) if r.get("kind") == "train") == 5


def test_a_bad_option_fails_in_seconds_with_the_config_exit_class(corpus: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done, record = torchx_run(tmp_path, [*tiny_args(tmp_path / "run", corpus), "--ckpt.intervall", "5"])
    took = time.monotonic() - started
    assert done.returncode != 0 and exit_codes(record) == [2], done.stderr[-3000:]
    assert "ckpt.intervall" in done.stderr
    assert took < 60, f"a bad option took {took:.0f} s to fail"
