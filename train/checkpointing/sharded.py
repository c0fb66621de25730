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
from train.checkpointing import replicas, shards, together
from train.checkpointing.boundary import Agreement
from train.checkpointing.checkpointer import Checkpointer, Events
from train.checkpointing.reshard import resume_sharded
from train.checkpointing.resume import Resumed
from train.checkpointing.snapshot import Stager, to_bytes
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
        if cfg.ckpt.local_interval:
            raise ConfigError(
                f"--parallel.mode {cfg.parallel.mode} has no node-local tier yet (its replication "
                "between nodes is not built); drop --ckpt.local-interval"
            )
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

    # -- who writes ----------------------------------------------------------------------------------
    def _layout(self, where: Path, remote: bool) -> replicas.Layout:
        seen = replicas.layout(where, self.env, remote=remote)
        if not seen.shared:
            raise ConfigError(
                f"multi-node --parallel.mode fsdp/hsdp needs a --ckpt.dir every node sees: {where} is "
                "each node's own, and a node lost would take its shards with it; use a shared "
                "filesystem"
            )
        return replicas.Layout(writes=self.replica == 0, shared=True, local_writes=False)

    # -- saving ----------------------------------------------------------------------------------------
    def _snapshot(self, step: int, writes: bool) -> Callable[[], Files] | None:
        device = self.env.device
        # The step's one collective: every rank's RNG streams (the train file keeps them all).
        rng_states = comm.all_gather_bytes(to_bytes(rng.capture(device)), device)
        self._pending_step, self._pending_name = step, f"{TMP_PREFIX}{mf.name_for(step)}-{self._token}"
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
        if self.env.rank == 0:
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

    # -- resuming --------------------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        return resume_sharded(
            self.manager,
            self.state,
            self.env,
            self.fingerprint,
            self.run_dir,
            self._load_limit(),
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
