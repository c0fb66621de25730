"""Real 2-rank gloo process groups, in-process via ``multiprocessing`` (spawn), on CPU.

Every child sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE and calls ``train.dist.setup("gloo", 30)``
exactly as a torchrun worker would, runs one worker function, and sends a picklable result back
through a queue. Without TORCHELASTIC_USE_AGENT_STORE rank 0 hosts the TCPStore; with it, the test
process plays the torchrun agent and hosts a store that outlives the groups (the restart case).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import random
import threading
import re
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from train.ckpt.manifest import deserialize
from train.checkpointing.snapshot import Snapshots

try:
    import numpy as np
except ImportError:  # numpy is an optional dependency of the job
    np = None

WORLD = 2
FINGERPRINT = "test-fingerprint"
GEN_RE = re.compile(r"generation ([0-9a-f]{8})")

pytestmark = pytest.mark.timeout(120)


# -- harness -----------------------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _child(
    fn: Callable[..., Any],
    rank: int,
    port: int,
    extra_env: dict[str, str],
    delay: float,
    results: Any,
    args: tuple,
) -> None:
    torch.set_num_threads(1)
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            **{key: value.format(rank=rank) for key, value in extra_env.items()},
        }
    )
    handler = _ListHandler()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        from train.runtime import dist as distributed

        time.sleep(delay)
        env = distributed.setup("gloo", 30)
        try:
            value = fn(env, *args)
        finally:
            distributed.teardown()
        results.put((rank, "ok", value, handler.lines))
    except BaseException:
        results.put((rank, "error", traceback.format_exc(), handler.lines))


def run_group(
    fn: Callable[..., Any],
    *args: Any,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    delays: tuple[float, ...] = (0.0,) * WORLD,
    timeout: float = 90,
) -> list[tuple[Any, list[str]]]:
    """Run ``fn(env, *args)`` on WORLD ranks; return [(value, log messages)] by rank.

    Fails the test with the child's traceback if a rank raised or did not answer in time.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = port or free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, port, extra_env or {}, delays[rank], results, args),
            daemon=True,
        )
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, Any, list[str]]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < WORLD and time.monotonic() < deadline:
            try:
                rank, status, value, lines = results.get(timeout=0.5)
                got[rank] = (status, value, lines)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    try:  # a last answer may have been in flight
                        rank, status, value, lines = results.get(timeout=2)
                        got[rank] = (status, value, lines)
                    except queue.Empty:
                        break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    errors = [f"rank {r}:\n{v}" for r, (s, v, _) in sorted(got.items()) if s == "error"]
    missing = [r for r in range(WORLD) if r not in got]
    if errors or missing:
        codes = [p.exitcode for p in procs]
        pytest.fail(f"ranks {missing} gave no answer (exit codes {codes})\n" + "\n".join(errors))
    return [(got[r][1], got[r][2]) for r in range(WORLD)]


def _generation(lines: list[str]) -> str:
    found = [m.group(1) for line in lines if (m := GEN_RE.search(line))]
    assert len(found) == 1, lines
    return found[0]


# -- (a) byte and flag collectives ---------------------------------------------------------------------


def _comm_worker(env) -> dict:
    from train.runtime import comm

    rank, dev = env.rank, env.device
    payload_1 = bytes(range(256)) * 3 + b"\x00tail"  # NULs and high bytes: no text encoding anywhere
    value = torch.tensor(float(4 * rank + 2))
    out = {
        "env": (env.rank, env.world_size, env.local_rank, str(env.device), env.backend, env.restart),
        "group": (dist.get_rank(), dist.get_world_size(), dist.get_backend()),
        "gather_diff_len": comm.all_gather_bytes(b"r%d:" % rank + b"x" * (37 * rank), dev),
        "gather_same_len": comm.all_gather_bytes(b"abc%d" % rank, dev),
        "gather_big": comm.all_gather_bytes(bytes([rank]) * (100_000 + rank), dev),
        "gather_binary": comm.all_gather_bytes(payload_1 if rank == 1 else b"\x00", dev),
        "mean": comm.mean(value).item(),
        "mean_input_untouched": value.item(),
        "mean_vector": comm.mean(torch.tensor([1.0, -2.0]) * (rank + 1)).tolist(),
    }
    # Started now, waited for later on another thread, with a collective in between (the save's
    # RNG gather overlaps the step loop's own collectives); one rank's data over the capacity.
    later = comm.all_gather_later(b"L%d" % rank * (rank + 1), 16, dev)
    out["gather_between"] = comm.all_gather_bytes(b"b%d" % rank, dev)
    over = comm.all_gather_later(b"x" * (5 if rank == 0 else 40), 8, dev)
    box: dict = {}
    waiter = threading.Thread(target=lambda: box.update(later=later(), over=over()))
    waiter.start()
    waiter.join(60)
    out.update(gather_later=box.get("later"), gather_over=box.get("over"))
    from train.checkpointing.boundary import Agreement, agree

    loss, agreed = agree(Agreement(stop=rank == 0, saving=rank == 1), env, torch.tensor(float(rank + 1)))
    out["agree"] = (loss, vars(agreed))
    return out


