"""Resume a sharded run from a sharded checkpoint, at any world size: each rank reads the rows it
holds now (by byte range, verified by block), whatever shape wrote them.

Rank 0 lists the checkpoints once and names them to all (ranks never list on their own and pick
different ones). For each, newest first, every rank reads its rows on a thread while all meet in
short polls (together.py: no timeout cliff), then the ranks gather what went wrong: one rank's
problem makes the checkpoint unusable for all, and nothing was restored yet (the rows are read
into new tensors, put in place only once every rank has read and checked its part).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train import rng
from train.checkpointing import shards, together
from train.checkpointing.resume import RECORD_TAIL, Resumed
from train.checkpointing.together import Limit
from train.ckpt import manifest as mf
from train.ckpt import shards as fmt
from train.ckpt.manager import CheckpointManager, bytes_read
from train.errors import IncompatibleCheckpointError, StorageError
from train.observe import records
from train.runtime import comm
from train.runtime.dist import DistEnv
from train.state import MODEL_FILE, OPTIM_FILE, TRAIN_FILE, TrainState, fits

log = logging.getLogger("train")


class _Sharded:
    """A sharded checkpoint: rows by byte range from the files that hold them."""

    def __init__(self, manager: CheckpointManager, name: str, manifest: dict):
        self.reader = fmt.ShardReader(manager.storage, name, manifest)
        self.train = self.reader.read_file(TRAIN_FILE)
        if not isinstance(self.train, dict) or not isinstance(self.train.get("optim"), dict):
            raise mf.Problem(f"{TRAIN_FILE} holds no optimizer skeleton")
        held = manifest[fmt.LAYOUT]["tensors"]
        self.specs = {key: (spec["shape"], spec["dtype"]) for key, spec in held.items()}

    def read_rows(self, wants: dict[str, shards.Rows]) -> dict[str, torch.Tensor]:
        return self.reader.read_rows(wants)


class _Whole:
    """A DDP checkpoint (whole tensors in the model and optimizer files): every file is read and
    verified whole - once, when a run changes from ddp to a sharded mode."""

    def __init__(self, manager: CheckpointManager, name: str):
        decoded = {
            f: mf.deserialize(f, manager.read_file(name, f)) for f in (MODEL_FILE, OPTIM_FILE, TRAIN_FILE)
        }
        optim, weights = decoded[OPTIM_FILE], decoded[MODEL_FILE]
        if (
            not isinstance(optim, dict)
            or not isinstance(optim.get("state"), dict)
            or not isinstance(weights, dict)
            or not isinstance(decoded[TRAIN_FILE], dict)
            or not all(isinstance(v, torch.Tensor) for v in weights.values())
        ):
            raise mf.Problem(f"{OPTIM_FILE} or {MODEL_FILE} holds no state")
        self.tensors = {f"model/{k}": v for k, v in weights.items()}
        skeleton: dict[str, Any] = {"param_groups": optim.get("param_groups"), "state": {}}
        for index, per_param in optim["state"].items():
            if not isinstance(per_param, dict):
                raise mf.Problem(f"optimizer state for parameter {str(index)[:20]} is not a map")
            skeleton["state"][index] = {}
            for key, value in per_param.items():
                split = isinstance(value, torch.Tensor) and value.dim() >= 1
                if split:
                    self.tensors[f"optim/{index}/{key}"] = value
                skeleton["state"][index][key] = None if split else value
        self.train = {**decoded[TRAIN_FILE], "optim": skeleton}
        self.specs = {
            k: (list(t.shape), fmt.dtype_name(t.dtype))
            for k, t in self.tensors.items()
            if isinstance(t, torch.Tensor)
        }

    def read_rows(self, wants: dict[str, shards.Rows]) -> dict[str, torch.Tensor]:
        return {
            k: self.tensors[k][a:b] if self.tensors[k].dim() else self.tensors[k]
            for k, (a, b) in wants.items()
        }


class _Read:
    """This rank's part of one checkpoint, read and checked, not yet put in place."""

    def __init__(
        self,
        manager: CheckpointManager,
        name: str,
        state: TrainState,
        fingerprint: str,
        model: dict[str, torch.Tensor],
    ):
        """``model``: the model's tensors by key (shards.split(), taken on the main thread: FSDP2's
        state_dict hooks are no other thread's to run)."""
        manifest = manager.manifest(name)
        if manifest.get("fingerprint") != fingerprint:
            raise IncompatibleCheckpointError(
                f"checkpoint {manager.storage.location(name)} was written by a different model/config "
                f"(fingerprint {str(manifest.get('fingerprint'))[:20]} != {fingerprint}); resume with the "
                "original --task/--model/--data settings or use a new --run-dir"
            )
        source = _Sharded(manager, name, manifest) if fmt.is_sharded(manifest) else _Whole(manager, name)
        self.train = source.train
        saved = self.train.get("rng")
        if not isinstance(saved, list) or not saved:
            raise mf.Problem(f"{TRAIN_FILE} holds no RNG state")
        for streams in saved:
            rng.check(streams)
        _check_train(state, self.train)
        targets = dict(model)
        try:
            targets.update(shards.optim_targets(state, self.train["optim"]))
        except ValueError as e:
            raise mf.Problem(str(e)) from None
        if {k for k in source.specs if k.startswith("model/")} != {
            k for k in targets if k.startswith("model/")
        }:
            raise mf.Problem("its weights' names differ from this model's")
        for key, t in targets.items():
            shape, dtype = source.specs.get(key, (None, None))
            if shape != list(t.shape) or dtype != fmt.dtype_name(t.dtype):
                got = "none" if shape is None else f"{shape} {dtype}"
                raise mf.Problem(f"{key} is {got}, this job's is {list(t.shape)} {fmt.dtype_name(t.dtype)}")
        self.targets = targets
        self.rows = source.read_rows({k: shards.rows(t) for k, t in targets.items()})
        self.step = int(manifest["step"])
        if not isinstance(self.train.get("step"), int) or self.train["step"] != self.step:
            raise mf.Problem(
                f"{TRAIN_FILE} says step {str(self.train.get('step'))[:20]}, its manifest {self.step}"
            )

    @torch.no_grad()
    def restore(self, state: TrainState, env: DistEnv) -> None:
        for key, t in self.targets.items():
            if key.startswith("model/"):
                shards.local(t).copy_(self.rows[key])
        optim: dict[str, Any] = {"param_groups": self.train["optim"]["param_groups"], "state": {}}
        for index, per_param in self.train["optim"]["state"].items():
            optim["state"][int(index)] = {
                name: shards.like(self.targets[f"optim/{index}/{name}"], self.rows[f"optim/{index}/{name}"])
                if value is None
                else value
                for name, value in per_param.items()
            }
        state.optimizer.load_state_dict(optim)
        state.scheduler.load_state_dict(self.train["scheduler"])
        state.sampler.load_state_dict(self.train["sampler"])
        if state.scaler is not None and self.train.get("scaler") is not None:
            state.scaler.load_state_dict(self.train["scaler"])
        state.step = self.step
        saved = self.train["rng"]
        rng.restore(saved[env.rank % len(saved)], env.device)
        if len(saved) != env.world_size:
            log.warning(
                "checkpoint was written by %d ranks, now %d: resuming, but not bit-exact",
                len(saved),
                env.world_size,
            )


