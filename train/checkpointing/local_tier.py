"""The node-local tier: a checkpoint every ``--ckpt.local-interval`` steps between the durable ones.

Under DDP every node already holds the whole model and optimizer, so a fast local copy on each
node needs no replication traffic: each checkpoint writer (one per node, replicas.py)
saves into its node's local directory, by default a RAM disk (/dev/shm), and keeps only the
newest one there. Resume takes the newest valid checkpoint of either tier on any node, so a
SIGKILL, or the loss of a node, costs at most the steps since the last local save.

A local save never stops the job: when the local directory lacks room (a save must leave
``RESERVE`` of its filesystem free: /dev/shm is memory), that save is skipped with a warning; after
``MAX_FAILURES`` other failures the tier is off for the rest of this attempt. The durable tier
decides about failures, as without this one.

The directory is named after the run (``<base>/<run id>``, the id kept in ``<run-dir>/.run-id``), so
a new run in a wiped run directory never resumes an old run's local checkpoint and two runs never
prune each other's. The id is rank 0's, agreed at start (``agree_run_id``) and written into every
node's run directory: a node whose own run directory outlived an older run (not wiped, unlike rank
0's) takes the job's id, not its old one, and so never that run's checkpoints; the id is also
stamped in every manifest, and a local copy of another run is never taken (resume.py). A rank 0
on a new machine (empty run directory) takes the other nodes' id instead where the newest durable
checkpoint proves the job continues that run (``agree_run_id``).
The default base is a directory on the RAM disk only this user can enter. A
run that completes removes its local directory (its final checkpoint is durable); one that is lost
for good leaves it until reboot. A local save still running after --ckpt.save-timeout-s counts as
hung storage, like a durable one: no further save could start behind it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from train.checkpointing.boundary import Agreement
from train.checkpointing.policy import free_bytes
from train.ckpt import manifest as mf
from train.ckpt.manager import CheckpointManager
from train.ckpt.storage import LocalStorage
from train.ckpt.writer import CheckpointWriter
from train.config import CkptConfig
from train.runtime import comm, private
from train.runtime.dist import DistEnv
from train.runtime.private import Untrusted, private_dir
from train.state import CKPT_FILES

log = logging.getLogger("train")
RUN_ID_FILE = ".run-id"
RAM_DISK = Path("/dev/shm")
RESERVE = 0.10
MAX_FAILURES = 3


def run_id(run_dir: Path, create: bool) -> str | None:
    """This run's id, made at its first start if asked (one per run directory)."""
    path = run_dir / RUN_ID_FILE
    found = (private.read_regular(path, 64) or b"").decode(errors="replace").strip()
    if re.fullmatch(r"[0-9a-f]{32}", found):
        return found
    if not create:
        return None
    new = uuid.uuid4().hex
    run_dir.mkdir(parents=True, exist_ok=True)
    private.write_replace(path, (new + "\n").encode())
    return new


def agree_run_id(run_dir: Path, env: DistEnv, keeps: bool, durable: CheckpointManager | None = None) -> str:
    """Collective: the run's id, rank 0's (made at its first start, written once agreed); "" if
    rank 0 cannot trust its run id file (no local tier then). ``keeps``: this rank writes it into
    its node's run directory; ``durable``: the durable checkpoints this rank writes, whose newest
    manifest says which run they belong to.

    A rank 0 whose run directory is new (a replaced machine, a wiped disk) takes the id the other
    nodes hold instead of its new one, if they all hold the same one and the newest durable
    checkpoint rank 0 or another node's writer sees carries it too: the job resumes that run's
    durable checkpoints anyway (they count by where they are), so its node-local copies - newer -
    are that run's as well. Without such a checkpoint the other nodes' ids may be an old run's:
    rank 0's new one wins, as before."""
    mine, fresh = "", False
    if env.rank == 0 or keeps:
        try:
            mine = run_id(run_dir, create=False) or ""
        except (OSError, Untrusted) as e:
            if env.rank == 0:
                log.warning("no run id (%s): node-local checkpoints off", e)
            mine = "-"  # not "": rank 0 makes no new id over a run id file it cannot trust
        # Written only once agreed: a node's other ranks, reading the same directory meanwhile,
        # must not take a new id for a held one; an attempt that dies first leaves nothing behind.
        if env.rank == 0 and not mine:
            mine, fresh = uuid.uuid4().hex, True
        mine = "" if mine == "-" else mine
    said = json.dumps([mine, fresh, _stamped(durable), env.node]).encode()
    every = [json.loads(b) for b in comm.all_gather_bytes(said, env.device)]
    agreed, adopted = _job_id(every)
    if adopted and env.rank == 0:
        log.warning(
            "this node's run directory %s had no run id: continuing run %s, which the other nodes "
            "and the durable checkpoints carry (their node-local checkpoints count)",
            run_dir,
            agreed,
        )
    if agreed and (agreed != mine or fresh) and (keeps or env.rank == 0):
        if mine and not fresh:
            log.warning(
                "this node's run directory %s held run id %s; the job's is %s (rank 0's): "
                "that run's node-local checkpoints are not taken",
                run_dir,
                mine,
                agreed,
            )
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            private.write_replace(run_dir / RUN_ID_FILE, (agreed + "\n").encode())
        except (OSError, Untrusted) as e:  # the directory is still named by the agreed id
            log.warning("could not record the run id in %s: %s", run_dir, e)
    return agreed


def _job_id(every: list[list]) -> tuple[str, bool]:
    """(the job's run id, whether rank 0 took the other nodes' instead of its fresh one) from every
    rank's [its id, made just now, the id its newest durable checkpoint carries, its node]."""
    first, fresh, _, node = every[0]
    if not first or not fresh:
        return str(first), False
    held = {str(i) for i, _, _, n in every[1:] if i and n != node}  # other nodes' run directories
    carried = {str(c) for _, _, c, _ in every if c}
    if len(held) == 1 and held <= carried:
        return held.pop(), True
    return str(first), False