def test_comm_collectives_agree_on_both_ranks():
    (r0, _), (r1, _) = run_group(_comm_worker)
    assert r0["env"] == (0, 2, 0, "cpu", "gloo", 0)
    assert r1["env"] == (1, 2, 1, "cpu", "gloo", 0)
    assert r0["group"] == (0, 2, "gloo") and r1["group"] == (1, 2, "gloo")
    payload_1 = bytes(range(256)) * 3 + b"\x00tail"
    for r in (r0, r1):
        assert r["gather_diff_len"] == [b"r0:", b"r1:" + b"x" * 37]
        assert r["gather_same_len"] == [b"abc0", b"abc1"]
        assert r["gather_big"] == [b"\x00" * 100_000, b"\x01" * 100_001]
        assert r["gather_binary"] == [b"\x00", payload_1]
        assert r["gather_later"] == [b"L0", b"L1L1"] and r["gather_between"] == [b"b0", b"b1"]
        assert r["gather_over"] == [b"xxxxx", b""]  # too long: empty, for its reader to refuse
        assert r["mean"] == pytest.approx(4.0)  # (2 + 6) / 2
        assert r["mean_vector"] == pytest.approx([1.5, -3.0])
    assert r0["mean_input_untouched"] == 2.0 and r1["mean_input_untouched"] == 6.0
    # The step's agreement: a flag raised on any rank is seen by every rank; the loss is the mean.
    stop_and_saving = {"stop": True, "saving": True, "saving_local": False, "hung": False,
                       "disk_full": False, "storage_failed": False}  # fmt: skip
    assert r0["agree"] == r1["agree"] == (1.5, stop_and_saving)


def _empty_bytes_worker(env) -> dict:
    """Every case, each failure recorded as a string.

    Cases are ordered so that a failure (as of writing) leaves both ranks at the same collective;
    the asymmetric all_gather case (only one rank has empty bytes) goes last because a failure
    there leaves the other rank waiting in a collective (bounded by the group's timeout).
    """
    from train.runtime import comm

    rank, dev = env.rank, env.device
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("gather_all_empty", lambda: comm.all_gather_bytes(b"", dev)),
        ("gather_rank0_empty", lambda: comm.all_gather_bytes(b"" if rank == 0 else b"xyz", dev)),
    ]
    out: dict[str, Any] = {}
    for name, case in cases:
        try:
            out[name] = case()
        except Exception as e:
            out[name] = f"raised {type(e).__name__}: {e}"
    return out


def test_comm_empty_bytes():
    (r0, _), (r1, _) = run_group(_empty_bytes_worker, timeout=100)
    expected = {
        "gather_all_empty": [b"", b""],
        "gather_rank0_empty": [b"", b"xyz"],
    }
    assert r0 == expected, r0
    assert r1 == expected, r1


# -- (b) restarts against a torchrun agent's store that keeps the previous attempts' keys --------------


def _allreduce_worker(env, round_no: int) -> dict:
    t = torch.tensor([float(env.rank + 1), float(round_no)])
    dist.all_reduce(t)
    dist.barrier()
    return {"sum": t.tolist(), "rank": env.rank, "world": dist.get_world_size()}


@pytest.fixture
def agent_store():
    """A standalone TCPStore, as torchrun's agent hosts one (it outlives every worker group)."""
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
    )
    yield store, port
    del store


