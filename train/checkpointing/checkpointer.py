"""The job's checkpoints, in one object the training loop talks to three times:

    with Checkpointer(cfg, env, state, fingerprint, metrics.event) as checkpointer:
        resumed = checkpointer.resume()                    # once, before the first step
        ...
        loss, agreed = checkpointer.agree(local_loss, stop_requested)  # each step's all-reduce
        if checkpointer.after_step(step, agreed, final):   # saves what is due; True: stop here
            ...

It owns the two tiers - durable checkpoints (``--ckpt.dir``, every ``--ckpt.interval`` steps)
and the node-local one (``--ckpt.local-interval``, local_tier.py), each with its own background
writer -, who writes them (replicas.py), the snapshot both take (snapshot.py), what a failing
save does to the job (policy.py) and the resume (resume.py). It decides what is due: the final
and the preemption save always (and every rank waits for it); a periodic durable save unless the
previous one is still running (skipped, with a warning: one save in flight at most, since both
tiers share the staging buffers); a node-local save only while nothing else is being saved.

No rank ever waits for a disk inside a collective: every wait for a save is a loop of short
waits, each followed by the tiny all-reduce of an Agreement (boundary.py) that all ranks enter
within ``POLL_S``. Otherwise the other ranks' collective would time out (``--dist.timeout-s``) and
turn a slow save into a failed job.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from train import config
from train.checkpointing import replicas, together
from train.checkpointing.boundary import Agreement, agree
from train.checkpointing.local_tier import LocalTier, agree_run_id
from train.checkpointing.policy import SavePolicy
from train.checkpointing.reshard import resume_sharded
from train.checkpointing.resume import Resumed, resume
from train.checkpointing.snapshot import Snapshots
from train.checkpointing.together import Limit
from train.ckpt import manifest as mf
from train.ckpt import shards as shard_format
from train.ckpt.manager import CheckpointManager
from train.ckpt.objstore import FsspecStorage, is_url, open_storage
from train.ckpt.writer import CheckpointWriter
from train.errors import StorageError
from train.runtime import comm, preempt, private
from train.runtime.dist import DistEnv
from train.state import CKPT_FILES, Files, TrainState

log = logging.getLogger("train")
POLL_S = 0.2
Events = Callable[..., object]  # metrics.event(kind, **fields)


class Checkpointer:
    FILES: frozenset[str] | None = CKPT_FILES  # what every checkpoint holds (None: its manifest says)

    def __init__(self, cfg: config.Config, env: DistEnv, state: TrainState, fingerprint: str, events: Events):
        """Collective on multi-node runs (the ranks find out who writes, replicas.py)."""
        self.cfg, self.env, self.state, self.fingerprint, self.events = (
            cfg.ckpt,
            env,
            state,
            fingerprint,
            events,
        )
        self.run_dir = Path(cfg.run_dir)
        self.meta = {"world_size": env.world_size, "fingerprint": fingerprint, "config": config.to_dict(cfg)}
        storage = open_storage(config.ckpt_dir(cfg))
        self.manager = CheckpointManager(storage, keep=cfg.ckpt.keep, files=self.FILES)
        # One bucket prefix is one directory every node sees: written by rank 0 alone, as a shared one.
        remote = isinstance(storage, FsspecStorage)
        where = self.run_dir if remote else Path(config.ckpt_dir(cfg))  # where checkpoints go
        self.layout = self._layout(where, remote)
        if self.layout.writes:
            _warn_if_shared(self.run_dir, self.manager)
        # Which run the durable checkpoints belong to: rank 0's say, and each node's where not shared.
        durable = self.manager if self.layout.writes and (env.rank == 0 or not self.layout.shared) else None
        self.run_id = agree_run_id(self.run_dir, env, keeps=self.layout.local_writes, durable=durable)
        self.meta["run_id"] = self.run_id
        self.local = LocalTier(cfg.ckpt, self.run_dir, self.layout.local_writes, self.run_id, self.FILES)
        # Always a background thread: with --ckpt.async false each save is waited for at once,
        # but in short shared waits (see the module docstring).
        self.writer = CheckpointWriter(self.manager, background=True)
        self._limit = Limit(cfg.ckpt.save_timeout_s, "--ckpt.save-timeout-s", 0, cfg.ckpt.slowest_mb_s)
        self.policy = SavePolicy(self.writer, cfg.ckpt, self.layout.writes)
        self.policy.on_failure = lambda line: events("checkpoint_failed", step=state.step, error=line)
        self.snapshots = Snapshots(state)  # one set of staging buffers for both tiers
        # The weights change only in optimizer.step(): a snapshot's copy runs until then.
        self._hook = state.optimizer.register_step_pre_hook(lambda *_: self._wait_staged())

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Wait for a save in flight on the way out, but never for one that is hung, and on a
        failure after a stop signal (torchrun stopping the workers: a peer failed) only as long as
        torchrun waits before its SIGKILL: the save is finished in time, or abandoned with a line
        (never half-committed either way: a commit is a rename)."""
        timeout = (
            0 if kind is StorageError else max((w.limit_s for w in self._writers() if w.busy), default=0)
        )
        left = preempt.grace_left()
        if kind is not None and left is not None:
            timeout = min(timeout, left)
        deadline = time.monotonic() + timeout
        for writer in self._writers():
            writer.close(max(0.0, deadline - time.monotonic()))
        self._hook.remove()

    def _writers(self) -> list[CheckpointWriter]:
        return [self.writer, *([self.local.writer] if self.local.writer is not None else [])]

    def _wait_staged(self) -> None:
        for writer in self._writers():
            writer.wait_staged()

    # -- the three calls ---------------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        """Collective: restore the state from the newest valid checkpoint on any node (None: none)."""
        if self._any_sharded():  # a sharded run's: each rank reads it whole, by its layout
            return resume_sharded(
                CheckpointManager(self.manager.storage, keep=self.cfg.keep),
                self.state,
                self.env,
                self.fingerprint,
                self.run_dir,
                self._load_limit(),
            )
        return resume(
            self.manager,
            self.state,
            self.env,
            self.fingerprint,
            reads=self.layout.writes,
            local=self.local.manager,
            shared=self.layout.shared,
            run_dir=self.run_dir,
            run_id=self.run_id,
            limit=self._load_limit(),
        )

    def _load_limit(self) -> Limit:
        """How long a read at resume may run, its bytes aside (each read adds its checkpoint's)."""
        return Limit(self.cfg.load_timeout_s, "--ckpt.load-timeout-s", 0, self.cfg.slowest_mb_s)

    def _any_sharded(self) -> bool:
        """Collective: whether any durable checkpoint rank 0 sees was written by a sharded run
        (--parallel.mode fsdp/hsdp before a change to ddp). Then the resume walks them all by
        reshard.py's rules, which read both kinds: the DDP listing would refuse every sharded one
        and start afresh over them. Bounded like any read at resume."""

        def look() -> bool:
            try:
                names = [(mf.step_of(n), n) for n in self.manager.storage.names()]
            except OSError:
                return False  # the usual resume says what cannot be read
            for step, name in names:
                with contextlib.suppress(OSError, mf.Problem):  # unreadable: not known to be sharded
                    raw = self.manager.storage.read(name, mf.MANIFEST, limit=mf.MANIFEST_LIMIT)
                    if step is not None and shard_format.is_sharded(mf.parse(bytes(raw), step)):
                        return True
            return False

        mine = self.env.rank == 0 and self.layout.shared
        limit = Limit(self.cfg.load_timeout_s, "--ckpt.load-timeout-s", 0, 0)
        sharded = together.run(look if mine else None, limit, "listing checkpoints")
        return comm.all_gather_bytes(b"1" if sharded else b"", self.env.device)[0] == b"1"

    def agree(self, loss: torch.Tensor, stop_requested: bool) -> tuple[float, Agreement]:
        """Collective, the step's one all-reduce: (the mean loss, what every rank agrees on).
        Raises if checkpoint storage hung or gave up (StorageError, DiskFullError)."""
        return self._agree(Agreement(stop=stop_requested), loss)

    def after_step(self, step: int, agreed: Agreement, final: bool) -> bool:
        """Collective: save what is due after ``step``; True when the job stops here (preempted,
        the step saved)."""
        due = bool(self.cfg.interval) and step % self.cfg.interval == 0
        if final or agreed.stop:
            self._save(step, agreed, last=True)
            if final:
                self.local.remove()  # the final checkpoint is durable
        elif due and not agreed.saving:
            self._save(step, agreed)
        elif due:
            log.warning(
                "skipping the checkpoint of step %d: the previous one is still being written (slow storage?)",
                step,
            )
            self.events("checkpoint_skipped", step=step, why="previous save still running")
        elif self.local.due(step) and not agreed.busy:
            self._save_local(step)  # skipped while any save runs: the next interval comes soon
        return agreed.stop and not final

    # -- saving ------------------------------------------------------------------------------------------
    def _agree(
        self, mine: Agreement, loss: torch.Tensor | None = None, final: bool = False
    ) -> tuple[float, Agreement]:
        mine = mine | self.policy.report(final) | self.local.report()
        mean_loss, agreed = agree(mine, self.env, loss)
        hung = [(w.step_in_flight, self._limit) for w in self._writers() if w.overdue()]
        self.policy.act(agreed, hung[0] if hung else None)
        return mean_loss, agreed

    def _settle(self, final: bool = False) -> None:
        """Collective: return once every writer's save in flight (of either tier) is done."""
        while True:
            for writer in self._writers():
                writer.join(POLL_S)
            if not self._agree(Agreement(), final=final)[1].busy:
                return

    def _save(self, step: int, agreed: Agreement, last: bool = False) -> None:
        """A durable save; ``last``: the final or preemption save, which every rank waits for."""
        blocking = last or not self.cfg.async_save
        t0 = time.perf_counter()
        if last or agreed.saving_local:
            self._settle()  # the previous save first: one in flight at most
        writes = self.layout.writes
        # Sized here, not on the writer's thread: a model's state_dict() is no thread's to call
        # beside the step loop (FSDP2 swaps its parameters in its state_dict hooks).
        nbytes = self.state.nbytes()
        precheck = lambda: self.policy.before_save(nbytes)  # noqa: E731
        snapshot = lambda: self._snapshot(step, writes)  # noqa: E731
        self.writer.save(step, snapshot, self.meta, precheck, self._save_limit_s(nbytes))
        if blocking:
            self._settle(final=last)
        stall = time.perf_counter() - t0 if blocking else self.writer.stall_s
        self.events("checkpoint", step=step, stall_s=stall)

    def _layout(self, where: Path, remote: bool) -> replicas.Layout:
        """Collective on multi-node runs: who writes which checkpoints (replicas.py)."""
        return replicas.layout(where, self.env, remote=remote)

    def _snapshot(self, step: int, writes: bool) -> Files | Callable[[], Files] | None:
        """Collective: the state to save at ``step`` (None where this rank writes nothing)."""
        return self.snapshots.take(self.env.device, writes)

    def _save_limit_s(self, nbytes: int) -> float:
        """How long a save of the state as it is now may run before it counts as hung (both tiers
        save the same state: one limit serves them)."""
        self._limit = Limit(self.cfg.save_timeout_s, "--ckpt.save-timeout-s", nbytes, self.cfg.slowest_mb_s)
        return self._limit.seconds

    def _save_local(self, step: int) -> None:
        writer = self.local.writer
        copy = self.snapshots.take(self.env.device, self.local.writing)  # collective: every rank takes part
        if copy is not None and writer is not None:
            nbytes = self.state.nbytes()
            precheck = lambda: self.local.before_save(nbytes)  # noqa: E731
            writer.save(step, lambda: copy, self.meta, precheck, self._save_limit_s(nbytes))
        if not self.cfg.async_save:
            self._settle()
        if copy is not None and writer is not None:
            self.events("checkpoint", step=step, stall_s=writer.stall_s, tier="local")


def _warn_if_shared(run_dir: Path, manager: CheckpointManager) -> None:
    """One line at start if other users could add entries where this job keeps its checkpoints:
    what they add is never read nor deleted (train/ckpt/storage.py), but they could fill the disk."""
    root = manager.storage.location("")
    for where in (run_dir, *([] if is_url(root) else [Path(root)])):
        why = private.others_can_write(where)
        if why:
            log.warning(
                "%s can be written by other users (%s): their files there are ignored, but make it "
                "private (chmod go-w) or use a --run-dir / --ckpt.dir of your own",
                where,
                why,
            )
