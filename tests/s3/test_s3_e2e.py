"""End to end with real torchrun and a real S3 server on loopback: the durable tier in a bucket keeps
every guarantee a local directory has - bit-exact resume after a kill, a kill mid-upload, corrupt
objects, the store going away mid-run and coming back, and a clear line for each bad start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, metrics_rows, run_torchrun, tiny_args, train_losses

from train.ckpt.manifest import deserialize
from train.ckpt.objstore import FsspecStorage
from train.errors import EXIT_CONFIG, EXIT_STORAGE

STEPS = 40


def s3_args(run_dir: Path, corpus: Path, url: str, **overrides: object) -> list[str]:
    return tiny_args(run_dir, corpus, ckpt__dir=url, **{"max_steps": STEPS, **overrides})


def final_state(url: str, step: int = STEPS) -> tuple[dict, dict]:
    store = FsspecStorage(url)
    name = f"step_{step:08d}"
    weights = safetensors.torch.load(bytes(store.read(name, "model.safetensors")))
    optim = deserialize("optim.safetensors", store.read(name, "optim.safetensors"))
    return weights, optim


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, dict, dict]:
    """An uninterrupted run on local disk: what every S3 run must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_torchrun(tiny_args(run_dir, corpus, max_steps=STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    weights = safetensors.torch.load_file(ckpt / "model.safetensors")
    optim = deserialize("optim.safetensors", (ckpt / "optim.safetensors").read_bytes())
    return run_dir, weights, optim


def assert_same_run(reference: tuple[Path, dict, dict], run_dir: Path, url: str) -> None:
    ref_dir, w_ref, o_ref = reference
    assert train_losses(run_dir) == train_losses(ref_dir)
    w, o = final_state(url)
    assert w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w)
    moments = [t for s in o["state"].values() for t in s.values()]
    ref_moments = [t for s in o_ref["state"].values() for t in s.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, ref_moments, strict=True))


@pytest.mark.parametrize(
    ("fault", "resumed_from"),
    [("crash:step=25:rank=1", 20), ("kill:point=ckpt.file_written:save_step=30", 20)],
    ids=["sigkill-rank", "sigkill-mid-upload"],
)
def test_kill_and_resume_from_s3_is_bit_exact(
    reference, corpus: Path, tmp_path: Path, s3_env: dict, fault: str, resumed_from: int
) -> None:
    url = f"s3://{s3_env['BUCKET']}/run"
    run_dir = tmp_path / "run"
    # Blocking saves: an async one still uploading at the next interval is skipped (by design),
    # and which step resumes would depend on this machine's load.
    args = s3_args(run_dir, corpus, url, ckpt__async=False)
    result = run_torchrun(args, max_restarts=2, env={"FTJOB_FAULT": fault})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {resumed_from} ({url}/step_{resumed_from:08d})" in result.stderr
    assert_same_run(reference, run_dir, url)
    assert not (run_dir / "checkpoints").exists()  # nothing durable went to local disk
    store = FsspecStorage(url, stale_s=0)
    assert store.names() == ["step_00000020", "step_00000030", "step_00000040"]  # --ckpt.keep 3
    store.clean_temporaries()
    assert all("manifest.json" in files for files in store._objects().values())
    config = (run_dir / "config.json").read_text()
    assert (
        s3_env["AWS_SECRET_ACCESS_KEY"] not in config and s3_env["AWS_SECRET_ACCESS_KEY"] not in result.stderr
    )


def test_corrupt_objects_of_the_newest_checkpoint_fall_back(
    corpus: Path, tmp_path: Path, s3_env: dict
) -> None:
    url = f"s3://{s3_env['BUCKET']}/run"
    run_dir = tmp_path / "run"
    first = run_torchrun(s3_args(run_dir, corpus, url, max_steps=20, ckpt__async=False))
    assert first.returncode == 0, first.stderr[-3000:]
    store = FsspecStorage(url)
    path = f"{store.root}/step_00000020/model.safetensors"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    second = run_torchrun(s3_args(run_dir, corpus, url, max_steps=30))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "step_00000020 is not usable (model.safetensors: checksum mismatch" in second.stderr
    assert "resumed from step 10" in second.stderr
    assert any(n.startswith("step_00000020.invalid-") for n in store.set_aside_names())
    assert {"step_00000020", "step_00000030"} <= set(store.names())