def test_restarted_groups_reuse_agent_store(agent_store):
    store, port = agent_store
    agent_env = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    generations = []
    for round_no in range(3):
        # From the second round on rank 0 starts late: rank 1 meets only the stale keys at first.
        delays = (0.0, 0.0) if round_no == 0 else (1.5, 0.0)
        (r0, log0), (r1, log1) = run_group(
            _allreduce_worker, round_no, port=port, extra_env=agent_env, delays=delays
        )
        assert r0["sum"] == r1["sum"] == [3.0, 2.0 * round_no], f"round {round_no}"
        assert r0["world"] == r1["world"] == 2
        gen = _generation(log0)
        assert _generation(log1) == gen, f"round {round_no}: ranks disagree on the generation"
        generations.append(gen)
        # The previous attempts' keys really are still there for the next round to trip over.
        assert store.check(["bootstrap/hello/1"])
        assert store.num_keys() > 0
    assert len(set(generations)) == 3, f"a restart reused a namespace: {generations}"


def test_stale_hello_nonce_from_dead_attempt(agent_store):
    store, port = agent_store
    agent_env = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    # A dead attempt's rank 1 posted its nonce (and maybe got an answer) before everything died.
    dead_nonce, dead_generation = uuid.uuid4().hex, uuid.uuid4().hex
    store.set("bootstrap/hello/1", dead_nonce)
    store.set(f"bootstrap/answer/{dead_nonce}", dead_generation)
    store.set(f"pg/{dead_generation}/rank_0", "127.0.0.1:1")  # junk under the dead namespace
    # Rank 1 starts late, so the new rank 0 sees (and answers) the stale nonce first.
    (r0, log0), (r1, log1) = run_group(
        _allreduce_worker, 7, port=port, extra_env=agent_env, delays=(0.0, 1.5)
    )
    assert r0["sum"] == r1["sum"] == [3.0, 14.0]
    gen = _generation(log0)
    assert _generation(log1) == gen
    assert not dead_generation.startswith(gen)
    assert store.get("bootstrap/hello/1").decode() != dead_nonce


# -- (c) resume: rank 0 decides, every rank restores the same checkpoint ----------------------------


def _tiny_state(seed: int):
    from train.config import ModelConfig, OptimConfig
    from train.lm.model import GPT
    from train.sampler import GlobalSampler
    from train.state import TrainState
    from train.step import build_optimizer, lr_schedule

    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, dropout=0.0), 8)
    optim_cfg = OptimConfig(warmup_steps=2)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(optim_cfg, 100))
    return TrainState(model, optimizer, scheduler, GlobalSampler(64, 1337))


def _train_a_little(state, steps: int) -> None:
    from train.lm import lm_loss
    from train.sampler import plan_batches

    plan = plan_batches(8, WORLD, None)
    for _ in range(steps):
        tokens = torch.randint(0, 256, (4, 9))
        lm_loss(state.model, (tokens[:, :-1], tokens[:, 1:])).backward()
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.sampler.advance(plan)
        state.step += 1


def _manager(run_dir: str):
    from train.ckpt.manager import CheckpointManager
    from train.ckpt.storage import LocalStorage

    return CheckpointManager(LocalStorage(Path(run_dir) / "checkpoints"), keep=3)


def _save_on_rank0(env, state, run_dir: str) -> None:
    files = Snapshots(state).take(env.device, env.rank == 0)  # collective
    if env.rank == 0:
        assert files is not None
        _manager(run_dir).save(state.step, files(), {"fingerprint": FINGERPRINT, "world_size": WORLD})
    else:
        assert files is None
    dist.barrier()


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _resume_worker(env, run_dirs: list[str], empty_dirs: list[str]) -> dict:
    from train.errors import IncompatibleCheckpointError
    from train.checkpointing.resume import resume

    # Different weights per rank, trained differently: only rank 0's state gets saved.
    state = _tiny_state(seed=10 + env.rank)
    _train_a_little(state, steps=3 + env.rank)
    _save_on_rank0(env, state, run_dirs[0])

    fresh = _tiny_state(seed=500 + env.rank)  # a restarted process: new weights, step 0
    before = safetensors.torch.save(fresh.model.state_dict())
    resumed = resume(_manager(run_dirs[env.rank]), fresh, env, FINGERPRINT, reads=env.rank == 0)
    out: dict[str, Any] = {
        "resumed": resumed and vars(resumed),
        "step": fresh.step,
        "cursor": fresh.sampler.cursor,
        "last_epoch": fresh.scheduler.last_epoch,
        "weights_before": before,
        "weights": safetensors.torch.save(fresh.model.state_dict()),
        "optim": _to_bytes(fresh.optimizer.state_dict()),
        "own_dir": sorted(p.name for p in (Path(run_dirs[env.rank]) / "checkpoints").glob("step_*")),
    }
    # A checkpoint from another config: every rank fails the same way (no rank left hanging).
    try:
        resume(
            _manager(run_dirs[env.rank]), _tiny_state(seed=1), env, "another-fingerprint", reads=env.rank == 0
        )
        out["mismatch"] = "no error"
    except IncompatibleCheckpointError as e:
        out["mismatch"] = str(e)
    # Nothing on rank 0's side: every rank starts fresh, whatever the others' dirs hold.
    untouched = _tiny_state(seed=2)
    out["none"] = resume(_manager(empty_dirs[env.rank]), untouched, env, FINGERPRINT, reads=env.rank == 0)
    out["none_step"] = untouched.step
    return out


