"""The Checkpointer of a sharded run (``--parallel.mode fsdp|hsdp``): every rank saves its own rows.

A save is a two-phase commit over one temporary directory:
1. at the step boundary the ranks gather every rank's RNG streams (the save's one collective);
   each rank that writes a shard (under hsdp shard i's holder in replica group i mod R) copies
   its rows out, as a DDP save does, and its writer thread writes ``shard-<i>-of-<n>.safetensors``
   into the step's temporary directory - named by the step and a token the ranks agreed at start,
   so nobody need be asked at the step; made by whichever rank comes first - durable and read back. Rank 0's
   thread first takes that directory to commit (or finds the step committed already) and also
   writes the train file: step, scheduler, sampler, every rank's RNG;
2. once the ranks agree that no writer is busy (the step's all-reduce, as for every save), they
   gather what each wrote (file entries with block checksums, the rows of each tensor), and rank 0
   writes the manifest - every file and the layout - and renames the directory. A rank whose write
   failed says so in the gather: then nothing is committed, and a checkpoint that lacks a shard
   never exists.
The step loop pays for the copy of the rank's own rows; the writes run beside the next steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train import config
from train.checkpointing import replicas, shards, together
from train.checkpointing.boundary import Agreement
from train.checkpointing.checkpointer import Checkpointer, Events
from train.checkpointing.reshard import resume_sharded
from train.checkpointing.resume import Resumed
from train.checkpointing.shard_targets import BucketTarget, DirTarget
from train.checkpointing.sharded_local import ReplicatedLocalTier
from train.checkpointing.snapshot import Stager
from train.ckpt import hooks
from train.ckpt import manifest as mf
from train.ckpt import shards as fmt
from train.ckpt.storage import LocalStorage, Unreadable
from train.errors import ConfigError
from train.runtime import comm
from train.runtime.dist import DistEnv
from train.state import TRAIN_FILE, Files, TrainState

log = logging.getLogger("train")


class ShardedCheckpointer(ReplicatedLocalTier, Checkpointer):
    FILES = None  # the manifest lists the shard files; its layout says what each holds

    def __init__(
        self,
        cfg: config.Config,
        env: DistEnv,
        state: TrainState,
        fingerprint: str,
        events: Events,
        mesh_shape: tuple[int, ...],
    ):
        self.replica, self.shard_index = divmod(env.rank, mesh_shape[-1])
        self.shard_count = mesh_shape[-1]
        super().__init__(cfg, env, state, fingerprint, events)
        self.manager.streamed_checks = True
        self.meta["parallel"] = {"mode": cfg.parallel.mode, "mesh": list(mesh_shape)}
        self.writer.commit = self._write_mine
        self.stager = Stager()
        self._pending: Any = None  # rank 0: the temporary directory of the save in flight
        self._pending_step: int | None = None  # every rank: the step saved but not yet committed
        self._rows: dict[str, shards.Rows] = {}  # a writer's: what its shard file holds
        self._shapes: dict[str, tuple[list[int], torch.dtype]] = {}  # every split tensor's, whole
        # The attempt's part of every temporary directory's name: agreed now, so that a save's
        # ranks know where to write without asking anyone at the step (unguessable by others).
        self._token = comm.all_gather_bytes(uuid.uuid4().hex[:12].encode(), env.device)[0].decode()
        storage = self.manager.storage
        self.target = (
            DirTarget(storage, self._token)
            if isinstance(storage, LocalStorage)
            else BucketTarget(storage, self._token)  # type: ignore[arg-type]
        )
        self._init_local_tier(cfg)

    # -- who writes ----------------------------------------------------------------------------------
    def _layout(self, where: Path, remote: bool) -> replicas.Layout:
        seen = replicas.layout(where, self.env, remote=remote)
        if not seen.shared:
            raise ConfigError(
                f"multi-node --parallel.mode fsdp/hsdp needs a --ckpt.dir every node sees: {where} is "
                "each node's own, and a node lost would take its shards with it; use a shared "
                "filesystem"
            )
        # Under hsdp every replica group holds every shard: shard i is written by replica i mod R,
        # so that R nodes share a save's bytes instead of the first node writing them all.
        groups = self.env.world_size // self.shard_count
        return replicas.Layout(
            writes=self.replica == self.shard_index % groups, shared=True, local_writes=True
        )

    # -- saving ----------------------------------------------------------------------------------------
    def _snapshot(self, step: int, writes: bool) -> Callable[[], Files] | None:
        self._pending_step = step
        shard = self.target.shard_file(self.shard_index, self.shard_count)
        return self._rows_snapshot(writes, self.env.rank == 0, shard)

    def _rows_snapshot(self, writes: bool, train: bool, file: str) -> Callable[[], Files] | None:
        """Collective: this rank's rows to copy out as ``file`` (and the train file where ``train``)."""
        device = self.env.device
        # The save's one collective: every rank's RNG streams (the train file keeps them all).
        rng_states = self.snapshots.rng.start(device)
        if not writes:
            return None
        tensors, skeleton = shards.split(self.state)
        if self._shapes.keys() != tensors.keys():  # the first save (the layout is the run's)
            self._rows = {
                key: shards.rows(t)
                for key, t in tensors.items()
                if shards.is_split(t) or not self.shard_index  # whole: the first shard saves it
            }
            self._rows = {key: (a, b) for key, (a, b) in self._rows.items() if b > a}
            self._shapes = {key: (list(t.shape), t.dtype) for key, t in tensors.items()}
        mine = {
            key: shards.local(tensors[key]).reshape(-1)
            if not tensors[key].dim()
            else shards.local(tensors[key])
            for key in self._rows
        }
        # What FSDP left whole may be a buffer, which the forward changes: copied now (DDP's too).
        now = self.stager.stage({k: t for k, t in mine.items() if not shards.is_split(tensors[k])}, "now")
        later = {k: t for k, t in mine.items() if k not in now}
        small = None
        if train:
            small = self.stager.stage({**self.state.train_state(), "optim": skeleton}, "train")  # small: now

        def copy_rows() -> Files:  # on the writer's thread, before the next optimizer step
            staged = {**self.stager.stage(later, "rows"), **now}
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            if small is None:
                return {file: staged}
            return {file: staged, TRAIN_FILE: {**small, "rng": rng_states()}}

        return copy_rows

    def _claim(self, step: int) -> bool:
        """Rank 0, on its writer's thread: take the step to commit it later; False if the step is
        committed already (and verifies). OSError: this save failed."""
        manager, name = self.manager, mf.name_for(step)
        if name in manager.storage.names():
            # Rejected by this process (at resume, say) counts as invalid even if it verifies.
            problem = manager.known_problem(name) or _problem(manager, name)
            if not problem:
                log.info("checkpoint %s already exists and verifies; not rewriting it", name)
                return False
            moved = self.target.set_aside(name)
            log.warning("checkpoint %s did not verify (%s); moved it to %s", name, problem, moved)
        self._pending = self.target.claim(name)
        return True

    def _write_mine(self, step: int, files: Files, meta: dict[str, Any]) -> dict[str, Any]:
        """On the writer thread: this rank's files where the save's go; their entries."""
        hooks.context(save_step=step)
        if self.env.rank == 0 and not self._claim(step):
            return {"entries": {}, "rows": {}, "exists": True}
        target, entries = self.target.join(mf.name_for(step)), {}
        try:
            for file, obj in files.items():
                entries[file], pieces = fmt.encoded(file, obj)
                target.write(file, entries[file], pieces)
        finally:
            target.close()
        return {"entries": entries, "rows": self._rows}

    def _agree(
        self, mine: Agreement, loss: torch.Tensor | None = None, final: bool = False
    ) -> tuple[float, Agreement]:
        mean_loss, agreed = super()._agree(mine, loss, final)
        # Rank 0's commit failed: one more agreement, so that its policy counts it now, with every rank.
        if self._pending_step is not None and not agreed.saving and not self._commit():
            agreed = super()._agree(Agreement(), None, final)[1]
        if self._local_step is not None and not agreed.saving_local:
            self._commit_local()
        return mean_loss, agreed

    def _commit(self) -> bool:
        """Collective: phase 2 (see the module docstring); False if rank 0 could not commit."""
        step, self._pending_step = self._pending_step, None
        wrote = self.writer.result if self.layout.writes else {}
        said = {"error": "its shard was not written (see its log)"} if wrote is None else wrote
        parts = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(said).encode(), self.env.device)]
        pending, self._pending = self._pending, None
        work = (lambda: self._finish(step, pending, parts)) if self.env.rank == 0 else None
        # Retention re-checks the checkpoints it keeps (streamed, once per process): up to --ckpt.keep.
        limit = dataclasses.replace(self._limit, nbytes=self._limit.nbytes * self.cfg.keep)
        outcome = together.run(work, limit, f"committing the checkpoint of step {step}") or ""
        outcome = comm.all_gather_bytes(outcome.encode(), self.env.device)[0].decode()
        if outcome == "skipped":
            return True  # a rank's shard failed: that rank's policy counted it
        if outcome:
            if self.env.rank == 0:
                self.writer.fail(OSError(f"checkpoint of step {step} not committed: {outcome}"))
            return False
        self.writer.last_committed = step
        return True

    def _finish(self, step: int, pending: Any, parts: list[dict]) -> str:
        """Rank 0, under the save's limit: the manifest, checked as a reader will, then the rename
        and retention. "" when committed; "skipped" or why not otherwise."""
        failed = [r for r, p in enumerate(parts) if "error" in p]
        if parts[0].get("exists") or failed:
            if pending is not None:
                pending.abort()
            # What the ranks wrote: never a file of a checkpoint there (the target sees to it).
            files = [f for p in parts for f in p.get("entries", {})]
            self.target.abort(mf.name_for(step), files, claimed=pending is not None)
        if parts[0].get("exists"):
            return ""  # committed before (an earlier attempt's): nothing to do
        if failed:
            log.error(
                "checkpoint of step %d not committed: rank %d could not write its shard", step, failed[0]
            )
            return "skipped"
        entries = {f: e for p in parts for f, e in p.get("entries", {}).items()}
        problem = self._write_manifest(step, pending, entries, parts)
        if problem:
            return problem
        self.manager.committed(pending.name)
        log.info(
            "checkpoint %s committed (%d shard files)",
            self.manager.storage.location(pending.name),
            len(entries) - 1,
        )
        return ""

    def _write_manifest(self, step: int, pending: Any, entries: dict, parts: list[dict], **extra: str) -> str:
        """The manifest of a save (every file, the layout of what each rank wrote), checked as a
        reader will check it, then the commit; "" or why not (``pending`` aborted then)."""
        pieces = {
            f: {k: tuple(r) for k, r in p["rows"].items()}
            for p in parts
            for f in p.get("entries", {})
            if f != TRAIN_FILE
        }
        meta = {**self.meta, fmt.LAYOUT: fmt.layout(pieces, self._shapes), **extra}
        try:
            raw = mf.build_from(step, entries, meta, compact=True)
            fmt.check(mf.parse(raw, step))  # what a reader will refuse is never committed
            pending.write(mf.MANIFEST, raw)
            pending.commit()
        except (OSError, mf.Problem) as e:
            pending.abort()
            return str(e)
        return ""

    # -- resuming --------------------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        limit = self._load_limit()
        local = self._local_source(limit)
        return resume_sharded(
            self.manager, self.state, self.env, self.fingerprint, self.run_dir, limit, local
        )


def _problem(manager: Any, name: str) -> str:
    """ "" if an existing checkpoint verifies - every file's checksum streamed, nothing decoded or
    held (a sharded one is as big as the model) - and its layout (if any) is one a resume reads."""
    try:
        manifest = manager.manifest(name)
        if fmt.is_sharded(manifest):
            fmt.check(manifest)
        for file, entry in manifest["files"].items():
            if manager.storage.digest(name, file, entry["size"]) != entry["xxh3_64"]:
                return f"{file}: checksum mismatch (corrupt)"
    except mf.Problem as p:
        return str(p)
    except Unreadable as e:
        return f"{type(e).__name__}: {e}"
    return ""  # an OSError (a store that failed one request) fails this save, sets nothing aside
