"""P1 / P7 / P8 for one state size, in one process: ``python tests/bench/ckpt_bench.py --mb 50 --out F``.

State: a GPT from train.model sized to ``--mb`` MB of params + AdamW state (fp32), wrapped in a
TrainState built as train/trainer.py builds it (build_optimizer, LambdaLR, GlobalSampler), after one
optimizer step so that AdamW's state exists.

Each round measures, back to back (so load drifts hit all of them alike):
- memcpy: copy of every state tensor into preallocated, already-touched buffers (best of 3);
- compute: one small forward/backward of the model, alone;
- ours async: CheckpointWriter(background=True).save(...), then that forward/backward, then
  ``wait_staged()`` if the writer has it (a deferred snapshot copy must finish before the optimizer
  step): stall = time in save() + time in wait_staged(), as the training loop pays it; the
  forward/backward's own time is kept too (it shares the cores with the background save). Then
  wait(), untimed, so no save is in flight at the next sample. If the writer defers its copy, also
  "ours_async_no_overlap": save() + wait_staged() back to back (the copy paid in full);
- ours sync: CheckpointWriter(background=False).save(...);
- seed: torch.save({"model": sd, "optim": osd}, path) (then fsync, untimed, so its dirty pages do
  not spill into the next measurement);
- dcp: torch.distributed.checkpoint.async_save of get_state_dict(model, optimizer) until it returns
  (1-rank gloo group; its future is waited on, untimed).
A first round is a warm-up for every method and is not counted. Then P7 alternates resume loads
(CheckpointManager.load_latest() + TrainState.restore) with plain reads of the same files, with the
page cache warm and (posix_fadvise DONTNEED on those files first) cold; and, as a restarted job
resumes, once per fresh process (``--fresh``: build the model and optimizer, then time one load, or
one plain read, or the bare readinto our load uses, of the warm files), alternating. P8 compares the bytes on
disk of one checkpoint with the tensors' bytes. Writes a JSON of every sample to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402

from train import config  # noqa: E402
from train.checkpointing.snapshot import Snapshots, restore  # noqa: E402
from train.ckpt.manager import CheckpointManager, decode  # noqa: E402
from train.ckpt.storage import LocalStorage, fsync_path  # noqa: E402
from train.ckpt.writer import CheckpointWriter  # noqa: E402
from train.lm import lm_loss  # noqa: E402
from train.lm.model import GPT  # noqa: E402
from train.sampler import GlobalSampler  # noqa: E402
from train.state import TrainState  # noqa: E402
from train.step import build_optimizer, lr_schedule  # noqa: E402

BYTES_PER_PARAM = 12  # fp32 weight + AdamW exp_avg + exp_avg_sq
CPU = torch.device("cpu")


def model_config(mb: float, seq_len: int) -> config.ModelConfig:
    """A GPT config whose params + AdamW state come closest to ``mb`` MB."""
    n_embd = 256 if mb < 200 else 768
    per_block = 12 * n_embd * n_embd + 13 * n_embd
    fixed = 2 * 256 * n_embd + seq_len * n_embd + 2 * n_embd
    n_layer = max(1, round((mb * 1e6 / BYTES_PER_PARAM - fixed) / per_block))
    return config.ModelConfig(n_layer=n_layer, n_head=4, n_embd=n_embd, dropout=0.1)


def build_state(mb: float, stepped: bool = True) -> tuple[config.Config, TrainState]:
    """``stepped``: after one optimizer step (AdamW state exists); else as a job starts."""
    cfg = config.Config()
    cfg.model = model_config(mb, cfg.data.seq_len)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model, cfg.data.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.optim, cfg.max_steps))
    state = TrainState(model, optimizer, scheduler, GlobalSampler(100_000, cfg.seed))
    if not stepped:
        return cfg, state
    x = torch.randint(0, 256, (2, 33))
    lm_loss(model, (x[:, :-1], x[:, 1:])).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step = 1
    return cfg, state


def state_tensors(state: TrainState) -> list[torch.Tensor]:
    out = [t for t in state.model.state_dict().values() if isinstance(t, torch.Tensor)]
    for per_param in state.optimizer.state.values():
        out += [t for t in per_param.values() if isinstance(t, torch.Tensor)]
    return out


def drop_cache(files: list[Path]) -> None:
    """Evict just these (clean, fsynced) files from the page cache."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_stall(
    writer: CheckpointWriter,
    step: int,
    snapshot: Callable[[], object],
    meta: dict,
    compute: Callable[[], object] | None,
) -> tuple[float, float]:
    """(seconds the caller is blocked by one save, seconds ``compute`` took meanwhile).

    As in train/trainer.py: ``save()``, then the next step's forward/backward (``compute``), then,
    if the writer defers its copy, ``wait_staged()`` before the optimizer would change the state.
    Blocked time = time in save() + time in wait_staged(). Without ``compute`` the deferred copy has
    nothing to overlap with and is paid for in full.
    """
    t0 = time.perf_counter()
    writer.save(step, snapshot, meta)  # type: ignore[arg-type]
    blocked = time.perf_counter() - t0
    compute_s = timed(compute) if compute is not None else 0.0
    wait_staged = getattr(writer, "wait_staged", None)
    if wait_staged is not None:
        blocked += timed(wait_staged)
    return blocked, compute_s


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fresh_sample(mb: float, root: Path, what: str) -> float:
    """One resume as a restarted job does it, in this fresh process: the model and optimizer are
    built (no optimizer state yet), then either load_latest() + restore() or a plain read of the
    same files is timed. Both pay this process's first touch of the memory they fill."""
    _, state = build_state(mb, stepped=False)
    storage = LocalStorage(root)
    files = sorted(f for f in Path(storage.location(storage.names()[-1])).iterdir() if f.is_file())
    if what == "read":
        return timed(lambda: [f.read_bytes() for f in files])
    if what == "readinto":  # the read our load does, alone: no checksum, no restore
        return timed(lambda: [storage.read(f.parent.name, f.name) for f in files])

    def load() -> None:
        loaded = CheckpointManager(storage, keep=2).load_latest()
        assert loaded is not None
        restore(state, decode(loaded.blobs), 0, 1)

    return timed(load)