def test_resume_agrees_across_ranks(tmp_path):
    run_dirs = [str(tmp_path / "rank0-run"), str(tmp_path / "rank1-run")]
    # The fresh-start case: rank 0 has nothing; rank 1 has a checkpoint that must be ignored.
    empty_dirs = [str(tmp_path / "empty0"), run_dirs[0]]
    (r0, _), (r1, _) = run_group(_resume_worker, run_dirs, empty_dirs)

    ckpt = Path(run_dirs[0]) / "checkpoints" / "step_00000003"
    saved = safetensors.torch.load_file(str(ckpt / "model.safetensors"))
    assert r0["weights_before"] != r1["weights_before"]  # the test means something
    for r in (r0, r1):
        assert r["resumed"]["step"] == 3
        assert r["resumed"]["path"] == str(ckpt)
        assert (r["step"], r["cursor"], r["last_epoch"]) == (3, 24, 3)
        weights = safetensors.torch.load(r["weights"])
        assert weights.keys() == saved.keys()
        for k in saved:
            assert torch.equal(weights[k], saved[k]), k
        assert "another-fingerprint" in r["mismatch"] and FINGERPRINT in r["mismatch"]
        assert r["none"] is None and r["none_step"] == 0
    assert r0["resumed"] == r1["resumed"]
    # One filesystem: rank 1 read and verified rank 0's copy itself; nothing crossed the network.
    assert r0["resumed"]["received_by"] == []
    assert r0["weights"] == r1["weights"]
    o0 = torch.load(io.BytesIO(r0["optim"]), weights_only=True)
    o1 = torch.load(io.BytesIO(r1["optim"]), weights_only=True)
    assert o0["state"].keys() == o1["state"].keys() and o0["state"]
    for pid, s in o0["state"].items():
        for key, value in s.items():
            assert torch.equal(value, o1["state"][pid][key]), (pid, key)
    # Rank 1 read nothing from its own (empty) dir and wrote nothing there.
    assert r1["own_dir"] == []
    assert r0["own_dir"] == ["step_00000003"]


# -- (d) every rank's RNG streams are checkpointed and come back to the right rank -------------------


def _draw() -> dict:
    return {
        "torch": torch.rand(4).tolist(),
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist() if np is not None else None,
    }


def _rng_worker(env, run_dir: str) -> dict:
    from train import rng
    from train.checkpointing.resume import resume

    state = _tiny_state(seed=3)
    rng.seed_all(1337 + 1000 * env.rank)
    _draw()  # move the streams away from their seeds
    captured = _to_bytes(rng.capture())
    _save_on_rank0(env, state, run_dir)  # snapshot happens right here, on both ranks
    expected = _draw()
    for _ in range(5):  # what the run did after the checkpoint, then it died
        _draw()
    torch.randn(1000)
    resume(_manager(run_dir), state, env, FINGERPRINT, reads=env.rank == 0)
    return {"captured": captured, "expected": expected, "after_restore": _draw()}


def test_snapshot_keeps_every_ranks_rng(tmp_path):
    run_dir = str(tmp_path / "run")
    (r0, _), (r1, _) = run_group(_rng_worker, run_dir)

    for r in (r0, r1):
        assert r["after_restore"] == r["expected"]
    assert r0["expected"]["torch"] != r1["expected"]["torch"]
    assert r0["expected"]["python"] != r1["expected"]["python"]
    if np is not None:
        assert r0["expected"]["numpy"] != r1["expected"]["numpy"]

    train_pt = Path(run_dir) / "checkpoints" / "step_00000000" / "train.safetensors"
    saved = deserialize("train.safetensors", train_pt.read_bytes())["rng"]
    assert isinstance(saved, list) and len(saved) == WORLD
    for rank, r in enumerate((r0, r1)):
        captured = torch.load(io.BytesIO(r["captured"]), weights_only=True)
        assert torch.equal(saved[rank]["torch"], captured["torch"]), f"rank {rank}'s torch stream"
        assert saved[rank]["python"] == captured["python"], f"rank {rank}'s python stream"
        if np is not None:
            assert torch.equal(saved[rank]["numpy"]["keys"], captured["numpy"]["keys"])
    assert not torch.equal(saved[0]["torch"], saved[1]["torch"])


