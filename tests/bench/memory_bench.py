"""Memory and time of moving a checkpoint, as ratios to the state's tensor bytes (make bench: M1-M3).

    python tests/bench/memory_bench.py save MB        rank 0 saving: peak RSS growth during a save
    torchrun --nproc_per_node=2 tests/bench/memory_bench.py resume MB DIR
                                                   rank 1 (a node without the checkpoint) receiving
                                                   it from rank 0, whose DIR/node0 save() wrote
    python tests/bench/memory_bench.py local MB DIR  the same checkpoint loaded from its own disk
    torchrun --nproc_per_node=R tests/bench/memory_bench.py node|nodesent MB DIR
                                                   R ranks of one node resuming from DIR/node0 (X2):
                                                   each rank's peak beyond what it holds after;
                                                   nodesent: the leader sends it to the others
    python tests/bench/memory_bench.py s3save|s3load MB URL
                                                   the same to / from a --ckpt.dir URL (S4)

Peak RSS is the kernel's high-water mark (VmHWM), reset right before the measured part
(/proc/self/clear_refs), so earlier peaks (the optimizer step's temporaries) do not hide it. The
state: a stack of 2048x2048 linear layers and its AdamW moments, MB of it in all. Prints one JSON
line per measurement.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from train.checkpointing.snapshot import Snapshots  # noqa: E402
from train.ckpt.manager import CheckpointManager  # noqa: E402
from train.ckpt.objstore import open_storage  # noqa: E402
from train.ckpt.storage import LocalStorage  # noqa: E402
from train.sampler import GlobalSampler  # noqa: E402
from train.state import CKPT_FILES, TrainState  # noqa: E402


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def emit(row: dict) -> None:
    """One JSON line in one write: two ranks share the stdout pipe, and print() may split a line
    in two writes that the other rank's line lands between (the parent then reads ``{..}{..}``)."""
    os.write(sys.stdout.fileno(), (json.dumps(row) + "\n").encode())


