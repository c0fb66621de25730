"""End-to-end, real torchrun: sharded training (--parallel.mode fsdp / hsdp) killed and restarted ends
exactly like an uninterrupted run; its checkpoints resume at other world sizes and modes; a corrupt
or missing shard makes its checkpoint unusable, never the run. `make test-fsdp`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, STORE, launch_local, metrics_rows, run_torchrun, tiny_args, train_losses

from train import errors

STEPS = 40
FSDP = {"parallel__mode": "fsdp"}


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def export(run_dir: Path, out: Path) -> bytes:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "train.ckpt", "export", str(run_dir), "--out", str(out), "--overwrite"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def cursor(run_dir: Path) -> int:
    return [r for r in metrics_rows(run_dir) if r["kind"] == "train"][-1]["samples"]


def killed_twice(tmp_path: Path, corpus: Path, options: dict) -> Path:
    """A run of ``options`` SIGKILLed on rank 1 after step 15 and on rank 0 after step 25."""
    run_dir = tmp_path / "run"
    faults = "crash:step=15:rank=1;crash:step=25:rank=0:restart=1"
    args = tiny_args(run_dir, corpus, max_steps=STEPS, **options)
    result = run_torchrun(args, max_restarts=2, env={"FTJOB_FAULT": faults})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    return reference_run(max_steps=STEPS, **FSDP)


def test_sigkills_under_fsdp_resume_bit_exact(reference: Path, corpus: Path, tmp_path: Path) -> None:
    """Rank 1 and rank 0 killed mid-training, and twice inside a sharded save: after a shard file
    is written, and before rank 0 renames the directory. Every restart resumes from the newest
    committed checkpoint; the run ends with the same losses and the same shard files."""
    run_dir = tmp_path / "run"
    faults = [
        "crash:step=15:rank=1",
        "kill:point=ckpt.file_written:save_step=20:restart=1",
        "crash:step=25:rank=0:restart=2",
        "kill:point=ckpt.before_rename:save_step=30:restart=3",
    ]
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, **FSDP),
        max_restarts=4,
        env={"FTJOB_FAULT": ";".join(faults)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("resumed from step") == 2 * 4  # four restarts, two ranks each
    ref_losses, losses = train_losses(reference), train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [s for s in ref_losses if ref_losses[s] != losses[s]] == []
    for file in sorted(p.name for p in ckpt(reference, STEPS).iterdir() if p.name != "manifest.json"):
        assert (ckpt(run_dir, STEPS) / file).read_bytes() == (ckpt(reference, STEPS) / file).read_bytes(), (
            file
        )
    layout = json.loads((ckpt(run_dir, STEPS) / "manifest.json").read_text())["layout"]
    assert layout["files"] == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert {p[0] for spec in layout["tensors"].values() for p in spec["pieces"]} == {0, 1}


def test_hsdp_resumes_bit_exact(reference_run, corpus: Path, tmp_path: Path) -> None:
    """hsdp with shard groups of one rank (two replicas): one shard file, written by the first
    replica alone; killed twice, it ends as the uninterrupted hsdp run does (not as fsdp does:
    its gradient norm sums in another order)."""
    hsdp = {"parallel__mode": "hsdp", "parallel__shard_size": 1}
    reference, run_dir = reference_run(max_steps=STEPS, **hsdp), killed_twice(tmp_path, corpus, hsdp)
    shards = sorted(p.name for p in ckpt(run_dir, STEPS).iterdir() if p.name.startswith("shard"))
    assert shards == ["shard-00000-of-00001.safetensors"]
    ref_losses, losses = train_losses(reference), train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [s for s in ref_losses if ref_losses[s] != losses[s]] == []
    assert export(run_dir, tmp_path / "a.safetensors") == export(reference, tmp_path / "b.safetensors")


@pytest.mark.parametrize(
    "source, now, nproc",
    [
        ("fsdp", {**FSDP}, 1),
        ("fsdp", {**FSDP}, 3),  # uneven: 32 rows split 11, 11, 10
        ("fsdp", {**FSDP}, 4),
        ("fsdp", {}, 2),  # to ddp
        ("ddp", {**FSDP}, 2),
        ("fsdp", {"parallel__mode": "hsdp", "parallel__shard_size": 1}, 2),
    ],
    ids=["fsdp2-to-fsdp1", "fsdp2-to-fsdp3", "fsdp2-to-fsdp4", "fsdp-to-ddp", "ddp-to-fsdp", "fsdp-to-hsdp"],
)
def test_a_checkpoint_resumes_at_another_world_size_or_mode(
    reference_run, corpus: Path, tmp_path: Path, source: str, now: dict, nproc: int
) -> None:
    """From step 20 of a run without dropout (so that only the sums' order can differ): each rank
    reads the rows it now holds, the run continues the reference's losses, and every sample is
    seen exactly once (the sampler's cursor ends where the reference's does)."""
    fixed = {"model__dropout": 0.0, "global_batch_size": 12}  # 12: whole micro-batches at 1 to 4 ranks
    ref = reference_run(max_steps=STEPS, **fixed, **(FSDP if source == "fsdp" else {}))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt(ref, 20), ckpt(run_dir, 20))
    args = tiny_args(run_dir, corpus, max_steps=STEPS, **fixed, **now)
    result = run_torchrun(args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step 20 ({ckpt(run_dir, 20)})" in result.stderr
    ref_losses, losses = train_losses(ref), train_losses(run_dir)
    assert sorted(losses) == list(range(21, STEPS + 1))
    far = {
        s: (ref_losses[s], losses[s]) for s in losses if abs(ref_losses[s] - losses[s]) > 1e-4 * ref_losses[s]
    }
    assert not far, far
    assert cursor(run_dir) == cursor(ref)


def test_a_corrupt_or_missing_shard_makes_its_checkpoint_unusable(
    reference: Path, corpus: Path, tmp_path: Path
) -> None:
    """Step 40's second shard corrupt, step 30's first missing: both passed over (one line each),
    the run resumes from step 20 and ends as the reference did; the corrupt one is set aside when
    its step is written again, never deleted."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run_dir / "checkpoints")
    shard = ckpt(run_dir, 40) / "shard-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (ckpt(run_dir, 30) / "shard-00000-of-00002.safetensors").unlink()
    result = run_torchrun(tiny_args(run_dir, corpus, max_steps=STEPS, **FSDP))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step_00000040 is not usable (rank" in result.stderr and "checksum mismatch" in result.stderr
    assert "step_00000030 is not usable (shard-00000-of-00002.safetensors is missing)" in result.stderr
    assert f"resumed from step 20 ({ckpt(run_dir, 20)})" in result.stderr
    ref_losses, losses = train_losses(reference), train_losses(run_dir)
    assert sorted(losses) == list(range(21, STEPS + 1))
    assert [s for s in losses if ref_losses[s] != losses[s]] == []
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_00000040.invalid")]


def test_the_node_local_tier_of_a_sharded_run_resumes_bit_exact(
    reference: Path, corpus: Path, tmp_path: Path
) -> None:
    """Node-local saves every 3 steps (durable every 20): a SIGKILL after step 26 (or the first step
    after it that no save is running at) is resumed from a local copy newer than the durable step
    20 - step 24, or 21 where a loaded machine made the save of 24 wait for another one (a local
    save is skipped while any save runs) - and the run ends exactly as the uninterrupted one."""
    run_dir, local = tmp_path / "run", tmp_path / "local"
    tier = {"ckpt__interval": 20, "ckpt__local_interval": 3, "ckpt__local_dir": local}
    args = tiny_args(run_dir, corpus, max_steps=STEPS, **tier, **FSDP)
    result = run_torchrun(args, max_restarts=1, env={"FTJOB_FAULT": "crash:step=26:rank=0:idle=1"})
    assert result.returncode == 0, result.stderr[-3000:]
    killed = int(re.search(r"SIGKILL after step (\d+)", result.stderr).group(1))
    resumes = [r for r in metrics_rows(run_dir) if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["path"].startswith(str(local)), resumes
    assert resumes[0]["step"] in (21, 24) and killed - resumes[0]["step"] < 9, (killed, resumes)
    assert train_losses(run_dir) == train_losses(reference)
    assert not any(local.iterdir())  # a completed run's local copies are gone: its last save is durable


@pytest.mark.parametrize(
    "extra, said",
    [
        ({"parallel__mode": "hsdp", "parallel__shard_size": 3}, "do not split into shard groups of 3"),
    ],
)
def test_what_sharding_cannot_do_is_refused_with_one_line(
    corpus: Path, tmp_path: Path, extra: dict, said: str
) -> None:
    run_dir = tmp_path / "run"
    result = launch_local(tiny_args(run_dir, corpus, max_steps=5, **extra), tmp_path)
    assert result.returncode == errors.EXIT_CONFIG, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and said in lines[0], result.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_shard_that_fails_to_write_leaves_its_step_uncommitted_and_the_run_goes_on(
    reference: Path, corpus: Path, tmp_path: Path
) -> None:
    """Rank 1's write of step 20 fails (EIO): no step 20 exists (not even a temporary), the
    failure is counted by that rank's policy, training is unchanged, and the next saves commit."""
    run_dir = tmp_path / "run"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=STEPS, **FSDP),
        env={"FTJOB_FAULT": "fail_write:save_step=20:rank=1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint save failed" in result.stderr and "rank 1 could not write its shard" in result.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".verified"))
    assert names == ["step_00000030", "step_00000040"] or names == [
        "step_00000010",
        "step_00000030",
        "step_00000040",
    ], names
    ref_losses, losses = train_losses(reference), train_losses(run_dir)
    assert [s for s in ref_losses if ref_losses[s] != losses[s]] == []


def test_hsdp_replica_groups_share_a_saves_writes(corpus: Path, tmp_path: Path) -> None:
    """hsdp, 2 replica groups x 2 shards: shard 1 is written by the second group (rank 3), not by
    the first (rank 1) - so a write failing on rank 3 leaves its step uncommitted, one on rank 1
    changes nothing; the other checkpoints hold both shards."""
    run_dir = tmp_path / "run"
    hsdp = {"parallel__mode": "hsdp", "parallel__shard_size": 2, "ckpt__interval": 5}
    faults = "fail_write:save_step=5:rank=3;fail_write:save_step=10:rank=1"
    result = run_torchrun(
        tiny_args(run_dir, corpus, max_steps=15, **hsdp), nproc=4, env={"FTJOB_FAULT": faults}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 3 could not write its shard" in result.stderr and "rank 1 could not" not in result.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000010", "step_00000015"], names
    for name in names:
        files = sorted(p.name for p in (run_dir / "checkpoints" / name).glob("shard-*"))
        assert files == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]