def fresh_rounds(mb: float, root: Path, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"load_fresh": [], "read_fresh": [], "readinto_fresh": []}
    for _ in range(rounds):
        for what in ("load", "read", "readinto"):
            cmd = [sys.executable, __file__, "--mb", str(mb), "--fresh", str(root), "--what", what]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
            out[f"{what}_fresh"].append(float(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=float, required=True)
    p.add_argument("--fresh", help="(internal) time one resume of the checkpoints under this dir")
    p.add_argument("--what", choices=["load", "read", "readinto"], default="load")
    p.add_argument("--fresh-rounds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--load-rounds", type=int, default=5)
    p.add_argument("--cold-rounds", type=int, default=2)
    p.add_argument("--dir", help="scratch directory (deleted afterwards)")
    p.add_argument("--out")
    args = p.parse_args()
    if args.fresh:
        print(fresh_sample(args.mb, Path(args.fresh), args.what))
        return
    if not (args.dir and args.out):
        p.error("--dir and --out are required")

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    cfg, state = build_state(args.mb)
    snapshots = Snapshots(state)  # staging buffers reused from save to save, as in a job
    tensors = state_tensors(state)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    meta = {"world_size": 1, "fingerprint": "bench", "config": config.to_dict(cfg)}
    bufs = [torch.empty_like(t) for t in tensors]

    def memcpy() -> None:
        for b, t in zip(bufs, tensors, strict=True):
            b.copy_(t)

    tokens = torch.randint(0, 256, (1, 65), generator=torch.Generator().manual_seed(0))

    def compute() -> None:  # a forward/backward: what a deferred snapshot copy overlaps with
        lm_loss(state.model, (tokens[:, :-1], tokens[:, 1:])).backward()
        state.model.zero_grad(set_to_none=True)

    def writer(name: str, background: bool) -> CheckpointWriter:
        return CheckpointWriter(CheckpointManager(LocalStorage(work / name), keep=2), background)

    writers = {"ours_async": writer("async", True), "ours_sync": writer("sync", False)}
    if hasattr(CheckpointWriter, "wait_staged"):  # the copy is deferred: also time it not overlapped
        writers["ours_async_no_overlap"] = writer("async_no_overlap", True)
    seed_file = work / "seed.pt"
    samples: dict[str, list[float]] = {}
    step = state.step
    for r in range(args.rounds + 1):
        step += 1
        row = {"memcpy": min(timed(memcpy) for _ in range(3)), "compute": timed(compute)}
        for name, w in writers.items():
            overlap = compute if name == "ours_async" else None
            row[name], compute_s = save_stall(w, step, lambda: snapshots.take(CPU, True), meta, overlap)
            if overlap is not None:
                row["compute_during_save"] = compute_s
            w.wait()
        row["seed"] = timed(
            lambda: torch.save(
                {"model": state.model.state_dict(), "optim": state.optimizer.state_dict()}, seed_file
            )
        )
        fsync_path(seed_file)
        dcp_dir = work / f"dcp_{step}"
        box = {}

        def dcp_save(d: Path = dcp_dir, box: dict = box) -> None:
            msd, osd = get_state_dict(state.model, state.optimizer)
            box["future"] = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(d))

        row["dcp"] = timed(dcp_save)
        future = box["future"]
        (future.upload_completion if hasattr(future, "upload_completion") else future).result()
        shutil.rmtree(work / f"dcp_{step - 1}", ignore_errors=True)
        if r > 0:  # round 0 warms every method up (first-touch buffers, lazy imports)
            for k, v in row.items():
                samples.setdefault(k, []).append(v)
        shown = " ".join(f"{k}={v * 1e3:.0f}ms" for k, v in row.items())
        print(f"  [{args.mb:g} MB] round {r}: {shown}", file=sys.stderr, flush=True)

    seed_bytes = seed_file.stat().st_size
    dcp_bytes = dir_bytes(work / f"dcp_{step}")

    # P8 and P7 on our newest checkpoint.
    storage = LocalStorage(work / "async")
    ckpt_dir = Path(storage.location(storage.names()[-1]))
    files = sorted(f for f in ckpt_dir.iterdir() if f.is_file())
    ckpt_bytes = sum(f.stat().st_size for f in files)

    def load() -> None:
        loaded = CheckpointManager(storage, keep=2).load_latest()
        assert loaded is not None and loaded.name == ckpt_dir.name
        restore(state, decode(loaded.blobs), 0, 1)

    def read() -> None:
        for f in files:
            f.read_bytes()

    load_s: dict[str, list[float]] = {"load": [], "read": [], "load_cold": [], "read_cold": []}
    load()  # warm-up
    read()
    for _ in range(args.load_rounds):
        load_s["load"].append(timed(load))
        load_s["read"].append(timed(read))
    for _ in range(args.cold_rounds):
        drop_cache(files)
        load_s["load_cold"].append(timed(load))
        drop_cache(files)
        load_s["read_cold"].append(timed(read))

    load_s.update(fresh_rounds(args.mb, work / "async", args.fresh_rounds))

    dist.destroy_process_group()
    med = {k: statistics.median(v) for k, v in {**samples, **load_s}.items() if v}
    result = {
        "mb": args.mb,
        "model": config.to_dict(cfg)["model"],
        "tensor_bytes": tensor_bytes,
        "ckpt_bytes": ckpt_bytes,
        "ckpt_files": {f.name: f.stat().st_size for f in files},
        "seed_bytes": seed_bytes,
        "dcp_bytes": dcp_bytes,
        "memcpy_best": min(samples["memcpy"]),
        "median": med,
        "best": {k: min(v) for k, v in {**samples, **load_s}.items() if v},
        "samples": {**samples, **load_s},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