def build_state(mb: int, seed: int, stepped: bool = True) -> TrainState:
    """``stepped``: as after training (AdamW's moments exist); else as a restarted process has it
    when it resumes - the model built, the optimizer without state yet."""
    torch.manual_seed(seed)
    layers = max(1, round(mb * 1e6 / (3 * 4 * 2048 * 2049)))  # weights + 2 AdamW moments, fp32
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    if stepped:
        model(torch.randn(2, 2048)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainState(model, optimizer, scheduler, GlobalSampler(100, 0))


def manager(root: Path) -> CheckpointManager:
    return CheckpointManager(LocalStorage(root / "checkpoints"), keep=2, files=CKPT_FILES)


def save(mb: int, root: Path, m: CheckpointManager | None = None, kind: str = "save") -> None:
    state = build_state(mb, 0)
    m = m or manager(root)
    snapshots = Snapshots(state)
    for step in (1, 2):  # the first save allocates the staging buffers; later ones reuse them
        base = _reset_peak()
        m.save(step, snapshots.take(torch.device("cpu"), True)(), {"fingerprint": "bench"})
        growth = _status("VmHWM") - base
        emit({"kind": kind, "save": step, "state_bytes": state.nbytes(), "growth": growth})


def _bytes_of(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.safetensors"))


def _warm(nbytes: int) -> None:
    """Touch and free ``nbytes``: in a VM, memory the guest has not used lately costs a host
    fault per 4 KiB page on first touch (~3 us here, 1.5 s per GB; not so on bare metal), and
    freed memory goes back to the host within seconds. Whichever process of M3 happened to get
    such pages would look slow, so each touches what it is about to need right before it is
    timed. (The guest's own first-touch faults, which bare metal pays too, still count.)"""
    import numpy as np

    np.ones(nbytes, dtype=np.uint8)


def _side(index: int) -> None:
    """Keep this process to the cores of "machine" ``index``: BENCH_CORES_PER_SIDE of them (1 here,
    where there are 2 in all; on a bigger machine more, so that a sender's read and its sending,
    which one core must do one after the other, can overlap)."""
    cores = int(os.environ.get("BENCH_CORES_PER_SIDE", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[(index * cores + i) % len(cpus)] for i in range(cores)})


def resume(mb: int, root: Path) -> None:
    import dataclasses

    from train.checkpointing.resume import resume as resume_state
    from train.runtime import dist as distributed

    env = distributed.setup("gloo", 120)
    # Two "nodes" on this machine: rank 0's run dir (where save() wrote) is not rank 1's (no shared
    # filesystem), and each has cores of its own (the sender's reading and sending must not slow
    # the receiver).
    env = dataclasses.replace(env, node=env.rank)
    _side(env.rank)
    try:
        own = root / f"node{env.rank}"
        fresh = build_state(mb, 100 + env.rank, stepped=False)
        _warm(_bytes_of(own.parent / "node0"))  # twice a checkpoint: it holds two
        torch.distributed.barrier()
        base, t0 = _reset_peak(), time.perf_counter()
        resume_state(manager(own), fresh, env, "bench", reads=env.rank == 0, shared=False)
        received = time.perf_counter() - t0
        growth = _status("VmHWM") - base
        wire = _wire(_bytes_of(own.parent / "node0") // 2)
        if env.rank == 1:
            row = {"kind": "resume", "growth": growth, "received_s": received, "wire_s": wire}
            emit(row)
    finally:
        distributed.teardown()


def node(mb: int, root: Path, sent: bool = False) -> None:
    """Every rank of one node resuming the checkpoint save() wrote to root/node0 (rank 0 writes
    there, as in the job; the node's other ranks read the same file, or with ``sent`` get it from
    rank 0 over the node's group, as where the copy is in a bucket or on a network filesystem).
    Each rank prints its peak RSS beyond what it holds once resumed (the optimizer's moments it
    did not have before)."""
    from train.checkpointing import fetch
    from train.checkpointing.resume import resume as resume_state
    from train.runtime import dist as distributed

    if sent:  # the node's disk taken for one a network serves: its leader must pass the bytes on
        fetch.direct = lambda roles, leader: False
    env = distributed.setup("gloo", 120)
    try:
        fresh = build_state(mb, 100 + env.rank, stepped=False)
        _warm(_bytes_of(root / "node0"))
        torch.distributed.barrier()
        base = _reset_peak()
        resumed = resume_state(
            manager(root / "node0"), fresh, env, "bench", reads=env.rank == 0, shared=False
        )
        assert resumed is not None, "nothing resumed"
        row = {"kind": "node", "rank": env.rank, "excess": _status("VmHWM") - _status("VmRSS")}
        row |= {"growth": _status("VmHWM") - base, "state_bytes": fresh.nbytes(), "seconds": resumed.seconds}
        emit(row)
    finally:
        distributed.teardown()


def _wire(nbytes: int) -> float:
    """The medium alone: ``nbytes`` broadcast from rank 0 to rank 1 as train/checkpointing/stream.py cuts them
    (its chunks, its window), from and into warm memory - no disk, no checksum, no decoding."""
    import numpy as np

    from train.checkpointing import stream

    ring = [np.ones(stream.CHUNK, dtype=np.uint8) for _ in range(stream.RING)]
    flying = []
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for index, start in enumerate(range(0, nbytes, stream.CHUNK)):
        chunk = torch.from_numpy(ring[index % len(ring)][: min(stream.CHUNK, nbytes - start)])
        flying.append(torch.distributed.broadcast(chunk, 0, async_op=True))
        while len(flying) > stream.WINDOW:
            flying.pop(0).wait()
    for work in flying:
        work.wait()
    took = time.perf_counter() - t0
    torch.distributed.barrier()
    return took


def local(mb: int, root: Path) -> None:
    """The same checkpoint loaded from this process's own disk (a fresh process, as on a restart:
    what a rank of a node that holds it does)."""
    from train.checkpointing.resume import resume as resume_state
    from train.runtime.dist import DistEnv

    _side(1)  # the receiver's cores: both sides of M3 get the same
    fresh = build_state(mb, 200, stepped=False)
    _warm(_bytes_of(root / "node0"))
    cpu = torch.device("cpu")
    base, t0 = _reset_peak(), time.perf_counter()
    resume_state(manager(root / "node0"), fresh, DistEnv(0, 1, 0, cpu, None, 0), "bench", reads=True)
    emit({"kind": "local", "local_s": time.perf_counter() - t0, "local_growth": _status("VmHWM") - base})


def s3save(mb: int, url: str) -> None:
    """As save(), to a --ckpt.dir URL (S1-S4: the AWS_* variables come from the caller)."""
    save(mb, Path(), CheckpointManager(open_storage(url), keep=2, files=CKPT_FILES), kind="s3save")


def s3load(mb: int, url: str) -> None:
    """As local(), from a --ckpt.dir URL: a fresh process resuming from the bucket."""
    from train.checkpointing.resume import resume as resume_state
    from train.runtime.dist import DistEnv

    fresh = build_state(mb, 200)
    storage = open_storage(url)
    # The client's set-up (botocore's service model: a fixed cost, once per process; the job's
    # start-up check pays it) is measured apart from the transfer.
    base = _reset_peak()
    if hasattr(storage, "probe"):
        storage.probe()
    client = _status("VmHWM") - base
    m = CheckpointManager(storage, keep=2, files=CKPT_FILES)
    env = DistEnv(0, 1, 0, torch.device("cpu"), None, 0)
    base, t0 = _reset_peak(), time.perf_counter()
    resume_state(m, fresh, env, "bench", reads=True, run_dir=Path(os.devnull))
    row = {"kind": "s3load", "load_s": time.perf_counter() - t0, "growth": _status("VmHWM") - base}
    row["client_growth"] = client
    emit({**row, "state_bytes": fresh.nbytes()})


if __name__ == "__main__":
    what, mb, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if what.startswith("s3"):
        {"s3save": s3save, "s3load": s3load}[what](mb, where)
    else:
        sent = lambda mb, root: node(mb, root, sent=True)  # noqa: E731
        run = {"save": save, "resume": resume, "local": local, "node": node, "nodesent": sent}[what]
        run(mb, Path(where))


def measure(mb: int, work: Path, rounds: int = 5, timeout: float = 600) -> dict:
    """Every measurement in fresh processes (what make bench calls); M2/M3 alternate ``rounds``
    times and their medians go in the table: {"save": [...], "resume": {...}, "rounds": [...]}."""
    import shutil
    import statistics
    import subprocess

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    me, env = str(Path(__file__).resolve()), {**os.environ, "OMP_NUM_THREADS": "1"}

    def rows(launcher: list[str], what: str, where: Path) -> list[dict]:
        cmd = [*launcher, me, what, str(mb), str(where)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=True)
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    saves = rows([sys.executable], "save", work / "save")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    measured = []
    for r in range(rounds):
        where = work / f"resume{r}"
        saved = rows([sys.executable], "save", where / "node0")  # node 0's copy: steps 1 and 2
        (received,) = rows(torchrun, "resume", where)
        received["state_bytes"] = saved[-1]["state_bytes"]
        (loaded,) = rows([sys.executable], "local", where)
        measured.append(
            {
                **received,
                **loaded,
                "ratio": received["received_s"] / loaded["local_s"],
                "wire_ratio": received["wire_s"] / loaded["local_s"],
                "over_wire": received["received_s"] / received["wire_s"],
            }
        )
        shutil.rmtree(where, ignore_errors=True)
    nodes: dict = {"node": {}, "nodesent": {}}
    for what, ranks in [("node", 1), ("node", 2), ("node", 4), ("nodesent", 2), ("nodesent", 4)]:
        where = work / f"{what}{ranks}"  # X2: a node's memory at resume, whatever its ranks
        rows([sys.executable], "save", where / "node0")
        launcher = [*torchrun[:-1], f"--nproc_per_node={ranks}"]
        nodes[what][ranks] = rows(launcher, what, where)
        shutil.rmtree(where, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    median = {
        k: statistics.median(m[k] for m in measured)
        for k in ("growth", "received_s", "local_s", "ratio", "wire_s", "wire_ratio", "over_wire")
    }
    return {"save": saves, "resume": {**measured[0], **median}, "rounds": measured, "nodes": nodes}