def _check_train(state: TrainState, train: dict[str, Any]) -> None:
    """ValueError unless a checkpoint's train file (and its optimizer skeleton) fits ``state``:
    everything restore() will take is checked before any of it is taken (no half restore)."""
    if not {"step", "scheduler", "sampler", "optim"} <= train.keys():
        raise ValueError(f"{TRAIN_FILE} lacks step, scheduler, sampler or optimizer state")
    state.sampler.check(train["sampler"])
    fits(train["scheduler"], state.scheduler.state_dict(), "the scheduler state")
    scaler = train.get("scaler")
    if (
        state.scaler is not None
        and scaler is not None
        and not (isinstance(scaler, dict) and all(isinstance(v, (int, float)) for v in scaler.values()))
    ):
        raise ValueError("the grad scaler state is not a map of numbers")
    optim = train["optim"]
    if not isinstance(optim.get("state"), dict):
        raise ValueError("the optimizer skeleton holds no state")
    fits(
        optim.get("param_groups"),
        state.optimizer.state_dict()["param_groups"],
        "an optimizer parameter group",
    )
    for index, per_param in optim["state"].items():
        for key, value in per_param.items() if isinstance(per_param, dict) else ():
            if value is not None and not (isinstance(value, torch.Tensor) and value.dim() == 0):
                raise ValueError(f"optimizer state {str(key)[:40]} of parameter {index} is not a 0-d tensor")


def _listed(manager: CheckpointManager, env: DistEnv, limit: Limit) -> list[tuple[str, str, int]]:
    """Collective: rank 0's listing, newest first: (name, "" or why it is not usable, its bytes). A root that
    cannot be listed ends the attempt on every rank (147), never a fresh start."""

    def look() -> str:
        try:
            manager.storage.clean_temporaries()
            return json.dumps({"found": [(i.name, i.reason, i.size) for i in manager.list()]})
        except OSError as e:
            return json.dumps({"error": f"{type(e).__name__}: {e}"})

    mine = together.run(look if env.rank == 0 else None, limit, "listing checkpoints") or ""
    said = json.loads(comm.all_gather_bytes(mine.encode(), env.device)[0])
    if "error" in said:
        where = manager.storage.location("")
        raise StorageError(f"cannot list the checkpoints in {where}: {said['error']}", echo=env.rank == 0)
    return [tuple(x) for x in said["found"]]


