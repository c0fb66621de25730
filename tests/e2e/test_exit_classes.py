"""Every way a run ends reaches the scheduler as the right exit code, through launch/local.sh with
the real job under real torchrun: each class of train/errors.py, caused for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, launch_local, tiny_args

from train import errors

LOCAL_SH = REPO / "launch" / "local.sh"


def launch(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return launch_local(args, tmp_path, **env)


# (name, extra args, environment, expected code, words in the launcher's last line)
# 0 (finished): tests/e2e/test_train_e2e.py; 147 (storage): tests/e2e/test_storage_faults.py; 6 (disk
# full): the same; 143 (preempted): tests/e2e/test_failures.py - each through this launcher.
CASES = [
    ("config", {"ckpt__keep": 0}, {}, errors.EXIT_CONFIG, "--ckpt.keep"),
    ("data", {"data__path": "/nonexistent/corpus.txt"}, {}, errors.EXIT_DATA, "--data.path"),
    ("run-dir", {"run_dir": "FILE/run"}, {}, errors.EXIT_RUN_DIR, "not writable"),
    ("crash", {}, {"FTJOB_FAULT": "raise:step=3:rank=1"}, errors.EXIT_CRASH, "RuntimeError: fault injection"),
    ("killed", {}, {"FTJOB_FAULT": "crash:step=3:rank=1"}, errors.EXIT_KILLED, "SIGKILL"),
    (
        "hang",
        {"watchdog__timeout_s": 3},
        {"FTJOB_FAULT": "hang:step=3:rank=1"},
        errors.EXIT_HANG,
        "no progress",
    ),
    (  # a straggler slower than the collective timeout (a hung rank would hold torchrun's 30 s stop)
        "collective-timeout",
        {"dist__timeout_s": 3, "watchdog__timeout_s": 120},
        {"FTJOB_FAULT": "slow:step=3:rank=1:ms=5000"},
        errors.EXIT_COLLECTIVE_TIMEOUT,
        None,
    ),
]


@pytest.mark.parametrize(("name", "extra", "env", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_each_class_reaches_the_scheduler(
    corpus: Path, tmp_path: Path, name: str, extra: dict, env: dict, code: int, words: str | None
) -> None:
    run_dir = tmp_path / "run"
    options = {"max_steps": 12, **extra}
    if options.get("run_dir") == "FILE/run":  # a run dir under a regular file: cannot be created
        (tmp_path / "a-file").write_text("not a directory")
        options["run_dir"] = tmp_path / "a-file" / "run"
    result = launch(tiny_args(options.pop("run_dir", run_dir), corpus, **options), tmp_path, **env)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == code, result.stderr[-3000:]
    if code in (errors.EXIT_CONFIG, errors.EXIT_DATA, errors.EXIT_RUN_DIR):
        # caught by the launcher before any rendezvous: one line, in about a second
        assert result.stderr.strip() == last, result.stderr[-3000:]
        assert last.startswith("error: ") and f"[exit {code}: permanent" in last, last
    elif code:
        assert last.startswith(f"launch: torchrun exited 1; exit {code}: "), last
    if code and words:
        assert words in last, last
    if (run_dir / "exit_status.json").exists() and code not in (errors.EXIT_KILLED,):
        record = json.loads((run_dir / "exit_status.json").read_text())
        assert (record["code"], record["class"]) == (code, errors.classify(code)), record
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"ftjob-launch.{os.getpid()}*"))


def test_two_nodes_keep_separate_status_files(corpus: Path, tmp_path: Path) -> None:
    """A permanent error on one node and a secondary failure on the other: neither overwrites the other."""
    from conftest import free_port

    port = free_port()
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=12)
    env = {
        "NPROC": "1",
        "NNODES": "2",
        "RDZV_ENDPOINT": f"127.0.0.1:{port}",
        "RDZV_ID": "classes",
        "FTJOB_FAULT": "raise:step=3:rank=1",
    }
    first = subprocess.Popen(
        ["bash", str(LOCAL_SH), *args],
        env={**os.environ, "PYTHON": sys.executable, "MAX_RESTARTS": "0", **env,
             "FTJOB_STATUS_FILE": str(tmp_path / "node0.json")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    second = launch(args, tmp_path, **env, FTJOB_STATUS_FILE=str(tmp_path / "node1.json"))
    _, err0 = first.communicate(timeout=240)
    records = {}
    for node in ("node0", "node1"):
        records[node] = json.loads((tmp_path / f"{node}.json").read_text())
    by_rank = {r["rank"]: r for r in records.values()}
    assert by_rank[1]["code"] == errors.EXIT_CRASH and not by_rank[1]["secondary"], records
    assert by_rank[0]["secondary"] and by_rank[0]["code"] in (
        errors.EXIT_PEER,
        errors.EXIT_COLLECTIVE_TIMEOUT,
    )
    codes = sorted([first.returncode, second.returncode])
    assert errors.EXIT_CRASH in codes, (codes, err0[-2000:], second.stderr[-2000:])


def test_a_checkpoint_of_another_model_is_permanent(corpus: Path, tmp_path: Path) -> None:
    """One line, exit 4, the checkpoints untouched, and no restart burned on it."""
    run_dir = tmp_path / "run"
    assert launch(tiny_args(run_dir, corpus, max_steps=10, model__n_embd=16), tmp_path).returncode == 0
    before = sorted((run_dir / "checkpoints").iterdir())
    result = launch(tiny_args(run_dir, corpus, max_steps=20), tmp_path, MAX_RESTARTS="3")
    assert result.returncode == errors.EXIT_INCOMPATIBLE_CKPT, result.stderr[-3000:]
    assert "written by a different model/config" in result.stderr.strip().splitlines()[-1]
    said = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "different model/config" in said[0] and "--run-dir" in said[0], said
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == errors.EXIT_INCOMPATIBLE_CKPT
    assert sorted((run_dir / "checkpoints").iterdir()) == before
    assert result.stderr.count("process group up") == 2  # one attempt: the restart loop was stopped