def run_and_break(
    args: list[str], log: Path, url: str, fault: Callable[[], None], **env: str
) -> tuple[int, float]:
    """Start the job (2 ranks, no restarts), call ``fault`` once step 10 is committed to ``url``;
    return (the job's exit code, the monotonic time of the fault)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=0", "--monitor-interval=0.2", str(REPO / "train" / "main.py"), *args]  # fmt: skip
    with log.open("w") as out:
        job = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, cwd=REPO, stdout=out,
                               stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while FsspecStorage(url).names()[-1:] != ["step_00000010"] and time.monotonic() < deadline:
            time.sleep(0.2)
        fault()
        at = time.monotonic()
        return job.wait(timeout=180), at
    finally:
        if job.poll() is None:
            job.kill()


def test_store_down_mid_run_keeps_training_then_stops_cleanly_and_resumes(
    s3_server, corpus: Path, tmp_path: Path, s3_env: dict
) -> None:
    """The full-disk policy: failed saves are retried at each interval while training goes on;
    after --ckpt.max-failures in a row the job stops (retryable), and nothing valid was lost."""
    url = f"s3://{s3_env['BUCKET']}/run"
    run_dir = tmp_path / "run"
    args = s3_args(run_dir, corpus, url, max_steps=100_000, ckpt__interval=5, ckpt__max_failures=2)
    log = tmp_path / "job.log"
    # SIGKILL: the store vanishes mid-run, uploads in flight included.
    code, stopped_at = run_and_break(args, log, url, s3_server.kill, FTJOB_FAULT="slow:ms=100:restart=any")
    text = log.read_text()
    assert code != 0 and json.loads((run_dir / "exit_status.json").read_text())["code"] == EXIT_STORAGE, text[
        -3000:
    ]
    assert "retrying at the next interval (1 of 2 failures" in text
    assert text.count("checkpoint save failed") == 2
    assert time.monotonic() - stopped_at < 120
    steps = [r["step"] for r in metrics_rows(run_dir) if r["kind"] == "train"]
    assert max(steps) >= 20  # it kept training while saves failed
    s3_server.start()
    store = FsspecStorage(url)
    assert store.names()[-1] >= "step_00000010"
    newest = int(store.names()[-1][5:])
    again = run_torchrun(s3_args(run_dir, corpus, url, max_steps=newest + 5))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {newest}" in again.stderr


def test_a_store_that_hangs_ends_the_attempt_in_bounded_time(
    s3_server, corpus: Path, tmp_path: Path, s3_env: dict
) -> None:
    """Up but not answering (a proxy that holds every reply): the save in flight is declared hung
    after --ckpt.save-timeout-s, the attempt ends with 147 and one line, earlier checkpoints stay."""
    import s3_local

    proxy = s3_local.StallingProxy(s3_server.endpoint)
    url = f"s3://{s3_env['BUCKET']}/run"
    run_dir = tmp_path / "run"
    args = s3_args(run_dir, corpus, url, max_steps=100_000, ckpt__interval=5, ckpt__save_timeout_s=5)
    log = tmp_path / "job.log"
    try:
        code, stalled_at = run_and_break(args, log, url, proxy.stall, FTJOB_FAULT="slow:ms=50:restart=any",
                                         AWS_ENDPOINT_URL=proxy.endpoint)  # fmt: skip
    finally:
        proxy.close()
    text = log.read_text()
    assert code != 0 and json.loads((run_dir / "exit_status.json").read_text())["code"] == EXIT_STORAGE, text[
        -3000:
    ]
    assert re.search(
        r"longer than 5s \(--ckpt.save-timeout-s 5 \+ \d+ MB at --ckpt.slowest-mb-s 25\): storage hung\?",
        text,
    )
    assert time.monotonic() - stalled_at < 60
    assert FsspecStorage(url).names()[-1] >= "step_00000010"  # straight to the server: all there


def launch(args: list[str], tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    full.update({"PYTHONUNBUFFERED": "1", **env})
    cmd = [sys.executable, str(REPO / "launch" / "ftjob.py"), "--nproc-per-node=2", "--", *args]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, EXIT_CONFIG, "access refused"),
        ({"BUCKET": "no-such-bucket-anywhere"}, EXIT_CONFIG, "no such bucket"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, EXIT_STORAGE, "is not reachable"),
    ],
    ids=["wrong-secret", "missing-bucket", "server-down"],
)
def test_a_bad_start_is_one_line_and_quick(
    corpus: Path, tmp_path: Path, s3_env: dict, change: dict, code: int, words: str
) -> None:
    env = {**s3_env, **change}
    url = f"s3://{env.pop('BUCKET')}/run"
    t0 = time.monotonic()
    result = launch(s3_args(tmp_path / "run", corpus, url), tmp_path, env)
    assert result.returncode == code, result.stderr[-3000:]
    assert time.monotonic() - t0 < 45
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "process group up" not in result.stderr  # refused before any rendezvous
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in result.stderr


def test_a_sharded_run_saves_to_and_resumes_from_a_bucket_bit_exact(
    reference_run, corpus: Path, tmp_path: Path, s3_env: dict
) -> None:
    """fsdp on 2 ranks, --ckpt.dir in the bucket: each rank uploads its own shard (no gather to
    rank 0); SIGKILLed after step 25, then inside the save of step 30 after a shard is uploaded:
    resumed from step 20 twice, bit-exact against the uninterrupted run on local disk; the
    re-saved step 30 holds only its manifest's files (the killed save's upload is gone), and the
    checkpoint exports the same weights as the reference's."""
    url = f"s3://{s3_env['BUCKET']}/fsdp"
    ref = reference_run(max_steps=STEPS, parallel__mode="fsdp")
    run_dir = tmp_path / "run"
    args = s3_args(run_dir, corpus, url, ckpt__async=False, parallel__mode="fsdp")
    faults = "crash:step=25:rank=1;kill:point=ckpt.file_written:save_step=30:restart=1"
    result = run_torchrun(args, max_restarts=2, env={"FTJOB_FAULT": faults})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f"resumed from step 20 ({url}/step_00000020)") == 4  # 2 ranks, twice
    assert train_losses(run_dir) == train_losses(ref)
    store = FsspecStorage(url, stale_s=0)
    assert store.names() == ["step_00000020", "step_00000030", "step_00000040"]
    for name, files in store._objects().items():
        listed = json.loads(bytes(store.read(name, "manifest.json")))["files"]
        assert set(files) == {*listed, "manifest.json"}, (name, sorted(files))
        assert sum(f.startswith("shard-") for f in files) == 2
    exported = []
    for source in (url, str(ref)):
        out = tmp_path / f"{len(exported)}.safetensors"
        done = subprocess.run([sys.executable, "-m", "train.ckpt", "export", source, "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, env=os.environ)  # fmt: skip
        assert done.returncode == 0, done.stderr
        exported.append(out.read_bytes())
    assert exported[0] == exported[1]
