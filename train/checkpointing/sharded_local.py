"""The node-local tier of a sharded run (``--ckpt.local-interval K`` under fsdp/hsdp), replicated
between nodes: the part of the ShardedCheckpointer that saves to it and names its copies at resume.

A save, every K steps: every rank that holds shards on its node copies its rows out, as for a
durable save; its writer thread sends the shard's bytes to its partner on the next node while it
receives its own partner's (ring.py), then writes its own shard (and the node's first rank the
train file) into the node's temporary directory. When every rank's save is done the ranks gather
what each wrote; only if every rank succeeded does each node's first rank write its node's
manifest and rename, and only once every node committed is the older copy removed (one kept).

Everything here that more than one rank does is decided by all of them: whether the tier runs at
all (every rank must have its node's directory, agreed at start), whether a save commits, and
whether the tier goes on after a transfer failed (then it stops for this attempt: the ring's
messages carry no sequence number, and a transfer cut short could pair with the next save's).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from train import config
from train.checkpointing import local_shards, ring, shards, together
from train.checkpointing.reshard import Local, needed_files
from train.checkpointing.shard_targets import DirTarget
from train.checkpointing.together import Limit
from train.ckpt import hooks
from train.ckpt import manifest as mf
from train.ckpt import shards as fmt
from train.ckpt.storage import TMP_PREFIX
from train.runtime import comm
from train.state import TRAIN_FILE, Files

log = logging.getLogger("train")


class ReplicatedLocalTier:
    """Mixed into ShardedCheckpointer (it provides env, state, local, meta, cfg, the snapshot)."""

    def _init_local_tier(self, cfg: config.Config) -> None:
        """Collective: the tier runs only if every rank has its node's directory."""
        self.ring = ring.Ring(self.env.world_size, self.env.local_world_size, self.shard_count)
        self._local_step: int | None = None  # the node-local save in flight, not yet committed
        self._local_pending: Any = None  # a node's first rank: that save's temporary directory
        self._transport_failed = False
        self._stage_error: BaseException | None = None
        self._local_on = bool(cfg.ckpt.local_interval)
        self._ring_group = None
        if not self._local_on:
            return
        env = self.env
        mine = [int(self.local.writer is not None), env.node, env.local_rank, env.local_world_size]
        said = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(mine).encode(), env.device)]
        lacking = [r for r, (ok, *_) in enumerate(said) if not ok]
        numbering = ring.numbering_problem([tuple(placed) for _, *placed in said])
        self._local_on = not lacking and not numbering
        if not self._local_on:
            if env.rank == 0 and lacking:
                log.warning(
                    "node-local checkpoints off: rank %d has no node-local directory (see its log)",
                    lacking[0],
                )
            elif env.rank == 0:
                log.warning(
                    "node-local checkpoints off: a sharded run's nodes keep each other's shards by rank "
                    "number, and %s; run the same --nproc_per_node on every node under torchrun",
                    numbering,
                )
            return
        # Transfers wait for a partner that copies and checksums its shard first: a bound that
        # grows with the state (the save's and the resume's own limits watch for a hang).
        limit = Limit(cfg.ckpt.load_timeout_s, "", self.state.nbytes(), cfg.ckpt.slowest_mb_s)
        self._ring_group = ring.group(self.env, max(cfg.dist.timeout_s, limit.seconds))
        self.local.writer.commit = self._write_local  # type: ignore[union-attr]

    # -- saving ----------------------------------------------------------------------------------
    def _save_local(self, step: int) -> None:
        """Collective (every rank, the same steps): see the module docstring."""
        if not self._local_on:
            return
        writer, writes = self.local.writer, self.ring.writes(self.env.rank)
        copy = self._rows_snapshot(
            writes, self.env.local_rank == 0, fmt.shard_file(self.shard_index, self.shard_count)
        )
        self._local_step = step
        if copy is not None and writer is not None:
            # Its own shard and its partner's, with the older copy still there until the commit.
            self._local_bytes = 2 * self.state.nbytes() // max(1, self.shard_count)
            self._stage_error = None

            def staged() -> Files:  # a copy that fails still leads to the exchange (with nothing)
                try:
                    return copy()
                except Exception as e:
                    self._stage_error = e
                    return {}

            writer.save(step, lambda: staged, self.meta, None, self._save_limit_s(self.state.nbytes()))
            self.events("checkpoint", step=step, stall_s=writer.stall_s, tier="local")
        if not self.cfg.async_save:
            self._settle()

    def _write_local(self, step: int, files: Files, meta: dict[str, Any]) -> dict[str, Any]:
        """On the writer thread. The exchange with the partners runs whatever failed here before it
        (they must not wait for a rank that gave up: it tells its receiver it has nothing)."""
        hooks.context(save_step=step)
        storage = self.local.manager.storage
        name, rank = mf.name_for(step), self.env.rank
        tmp = f"{TMP_PREFIX}{name}-{self._token}"
        target, outgoing, error = None, None, self._stage_error
        try:
            if error is not None:
                raise error
            self.local.before_save(self._local_bytes)
            if self.env.local_rank == 0:
                if name in storage.names():  # an older attempt's copy of this step: not usable, or
                    storage.delete(name)  # the resume would have taken it
                self._local_pending = storage.begin(name, tmp)
            target = storage.join(tmp)
            outgoing = {f: fmt.encoded(f, obj) for f, obj in files.items()}
        except Exception as e:  # whatever it was, the partners still get their exchange
            error = e if isinstance(e, OSError) else OSError(f"{type(e).__name__}: {e}")
        try:
            mine = fmt.shard_file(self.shard_index, self.shard_count)
            received = None
            if self._ring_group is not None:
                sent = (mine, *outgoing[mine]) if outgoing else None
                dst, src = self.ring.sends_to(rank), self.ring.receives_from(rank)
                expect = fmt.shard_file(src % self.shard_count, self.shard_count) if src is not None else None
                try:
                    received = ring.exchange(self._ring_group, dst, sent, src, expect, target)
                except OSError:
                    raise
                except Exception as e:  # the transport's own: the ring is not to be trusted again
                    self._transport_failed = True
                    raise OSError(f"sending shards between nodes failed: {str(e).strip()[:300]}") from e
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
        """Collective: every node's first rank commits its node's copy, or none does; the older
        copies go only once every node committed."""
        step, self._local_step = self._local_step, None
        wrote = self.local.writer.result if self.local.writer is not None else None
        said = {"error": "not written"} if wrote is None and self.ring.writes(self.env.rank) else wrote or {}
        said = {**said, "transport_failed": self._transport_failed, "off": not self.local.writing}
        parts = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(said).encode(), self.env.device)]
        pending, self._local_pending = self._local_pending, None
        leader = self.env.local_rank == 0
        what = f"the node-local checkpoint of step {step}"
        work = (lambda: self._finish_local(step, pending, parts)) if leader else None
        failed = together.run(work, self._limit, f"committing {what}") or ""
        outcomes = comm.all_gather_bytes(failed.encode(), self.env.device)
        if any(outcomes):
            if failed:
                self.local.failed(OSError(f"{what} not committed: {failed}"))
        elif leader:
            together.run(lambda: self._keep_only(mf.name_for(step)), self._limit, f"retention after {what}")
        else:
            together.run(None, self._limit, f"retention after {what}")
        if any(p.get("transport_failed") for p in parts):
            self._local_on = False
            if self.env.rank == 0:
                log.warning("a transfer between nodes failed: node-local checkpoints off for this attempt")
        elif any(p.get("off") for p in parts):  # a rank's tier gave up after repeated failures
            self._local_on = False
            if self.env.rank == 0:
                log.warning("node-local checkpoints off for this attempt: a rank's kept failing")

    def _finish_local(self, step: int, pending: Any, parts: list[dict]) -> str:
        """A node's first rank: its node's manifest (every file of the save, whichever node holds
        it; the save's token, so copies of two attempts never mix) and the rename. "" or why not."""
        storage = self.local.manager.storage
        node = self.ring.node_of(self.env.rank)
        failed = [r for r, p in enumerate(parts) if "error" in p]
        here = [p for r, p in enumerate(parts) if self.ring.node_of(r) == node]
        trains = [p["entries"][TRAIN_FILE] for p in here if TRAIN_FILE in p.get("entries", {})]
        if failed or pending is None or not trains:
            if pending is not None:
                pending.abort()
            else:
                DirTarget(storage, self._token).abort(mf.name_for(step), [])
            return f"rank {failed[0]} failed" if failed else "this node's save did not start"
        entries = {f: e for p in parts for f, e in p.get("entries", {}).items() if f != TRAIN_FILE}
        entries[TRAIN_FILE] = trains[0]
        return self._write_manifest(step, pending, entries, parts, save=self._token)

    def _keep_only(self, name: str) -> None:
        storage = self.local.manager.storage
        try:
            for older in storage.names():
                if older != name:
                    storage.delete(older)
        except OSError as e:  # left for the next save's retention (never fails the others' poll)
            log.warning("node-local retention skipped: %s", e)

    # -- resuming --------------------------------------------------------------------------------
    def _local_source(self, limit: Limit) -> Local | None:
        """Collective: the node-local tier as resume_sharded reads it (None: no tier)."""
        if not (self._local_on and self.run_id):
            return None
        manager = self.local.manager
        copies = local_shards.listed(manager, self.env, self.run_id, limit)
        model = {k: t for k, t in shards.split(self.state)[0].items() if k.startswith(fmt.MODEL)}

        def complete(copy: local_shards.LocalCopy, limit: Limit) -> str:
            assert manager is not None  # listed() names no copy unless every rank has one
            if self._transport_failed:  # the same on every rank: complete() gathers its outcome
                return "an earlier transfer between nodes failed"
            needs = lambda name: needed_files(manager, name, self.state, model)  # noqa: E731
            reason = local_shards.complete(
                copy, manager, self.env, self._ring_group, self._token, limit, needs
            )
            if local_shards.TRANSPORT in reason:  # the same reason on every rank: gathered
                self._transport_failed, self._local_on = True, False
            return reason

        return manager, copies, complete