# -- (e) every node a replica: the newest checkpoint on any node wins ---------------------------------


def _replica_worker(env, run_dirs: list[str], shared_dir: str) -> dict:
    from train.checkpointing.replicas import layout
    from train.checkpointing.resume import resume

    # Two "nodes" of one rank each, each with its own run dir: node 1 got further (step 5) than
    # node 0 (step 3) - e.g. node 0 is a replacement that came back with an older disk.
    state = _tiny_state(seed=10 + env.rank)
    _train_a_little(state, steps=3 + 2 * env.rank)
    own = Path(run_dirs[env.rank])
    nodes = layout(own, env)
    writes = nodes.writes
    _manager(own).save(state.step, Snapshots(state).take(env.device, writes)(), {"fingerprint": FINGERPRINT})
    fresh = _tiny_state(seed=500 + env.rank)
    memory = [t.data_ptr() for t in fresh.model.state_dict().values()]
    resumed = resume(_manager(own), fresh, env, FINGERPRINT, reads=writes, shared=nodes.shared)
    return {
        "in_place": memory == [t.data_ptr() for t in fresh.model.state_dict().values()],
        "optim": _to_bytes(fresh.optimizer.state_dict()),
        "writes": writes,
        "shared_writes": layout(Path(shared_dir), env).writes,
        "resumed": resumed and vars(resumed),
        "step": fresh.step,
        "weights": safetensors.torch.save(fresh.model.state_dict()),
    }


def test_the_newest_checkpoint_on_any_node_is_the_one_every_rank_loads(tmp_path):
    run_dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    nodes = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "{rank}"}
    (r0, _), (r1, _) = run_group(_replica_worker, run_dirs, str(tmp_path / "shared"), extra_env=nodes)
    assert r0["writes"] and r1["writes"]  # separate run dirs: each node keeps its own copy
    assert (r0["shared_writes"], r1["shared_writes"]) == (True, False)  # a shared dir: rank 0 alone
    for r in (r0, r1):
        assert r["resumed"]["step"] == 5 and r["resumed"]["source_rank"] == 1 and r["step"] == 5
        # Node 0 holds only its older step 3; another node's run dir is another machine's disk
        # (run dirs not shared), so node 1 sends step 5 to node 0's rank, and to it alone.
        assert r["resumed"]["received_by"] == [0]
    assert r0["weights"] == r1["weights"]
    assert r0["in_place"]  # the receiver decoded the weights straight into its model's tensors
    o0, o1 = (torch.load(io.BytesIO(r["optim"]), weights_only=True) for r in (r0, r1))
    assert o0["state"].keys() == o1["state"].keys() and o0["state"]
    for pid, per_param in o1["state"].items():
        assert all(torch.equal(v, o0["state"][pid][k]) for k, v in per_param.items()), pid
    saved = safetensors.torch.load_file(
        str(Path(run_dirs[1]) / "checkpoints" / "step_00000005" / "model.safetensors")
    )
    loaded = safetensors.torch.load(r0["weights"])
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not (tmp_path / "shared").exists() or not list((tmp_path / "shared").glob(".node-*"))


def _run_id_worker(env, run_dirs: list[str]) -> dict:
    from train.checkpointing.local_tier import LocalTier, agree_run_id
    from train.checkpointing.resume import resume
    from train.config import CkptConfig

    own = Path(run_dirs[env.rank])
    rid = agree_run_id(own, env, keeps=True)
    tier = LocalTier(CkptConfig(local_interval=5, local_dir=str(own.parent / "local")), own, True, rid)
    assert tier.manager is not None
    state = _tiny_state(seed=10)
    _train_a_little(state, steps=3)
    writes = Snapshots(state).take(env.device, True)()
    _manager(str(own)).save(state.step, writes, {"fingerprint": FINGERPRINT, "run_id": rid})
    if env.rank == 1:  # a newer local copy in this run's directory, stamped by another run
        tier.manager.save(9, writes, {"fingerprint": FINGERPRINT, "run_id": "f" * 32})
    fresh = _tiny_state(seed=500)
    resumed = resume(_manager(str(own)), fresh, env, FINGERPRINT, True, tier.manager, False, own, rid)
    return {"rid": rid, "root": tier.manager.storage.location(""), "step": resumed and resumed.step}


