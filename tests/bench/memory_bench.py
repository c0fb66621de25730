"""Memory and time of moving a checkpoint, as ratios to the state's tensor bytes (make bench: M1-M3).

    python tests/bench/memory_bench.py save MB        rank 0 saving: peak RSS growth during a save
    torchrun --nproc_per_node=2 tests/bench/memory_bench.py resume MB DIR
                                                   rank 1 (a node without the checkpoint) receiving
                                                   it from rank 0, vs loading it from its own disk

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

from train.ckpt.manager import CheckpointManager  # noqa: E402
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


def build_state(mb: int, seed: int) -> TrainState:
    torch.manual_seed(seed)
    layers = max(1, round(mb * 1e6 / (3 * 4 * 2048 * 2049)))  # weights + 2 AdamW moments, fp32
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    model(torch.randn(2, 2048)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainState(model, optimizer, scheduler, GlobalSampler(100, 0))


def manager(root: Path) -> CheckpointManager:
    return CheckpointManager(LocalStorage(root / "checkpoints"), keep=2, files=CKPT_FILES)


def save(mb: int, root: Path) -> None:
    state = build_state(mb, 0)
    m = manager(root)
    for step in (1, 2):  # the first save allocates the staging buffers; later ones reuse them
        base = _reset_peak()
        m.save(step, state.snapshot(torch.device("cpu"), True)(), {"fingerprint": "bench"})
        growth = _status("VmHWM") - base
        print(json.dumps({"kind": "save", "save": step, "state_bytes": state.nbytes(), "growth": growth}))


def resume(mb: int, root: Path) -> None:
    from train import dist as distributed
    from train.resume import resume as resume_state

    env = distributed.setup("gloo", 120)
    try:
        # Rank 0 saves into its own dir; rank 1 (another "node", its dir empty) receives it.
        own = root / f"node{env.rank}"
        state = build_state(mb, env.rank)
        files = state.snapshot(env.device, env.rank == 0)  # collective
        if files is not None:
            manager(own).save(1, files(), {"fingerprint": "bench"})
        torch.distributed.barrier()
        fresh = build_state(mb, 100 + env.rank)
        base, t0 = _reset_peak(), time.perf_counter()
        resume_state(manager(own), fresh, env, "bench", reads=env.rank == 0)
        received = time.perf_counter() - t0
        growth = _status("VmHWM") - base
        torch.distributed.barrier()
        if env.rank == 1:
            # The same checkpoint from this rank's own disk (page cache warm), as a holder loads it.
            local = manager(root / "node0")
            fresh = build_state(mb, 200)
            base, t0 = _reset_peak(), time.perf_counter()
            loaded = local.load_latest(validate=lambda c: fresh.check(c.objects))
            assert loaded is not None
            fresh.restore(loaded.blobs, 0, 2, env.device)
            local_s = time.perf_counter() - t0
            local_growth = _status("VmHWM") - base
            row = {"kind": "resume", "state_bytes": fresh.nbytes(), "growth": growth, "received_s": received}
            print(json.dumps({**row, "local_s": local_s, "local_growth": local_growth}), flush=True)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    what, mb, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    save(mb, root) if what == "save" else resume(mb, root)


def measure(mb: int, work: Path, timeout: float = 600) -> dict:
    """Both measurements in fresh processes (what make bench calls); {"save": [...], "resume": {...}}."""
    import shutil
    import subprocess

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    me, env = str(Path(__file__).resolve()), {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, me, "save", str(mb), str(work / "save")]
    out = subprocess.run(run, capture_output=True, text=True, timeout=timeout, env=env, check=True).stdout
    saves = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = [*torchrun, me, "resume", str(mb), str(work / "resume")]
    out = subprocess.run(run, capture_output=True, text=True, timeout=timeout, env=env, check=True).stdout
    (received,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    shutil.rmtree(work, ignore_errors=True)
    return {"save": saves, "resume": received}