def test_a_final_save_that_fails_ends_the_job_retryable_with_the_older_checkpoints_kept(
    corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, corpus, max_steps=20, **FSDP)
    result = launch_local(args, tmp_path, FTJOB_FAULT="fail_write:save_step=20:rank=1")
    assert result.returncode == errors.EXIT_STORAGE, result.stderr[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")] == [
        "step_00000010"
    ]


def test_without_a_process_group_sharding_is_refused_with_one_line(corpus: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    args = tiny_args(tmp_path / "run", corpus, max_steps=5, **FSDP)
    done = subprocess.run(
        [sys.executable, str(REPO / "train" / "main.py"), *args], capture_output=True, text=True
    )
    assert done.returncode == errors.EXIT_CONFIG, done.stderr[-3000:]
    assert "needs a process group" in done.stderr.strip().splitlines()[-1]


def _two_nodes(
    tmp_path: Path, corpus: Path, port: int, tag: str, ckpt_dirs: list[Path]
) -> tuple[list[int], str]:
    """Two torchrun agents of one rank each (two "nodes", each its own run dir) under fsdp."""
    import os
    import subprocess

    from conftest import MAIN, TORCHRUN

    procs = []
    for i in range(2):
        args = tiny_args(
            tmp_path / f"{tag}-run{i}", corpus, max_steps=12, ckpt__interval=4, ckpt__dir=ckpt_dirs[i]
        )
        cmd = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={tag}", "--rdzv-conf=is_host=false",
               "--monitor-interval=0.2", "--max-restarts=0", MAIN, *args,
               "--parallel.mode", "fsdp", "--data.cache-dir", str(tmp_path / "cache")]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = [p.communicate(timeout=180)[0] for p in procs]
    return [p.returncode for p in procs], "".join(outs)