# The node-local tier (local_shards.py): its manager, the steps the nodes can restore from it, and
# the collective that completes one on every node for the rows its ranks read (-> "" or why not).
Local = tuple[CheckpointManager, list[Any], Callable[[Any, Limit], str]]


def needed_files(
    manager: CheckpointManager, name: str, state: TrainState, model: dict[str, torch.Tensor]
) -> list[str]:
    """The files of sharded checkpoint ``name`` that hold rows this rank holds now (and its train
    file); manifest.Problem if its manifest or train file cannot say."""
    manifest = manager.manifest(name)
    reader = fmt.ShardReader(manager.storage, name, manifest)
    skeleton = reader.read_file(TRAIN_FILE)
    targets = dict(model)
    try:
        targets.update(shards.optim_targets(state, skeleton["optim"]))
    except (ValueError, KeyError, TypeError) as e:
        raise mf.Problem(f"{TRAIN_FILE}: {str(e)[:200]}") from None
    files = {TRAIN_FILE}
    for key, t in targets.items():
        first, end = shards.rows(t)
        files.update(f for f, start, stop in reader.pieces.get(key, ()) if start < end and stop > first)
    return sorted(files)


def resume_sharded(
    manager: CheckpointManager,
    state: TrainState,
    env: DistEnv,
    fingerprint: str,
    run_dir: Path,
    limit: Limit,
    local: Local | None = None,
) -> Resumed | None:
    """Collective: restore ``state`` from the newest checkpoint every rank can read its part of.
    ``local``: the node-local tier (see Local)."""
    started = time.monotonic()
    model = {k: t for k, t in shards.split(state)[0].items() if k.startswith(fmt.MODEL)}
    skipped: list[str] = []
    candidates = [(manager, name, reason, size, None) for name, reason, size in _listed(manager, env, limit)]
    if local is not None:
        candidates += [(local[0], copy.name, "", copy.size, copy) for copy in local[1]]
    # Newest first; at one step the durable copy, which every rank reads where it is.
    candidates.sort(key=lambda c: (mf.step_of(c[1]) or -1, c[4] is None), reverse=True)
    for source, name, reason, size, copy in candidates:
        where = source.storage.location(name)
        if not reason and copy is not None and local is not None:
            reason = local[2](copy, dataclasses.replace(limit, nbytes=size))
        if not reason:
            before = bytes_read()

            def work(name: str = name, source: CheckpointManager = source) -> _Read:
                try:
                    return _Read(source, name, state, fingerprint, model)
                except (mf.Problem, IncompatibleCheckpointError):
                    raise
                except Exception as e:  # whatever bytes from elsewhere make the decoders raise
                    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    raise mf.Problem(first or type(e).__name__) from None

            try:
                read: _Read | None = together.run(
                    work, dataclasses.replace(limit, nbytes=size), f"reading checkpoint {name}"
                )
                reason = ""
            except (mf.Problem, OSError) as e:
                read, reason = None, str(e)
            except IncompatibleCheckpointError as e:  # every rank read the same manifest
                raise IncompatibleCheckpointError(str(e), echo=env.rank == 0) from None
            problems = comm.all_gather_bytes(reason.encode(), env.device)
            reason = next((f"rank {r}: {p.decode()}" for r, p in enumerate(problems) if p), "")
            if not reason:
                assert read is not None
                read.restore(state, env)
                if copy is None:  # verified as read: retention need not read it again
                    source.record(name, "")
                last = records.last_step(records.read(run_dir, limit=RECORD_TAIL)) if env.rank == 0 else 0
                said = comm.all_gather_bytes(f"{bytes_read() - before} {last}".encode(), env.device)
                pulled = [int(p.split()[0]) for p in said]
                lost = max(int(said[0].split()[1]) - read.step, 0)
                log.info(
                    "resumed from step %d (%s); %d completed step(s) lost, next step %d",
                    read.step,
                    where,
                    lost,
                    read.step + 1,
                )
                return Resumed(
                    read.step,
                    where,
                    lost,
                    skipped,
                    0,
                    [],
                    list(range(env.world_size)),
                    pulled_bytes=pulled,
                    seconds=time.monotonic() - started,  # after the last gather: the slowest rank's
                )
        if env.rank == 0:
            log.warning("checkpoint %s is not usable (%s); trying the next older one", where, reason)
            if copy is None:
                source.record(name, reason)
        skipped.append(name)
    return None
