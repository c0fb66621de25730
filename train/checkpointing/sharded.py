"""The Checkpointer of a sharded run (``--parallel.mode fsdp|hsdp``): every rank saves its own rows.

A save is a two-phase commit over one temporary directory:
1. at the step boundary the ranks gather every rank's RNG streams (the save's one collective);
   each rank that holds shards (the first replica group under hsdp) copies its rows out, as a DDP
   save does, and its writer thread writes ``shard-<i>-of-<n>.safetensors`` into the step's
   temporary directory - named by the step and a token the ranks agreed at start, so nobody need
   be asked at the step; made by whichever rank comes first - durable and read back. Rank 0's
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

import io
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train import config, rng
from train.checkpointing import local_shards, replicas, ring, shards, together
from train.checkpointing.boundary import Agreement
from train.checkpointing.checkpointer import Checkpointer, Events
from train.checkpointing.reshard import needed_files, resume_sharded
from train.checkpointing.resume import Resumed
from train.checkpointing.snapshot import Stager, to_bytes
from train.checkpointing.together import Limit
from train.ckpt import hooks
from train.ckpt import manifest as mf
from train.ckpt import shards as fmt
from train.ckpt.storage import TMP_PREFIX, LocalStorage
from train.errors import ConfigError
from train.runtime import comm
from train.runtime.dist import DistEnv
from train.state import TRAIN_FILE, Files, TrainState

log = logging.getLogger("train")


class ShardedCheckpointer(Checkpointer):
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
        if not isinstance(self.manager.storage, LocalStorage):
            raise ConfigError(
                f"--parallel.mode {cfg.parallel.mode} saves to a filesystem only for now (not a "
                "bucket); point --ckpt.dir at a directory every node sees"
            )
        self.meta["parallel"] = {"mode": cfg.parallel.mode, "mesh": list(mesh_shape)}
        self.writer.commit = self._write_mine
        self.stager = Stager()
        self._pending: Any = None  # rank 0: the temporary directory of the save in flight
        self._pending_step: int | None = None  # every rank: the step saved but not yet committed
        self._pending_name = ""
        self._rows: dict[str, shards.Rows] = {}  # a writer's: what its shard file holds
        self._shapes: dict[str, tuple[list[int], torch.dtype]] = {}  # every split tensor's, whole
        # The attempt's part of every temporary directory's name: agreed now, so that a save's
        # ranks know where to write without asking anyone at the step (unguessable by others).
        self._token = comm.all_gather_bytes(uuid.uuid4().hex[:12].encode(), env.device)[0].decode()
        # The node-local tier: each node its own ranks' shards and, past one node, its partner's.
        self.ring = ring.Ring(env.world_size, env.local_world_size, self.shard_count)
        self._ring_group = ring.group(env, cfg.dist.timeout_s) if cfg.ckpt.local_interval else None
        self._local_step: int | None = None  # the node-local save in flight, not yet committed
        self._local_pending: Any = None  # a node's first rank: that save's temporary directory
        if self.local.writer is not None:
            self.local.writer.commit = self._write_local

    # -- who writes ----------------------------------------------------------------------------------
    def _layout(self, where: Path, remote: bool) -> replicas.Layout:
        seen = replicas.layout(where, self.env, remote=remote)
        if not seen.shared:
            raise ConfigError(
                f"multi-node --parallel.mode fsdp/hsdp needs a --ckpt.dir every node sees: {where} is "
                "each node's own, and a node lost would take its shards with it; use a shared "
                "filesystem"
            )
        return replicas.Layout(writes=self.replica == 0, shared=True, local_writes=True)

    # -- saving ----------------------------------------------------------------------------------------
    def _snapshot(self, step: int, writes: bool) -> Callable[[], Files] | None:
        self._pending_step, self._pending_name = step, f"{TMP_PREFIX}{mf.name_for(step)}-{self._token}"
        return self._rows_snapshot(writes, self.env.rank == 0)

    def _rows_snapshot(self, writes: bool, train: bool) -> Callable[[], Files] | None:
        """Collective: this rank's rows to copy out (and the train file where ``train``)."""
        device = self.env.device
        # The save's one collective: every rank's RNG streams (the train file keeps them all).
        rng_states = comm.all_gather_bytes(to_bytes(rng.capture(device)), device)
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
            small = {**self.state.train_state(), "optim": skeleton}
            small["rng"] = [torch.load(io.BytesIO(b), weights_only=True) for b in rng_states]
            small = self.stager.stage(small, "train")  # small: copied now
        file = fmt.shard_file(self.shard_index, self.shard_count)

        def copy_rows() -> Files:  # on the writer's thread, before the next optimizer step
            staged = {**self.stager.stage(later, "rows"), **now}
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            return {file: staged, **({TRAIN_FILE: small} if small is not None else {})}

        return copy_rows

    def _claim(self, step: int) -> bool:
        """Rank 0, on its writer's thread: take the step's temporary directory to commit it later;
        False if the step is committed already (and verifies). OSError: this save failed."""
        manager, name = self.manager, mf.name_for(step)
        if name in manager.storage.names():
            # Rejected by this process (at resume, say) counts as invalid even if it verifies.
            problem = manager.known_problem(name) or manager.verify(name) or _layout_problem(manager, name)
            if not problem:
                log.info("checkpoint %s already exists and verifies; not rewriting it", name)
                return False
            moved = manager.storage.set_aside(name)
            log.warning("checkpoint %s did not verify (%s); moved it to %s", name, problem, moved)
        self._pending = manager.storage.begin(name, self._pending_name)
        return True

    def _write_mine(self, step: int, files: Files, meta: dict[str, Any]) -> dict[str, Any]:
        """On the writer thread: this rank's files into the pending directory; their entries."""
        hooks.context(save_step=step)
        if self.env.rank == 0 and not self._claim(step):
            return {"entries": {}, "rows": {}, "exists": True}
        target = self.manager.storage.join(self._pending_name)
        try:
            entries = {file: fmt.write_shard(target, file, obj) for file, obj in files.items()}
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
        outcome = together.run(work, self._limit, f"committing the checkpoint of step {step}") or ""
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
            if pending is None:  # rank 0 never took it (the step exists, or its own write failed)
                pending = _Debris(self.manager.storage.root / self._pending_name)
            pending.abort()
        if parts[0].get("exists"):
            return ""  # committed before (an earlier attempt's): nothing to do
        if failed:
            log.error(
                "checkpoint of step %d not committed: rank %d could not write its shard", step, failed[0]
            )
            return "skipped"
        entries = {f: e for p in parts for f, e in p.get("entries", {}).items()}
        pieces = {
            f: {k: tuple(r) for k, r in p["rows"].items()}
            for p in parts
            for f in p.get("entries", {})
            if f != TRAIN_FILE
        }
        meta = {**self.meta, fmt.LAYOUT: fmt.layout(pieces, self._shapes)}
        try:
            raw = mf.build_from(step, entries, meta, compact=True)
            fmt.check(mf.parse(raw, step))  # what a reader will refuse is never committed
            pending.write(mf.MANIFEST, raw)
            pending.commit()
        except (OSError, mf.Problem) as e:
            pending.abort()
            return str(e)
        self.manager.committed(pending.name)
        log.info(
            "checkpoint %s committed (%d shard files)",
            self.manager.storage.location(pending.name),
            len(pieces),
        )
        return ""

    # -- the node-local tier ----------------------------------------------------------------------
    def _save_local(self, step: int) -> None:
        """Collective: every rank that writes on its node copies its rows out; its writer thread
        sends them to the partner node's rank and keeps what its own partner sends (ring.py)."""
        writer, writes = self.local.writer, self.ring.writes(self.env.rank)
        copy = self._rows_snapshot(writes, self.env.local_rank == 0)
        if writer is None or copy is None:
            return
        self._local_step = step
        self._local_bytes = self.state.nbytes() // max(1, self.shard_count)
        writer.save(step, lambda: copy, self.meta, None, self._save_limit_s(self.state.nbytes()))
        if not self.cfg.async_save:
            self._settle()
        self.events("checkpoint", step=step, stall_s=writer.stall_s, tier="local")

    def _write_local(self, step: int, files: Files, meta: dict[str, Any]) -> dict[str, Any]:
        """On the writer thread: this rank's shard (and its node's train file) into the node's
        temporary directory, and the partner's shard beside them. The exchange with the partners
        runs whatever failed here before it (they must not wait for a rank that gave up)."""
        hooks.context(save_step=step)
        storage = self.local.manager.storage
        name, rank = mf.name_for(step), self.env.rank
        tmp = f"{TMP_PREFIX}{name}-{self._token}"
        target, outgoing, error = None, None, None
        try:
            self.local.before_save(self._local_bytes)
            if self.env.local_rank == 0:
                self._local_pending = storage.begin(name, tmp)
            target = storage.join(tmp)
            outgoing = {f: fmt.encoded(f, obj) for f, obj in files.items()}
        except OSError as e:
            error = e
        try:
            mine = fmt.shard_file(self.shard_index, self.shard_count)
            received = None
            if self._ring_group is not None:
                sent = (mine, *outgoing[mine]) if outgoing else None
                dst, src = self.ring.sends_to(rank), self.ring.receives_from(rank)
                received = ring.exchange(self._ring_group, dst, sent, src, target)
            if error is not None:
                raise error
            assert target is not None and outgoing is not None
            for file, (entry, pieces) in outgoing.items():
                target.write(file, pieces)
                fmt.read_back(target, file, entry)
            entries = {file: entry for file, (entry, _) in outgoing.items()}
            return {"entries": entries, "rows": self._rows, "received": received[0] if received else None}
        finally:
            if target is not None:
                target.close()

    def _commit_local(self) -> None:
        """Collective: every node's first rank commits its node's copy, or none does."""
        step, self._local_step = self._local_step, None
        wrote = self.local.writer.result if self.local.writer is not None else None
        said = {"error": "not written"} if wrote is None and self.ring.writes(self.env.rank) else wrote or {}
        parts = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(said).encode(), self.env.device)]
        pending, self._local_pending = self._local_pending, None
        leader = self.env.local_rank == 0 and self.local.manager is not None
        work = (lambda: self._finish_local(step, pending, parts)) if leader else None
        if together.run(work, self._limit, f"committing the node-local checkpoint of step {step}"):
            self.local.failed(OSError(f"node-local checkpoint of step {step} not committed"))

    def _finish_local(self, step: int, pending: Any, parts: list[dict]) -> bool:
        """A node's first rank: its node's manifest (every file of the save, whichever node holds
        it) and the rename, then only this one kept. True if it could not commit."""
        storage = self.local.manager.storage
        failed = [r for r, p in enumerate(parts) if "error" in p]
        mine = {
            f
            for r, p in enumerate(parts)
            if self.ring.node_of(r) == self.ring.node_of(self.env.rank)
            for f in [*p.get("entries", {}), *([p["received"]] if p.get("received") else [])]
        }
        if failed or pending is None or TRAIN_FILE not in mine:
            (pending or _Debris(storage.root / f"{TMP_PREFIX}{mf.name_for(step)}-{self._token}")).abort()
            if failed and self.env.rank == 0:
                log.warning("node-local checkpoint of step %d not committed: rank %d failed", step, failed[0])
            return bool(failed) or pending is None
        node_parts = [
            p for r, p in enumerate(parts) if self.ring.node_of(r) == self.ring.node_of(self.env.rank)
        ]
        entries = {f: e for p in parts for f, e in p.get("entries", {}).items() if f != TRAIN_FILE}
        entries[TRAIN_FILE] = next(
            p["entries"][TRAIN_FILE] for p in node_parts if TRAIN_FILE in p.get("entries", {})
        )
        pieces = {
            f: {k: tuple(r) for k, r in p["rows"].items()}
            for p in parts
            for f in p.get("entries", {})
            if f != TRAIN_FILE
        }
        try:
            raw = mf.build_from(
                step, entries, {**self.meta, fmt.LAYOUT: fmt.layout(pieces, self._shapes)}, compact=True
            )
            fmt.check(mf.parse(raw, step))
            pending.write(mf.MANIFEST, raw)
            pending.commit()
            for older in storage.names():
                if older != pending.name:
                    storage.delete(older)
        except (OSError, mf.Problem) as e:
            pending.abort()
            log.warning("node-local checkpoint of step %d not committed: %s", step, e)
            return True
        return False

    # -- resuming --------------------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        limit, local, manager = self._load_limit(), None, self.local.manager
        if self.cfg.local_interval and self.run_id:  # the same on every rank: listed() is collective
            copies = local_shards.listed(manager, self.env, self.run_id, limit)
            model = {k: t for k, t in shards.split(self.state)[0].items() if k.startswith(fmt.MODEL)}

            def complete(copy: local_shards.LocalCopy, limit: Limit) -> str:
                assert manager is not None  # listed() names no copy unless every rank has one
                needs = lambda name: needed_files(manager, name, self.state, model)  # noqa: E731
                return local_shards.complete(
                    copy, manager, self.env, self._ring_group, self._token, limit, needs
                )

            local = (manager, copies, complete)
        return resume_sharded(
            self.manager, self.state, self.env, self.fingerprint, self.run_dir, limit, local
        )


def _layout_problem(manager: Any, name: str) -> str:
    """ "" if a checkpoint's layout (if it has one) is one a resume can read."""
    try:
        manifest = manager.manifest(name)
        if fmt.is_sharded(manifest):
            fmt.check(manifest)
    except mf.Problem as p:
        return str(p)
    return ""


class _Debris:
    """A sharded save's temporary directory that rank 0 never took (its own write failed first)."""

    def __init__(self, path: Any):
        self.path = path

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