def test_two_nodes_share_one_sharded_checkpoint_and_node_local_storage_is_refused(
    corpus: Path, tmp_path: Path
) -> None:
    """fsdp across two nodes: with a --ckpt.dir both see, each node's rank writes its shard into
    one checkpoint; with each node's own --ckpt.dir (a node lost would take its shards with it,
    and the replication between nodes is not built), the start is refused with one line."""
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    store = subprocess.Popen([sys.executable, "-c", STORE, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert store.stdout is not None and store.stdout.readline().strip() == "ready"
        shared = tmp_path / "shared-ckpt"
        codes, said = _two_nodes(tmp_path, corpus, port, "shared", [shared, shared])
        assert codes == [0, 0], said[-3000:]
        step = ckpt(shared.parent / "x", 12).name
        assert sorted(p.name for p in (shared / step).iterdir()) == [
            "manifest.json",
            "shard-00000-of-00002.safetensors",
            "shard-00001-of-00002.safetensors",
            "train.safetensors",
        ]
        codes, said = _two_nodes(tmp_path, corpus, port, "apart", [tmp_path / "ckpt0", tmp_path / "ckpt1"])
        assert codes != [0, 0]
        assert "needs a --ckpt.dir every node sees" in said, said[-3000:]
    finally:
        store.kill()


def test_buffers_and_a_0d_tensor_resume_bit_exact(reference_run, corpus: Path, tmp_path: Path) -> None:
    """A model with a BatchNorm under fsdp: its running statistics (changed by every forward, so
    copied at the save itself) and its 0-d batch count survive two SIGKILLs exactly."""
    bn = {"task": "tests.tasks.batchnorm_regression:build", **FSDP}
    reference, run_dir = reference_run(max_steps=STEPS, **bn), killed_twice(tmp_path, corpus, bn)
    ref_losses, losses = train_losses(reference), train_losses(run_dir)
    assert [s for s in ref_losses if ref_losses[s] != losses[s]] == []
    import safetensors.torch

    exported = export(run_dir, tmp_path / "a.safetensors")
    assert exported == export(reference, tmp_path / "b.safetensors")
    weights = safetensors.torch.load(exported)
    assert int(weights["1.num_batches_tracked"]) == STEPS and weights["1.running_mean"].abs().sum() > 0