def _stamped(durable: CheckpointManager | None) -> str:
    """The run id the newest durable checkpoint with a readable manifest carries ("" if none)."""
    if durable is None:
        return ""
    try:
        names = sorted((n for n in durable.storage.names() if mf.step_of(n) is not None), key=mf.step_of)
        for name in reversed(names):
            try:
                stamped = durable.manifest(name).get("run_id")
            except mf.Problem:
                continue
            return stamped if isinstance(stamped, str) and re.fullmatch(r"[0-9a-f]{32}", stamped) else ""
    except OSError as e:  # the resume lists them again and decides; no proof from here
        log.debug("durable checkpoints not listed for the run id: %s", e)
    return ""


def local_root(local_dir: str, run_dir: Path, create: bool, rid: str | None = None) -> Path | None:
    """This run's local directory, ``<base>/<run id>``: base ``--ckpt.local-dir``, else this
    user's private directory on the RAM disk; without a RAM disk ``<run-dir>/local-checkpoints``
    (the run directory is the run's own). ``rid``: the agreed id (default: the run dir's). With
    ``create`` false: None unless it may exist."""
    if not local_dir and not (RAM_DISK.is_dir() and os.access(RAM_DISK, os.W_OK | os.X_OK)):
        return run_dir / "local-checkpoints"
    if rid is None:
        rid = run_id(run_dir, create)
    if rid is None:
        return None
    if local_dir:
        return Path(local_dir) / rid
    mine = private_base()
    if not (create or mine.is_dir()):
        return None
    return private_dir(mine, create) / rid


def private_base() -> Path:
    return RAM_DISK / f"ftjob-{os.getuid()}"


class LocalTier:
    def __init__(
        self,
        cfg: CkptConfig,
        run_dir: Path,
        writes: bool,
        rid: str | None = None,
        files: frozenset[str] | None = CKPT_FILES,
    ):
        """``writes``: this rank writes (and reads) its node's checkpoints; ``rid``: the agreed run
        id (agree_run_id; "": none, so no local tier; default: the run dir's own); ``files``: what
        each checkpoint holds (None: its manifest says, as a sharded run's)."""
        self.interval = cfg.local_interval
        self.manager: CheckpointManager | None = None
        self.writer: CheckpointWriter | None = None  # only where this rank writes
        self._failures, self._warned = 0, False
        self._writing = writes and self.interval > 0
        if not writes or rid == "":
            self._writing = False
            return
        try:
            root = local_root(cfg.local_dir, run_dir, self._writing, rid)
        except (OSError, Untrusted) as e:
            if self._writing:
                log.warning("node-local checkpoints off: %s (set --ckpt.local-dir to a private directory)", e)
            self._writing = False
            return
        # Off now, but an earlier attempt's local checkpoints still count at resume.
        if root is not None and (self._writing or root.is_dir()):
            self.manager = CheckpointManager(LocalStorage(root), keep=1, files=files)
        self._writing = self._writing and self.manager is not None
        if self._writing:
            assert self.manager is not None
            self.writer = CheckpointWriter(self.manager, background=True)
            log.info(
                "node-local checkpoints every %d steps in %s (only the newest kept)", self.interval, root
            )

    @property
    def writing(self) -> bool:
        return self._writing

    def due(self, step: int) -> bool:
        """The same answer on every rank (whether a rank then writes is its own business)."""
        return self.interval > 0 and step % self.interval == 0

    def before_save(self, size: int) -> None:
        """Refuse a save that would leave less than RESERVE of the local filesystem free."""
        assert self.manager is not None
        root = Path(self.manager.storage.location(""))
        if root.parent == private_base():  # removed meanwhile (logind's RemoveIPC)? made private again
            private_dir(root.parent, create=True)
        free = free_bytes(root)
        if free is None:
            return
        total = shutil.disk_usage(next(p for p in (root, *root.parents) if p.exists())).total
        if free - size < RESERVE * total:
            raise OSError(
                errno.ENOSPC,
                f"a {size / 1e6:.1f} MB local checkpoint would leave less than {RESERVE:.0%} of "
                f"{root}'s filesystem free ({free / 1e6:.1f} MB free of {total / 1e6:.1f} MB); "
                "skipping it (free memory/space, or set --ckpt.local-dir elsewhere)",
            )

    def report(self) -> Agreement:
        """This rank's word on its node-local saves (a failure is only ever this tier's business)."""
        if self.writer is None:
            return Agreement()
        busy = self.writer.busy  # before the error: see SavePolicy.report()
        error = self.writer.take_error()
        if error is not None:
            self.failed(error)
        return Agreement(saving_local=busy, hung=self.writer.overdue())

    def failed(self, error: BaseException) -> None:
        """A local save failed: warn; after MAX_FAILURES (lack of space aside), stop writing."""
        cause = error.__cause__ or error
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            (log.debug if self._warned else log.warning)(
                "node-local checkpoint skipped: %s", cause.strerror or cause
            )
            self._warned = True
            return
        self._failures += 1
        off = self._failures >= MAX_FAILURES
        log.warning(
            "node-local checkpoint failed (%s: %s)%s; durable checkpoints are not affected",
            type(cause).__name__,
            cause,
            f"; {MAX_FAILURES} failures: no more local saves in this attempt" if off else "",
        )
        self._writing = self._writing and not off

    def remove(self) -> None:
        """After the final (durable) save of a completed run: the local copies are redundant."""
        if self.manager is not None:
            shutil.rmtree(self.manager.storage.location(""), ignore_errors=True)
