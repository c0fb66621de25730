"""Process-group set-up that survives torchrun restarts, with bounded timeouts.

Why not a plain ``init_process_group("gloo")``: since torch 2.4 torchrun's c10d rendezvous hands
every worker the *agent's* TCPStore, which outlives the workers. A restarted group finds the
previous attempt's keys there (peer addresses, barrier counters) and either connects to dead peers
("Gloo connectFullMesh failed ... Connection refused") or hangs (pytorch/pytorch#135712).
TORCHELASTIC_RESTART_COUNT cannot name the attempt either: it is per agent and differs across nodes.

So each start gets a fresh namespace that every rank provably agrees on: rank 0 draws a random
generation id; every other rank posts a random nonce and waits for rank 0 to answer *that nonce*
with the id. An answer to a fresh nonce can only come from this attempt's rank 0, so stale keys are
never read. The process group then lives under ``pg/<generation>/`` in the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from train.errors import ConfigError
from train.runtime import env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group
    restart: int
    local_world_size: int = 1  # ranks on this node
    node: int = 0  # this node's index among the job's nodes (torchrun's GROUP_RANK)

    @property
    def multi_node(self) -> bool:
        return self.world_size > self.local_world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_backend(requested: str) -> tuple[str, bool]:
    """Return (backend, use_cuda)."""
    if requested == "nccl" and not torch.cuda.is_available():
        raise ConfigError("--dist.backend nccl needs CUDA, and none is available; use auto or gloo")
    use_cuda = torch.cuda.is_available() and requested in ("auto", "nccl")
    return ("nccl" if use_cuda else "gloo"), use_cuda


def _base_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    where = env.rendezvous()
    return dist.TCPStore(
        host_name=where.host,
        port=where.port,
        world_size=world_size,
        is_master=rank == 0 and not where.agent_hosts_store,
        timeout=timeout,
        wait_for_workers=False,
    )


def _answer_peers(store: dist.Store, world_size: int, generation: str, done: threading.Event) -> None:
    """Rank 0: answer every nonce a peer posts until the group is up (stale nonces are harmless)."""
    answered: set[str] = set()
    keys = [f"bootstrap/hello/{r}" for r in range(1, world_size)]
    try:
        while not done.wait(0.02):
            for key in keys:
                if store.check([key]):
                    nonce = store.get(key).decode()
                    if nonce not in answered:
                        store.set(f"bootstrap/answer/{nonce}", _signed(nonce, generation))
                        answered.add(nonce)
    except Exception:  # say so: the peers would otherwise wait out the init timeout in silence
        log.exception("process-group bootstrap: rank 0 stopped answering its peers")


def _agree_generation(store: dist.Store, rank: int, world_size: int) -> tuple[str, threading.Event | None]:
    if rank == 0:
        generation = uuid.uuid4().hex
        done = threading.Event()
        # Its own client connection: the main thread's store is busy inside init_process_group.
        where = env.rendezvous()
        responder_store = dist.TCPStore(
            where.host, where.port, is_master=False, timeout=timedelta(seconds=30)
        )
        threading.Thread(
            target=_answer_peers,
            args=(responder_store, world_size, generation, done),
            daemon=True,
            name="pg-bootstrap",
        ).start()
        return generation, done
    nonce = uuid.uuid4().hex
    store.set(f"bootstrap/hello/{rank}", nonce)
    return _answer(store, nonce), None


def _signed(nonce: str, generation: str) -> str:
    """Rank 0's answer; with a job secret it carries an HMAC of the nonce it answers (anyone who
    reaches the store could otherwise answer first and split the job into two namespaces)."""
    secret = env.job_secret()
    if secret is None:
        return generation
    return f"{generation}:{hmac.new(secret, f'{nonce}:{generation}'.encode(), hashlib.sha256).hexdigest()}"


def _answer(store: dist.Store, nonce: str) -> str:
    """The generation rank 0 answered this nonce with (blocks up to the store timeout); an answer
    the job's secret did not sign is ignored, and the wait goes on."""
    key, warned = f"bootstrap/answer/{nonce}", False
    deadline = time.monotonic() + store.timeout.total_seconds()
    while time.monotonic() < deadline:
        answer = store.get(key).decode()
        generation = answer.partition(":")[0]
        if hmac.compare_digest(_signed(nonce, generation), answer):
            return generation
        if not warned:
            log.warning("ignoring a process-group answer this job's FTJOB_JOB_SECRET did not sign")
            warned = True
        time.sleep(0.05)
    raise TimeoutError(f"no answer to {key} signed by this job's FTJOB_JOB_SECRET")


def setup(backend: str, init_timeout_s: float) -> DistEnv:
    launch = env.launch()
    if not launch.distributed:  # plain `python train/main.py`: one process, no group
        device = torch.device("cuda:0" if torch.cuda.is_available() and backend != "gloo" else "cpu")
        return DistEnv(0, 1, 0, device, None, launch.restart)
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    name, use_cuda = pick_backend(backend)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=init_timeout_s)
    store = _base_store(rank, world_size, timeout)
    generation, done = _agree_generation(store, rank, world_size)
    try:
        dist.init_process_group(
            name,
            store=dist.PrefixStore(f"pg/{generation}/", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if use_cuda else None,
        )
    finally:
        if done is not None:
            done.set()
    log.info("process group up: %s, rank %d/%d, generation %s", name, rank, world_size, generation[:8])
    return DistEnv(
        rank, world_size, local_rank, device, name, launch.restart, launch.local_world_size, launch.node
    )


def set_timeout(seconds: float) -> None:
    """Shorten the collective timeout once training runs, so a dead peer fails fast (not in 30 min)."""
    if dist.is_initialized():
        # Private in 2.13 but the documented route torchtitan takes; skip silently if it moves.
        setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        if setter is not None:
            setter(timedelta(seconds=seconds), None)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# From the start of teardown to the process's end. Freeing a process group (or the DDP reducer
# that holds one) while an exception unwinds can deadlock: gloo's loop thread waits for the GIL
# the freeing thread holds. No thread can help then; the kernel's alarm ends the process (SIGALRM:
# 142, "hung", retryable). Beyond the 10 s a rank with a permanent error waits for its peers.
TEARDOWN_S = 30


@contextlib.contextmanager
def process_group(backend: str, init_timeout_s: float) -> Iterator[DistEnv]:
    """setup(), and teardown() however the block ends, the process bounded from then on."""
    distributed = setup(backend, init_timeout_s)
    try:
        yield distributed
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(TEARDOWN_S)
        teardown()