def test_every_node_takes_rank_0s_run_id_and_no_other_runs_local_copy(tmp_path):
    run_dirs = [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")]
    # Node 1's run dir outlived an older run: its id, and that run's newer local checkpoint.
    stale = "e" * 32
    Path(run_dirs[1]).mkdir(parents=True)
    (Path(run_dirs[1]) / ".run-id").write_text(stale + "\n")
    (tmp_path / "node1" / "local" / stale / "step_00000099").mkdir(parents=True)
    nodes = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "{rank}"}
    (r0, _), (r1, lines) = run_group(_run_id_worker, run_dirs, extra_env=nodes)
    assert r0["rid"] == r1["rid"] != stale
    assert (Path(run_dirs[1]) / ".run-id").read_text().strip() == r0["rid"]
    assert r1["root"] == str(tmp_path / "node1" / "local" / r0["rid"])
    assert any("held run id " + stale in line for line in lines)
    # Rank 1's step 9 belongs to another run: both ranks take the durable step 3 instead.
    assert r0["step"] == r1["step"] == 3
    assert any("belongs to another run" in line for line in lines)
def _new_rank_0_worker(env, run_dirs: list[str], durable_id: str) -> dict:
    """Node 0 is a new machine (empty run dir); node 1 holds run X: its id, a durable step 3 stamped
    ``durable_id``, and a newer node-local step 5 stamped X."""
    from train.checkpointing.local_tier import LocalTier, agree_run_id
    from train.checkpointing.resume import resume
    from train.ckpt.manager import CheckpointManager
    from train.ckpt.storage import LocalStorage
    from train.config import CkptConfig

    own, run = Path(run_dirs[env.rank]), "a" * 32
    local = own.parent / "local"
    state = _tiny_state(seed=10)
    _train_a_little(state, steps=3)
    writes = Snapshots(state).take(env.device, True)()  # collective; staging of its own
    _train_a_little(state, steps=2)
    newer = Snapshots(state).take(env.device, True)()
    if env.rank == 1:
        own.mkdir(parents=True)
        (own / ".run-id").write_text(run + "\n")
        _manager(str(own)).save(3, writes, {"fingerprint": FINGERPRINT, "run_id": durable_id})
        meta = {"fingerprint": FINGERPRINT, "run_id": run}
        CheckpointManager(LocalStorage(local / run), keep=1).save(5, newer, meta)
    dist.barrier()
    rid = agree_run_id(own, env, keeps=True, durable=_manager(str(own)))
    tier = LocalTier(CkptConfig(local_interval=5, local_dir=str(local)), own, True, rid)
    fresh = _tiny_state(seed=500)
    resumed = resume(_manager(str(own)), fresh, env, FINGERPRINT, True, tier.manager, False, own, rid)
    return {"rid": rid, "file": (own / ".run-id").read_text().strip(), "step": resumed and resumed.step}


def test_a_new_rank_0_continues_the_run_the_other_nodes_and_its_durable_checkpoints_carry(tmp_path):
    nodes = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "{rank}"}
    run = "a" * 32
    dirs = [str(tmp_path / "x" / "node0" / "run"), str(tmp_path / "x" / "node1" / "run")]
    (r0, lines), (r1, _) = run_group(_new_rank_0_worker, dirs, run, extra_env=nodes)
    assert r0["rid"] == r1["rid"] == r0["file"] == r1["file"] == run
    assert r0["step"] == r1["step"] == 5  # node 1's node-local copy, newer than any durable one
    assert any("had no run id: continuing run " + run in line for line in lines)
    # Node 1's durable checkpoint is another run's: no proof that the job continues node 1's run
    # (it may be an old one, never wiped): rank 0's new id wins, node 1's local copy is not taken.
    dirs = [str(tmp_path / "y" / "node0" / "run"), str(tmp_path / "y" / "node1" / "run")]
    (r0, _), (r1, _) = run_group(_new_rank_0_worker, dirs, "b" * 32, extra_env=nodes)
    assert r0["rid"] == r1["rid"] == r1["file"] != run
    assert r0["step"] == r1["step"] == 3


