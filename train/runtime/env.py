"""What torchrun, the launcher and the kernel tell this process, read in one place.

Read when asked, never at import: a trainer forked by a warm restart was imported by the zygote,
in another process's environment. Standard library only (the warm-start hand-off runs before torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FAULT_ENV = "FTJOB_FAULT"  # fault injection for tests and chaos runs (train/runtime/faults.py)
STATUS_ENV = "FTJOB_STATUS_FILE"  # the launcher's private per-node status file (train/runtime/exits.py)
SECRET_ENV = "FTJOB_JOB_SECRET"  # signs the job's own keys in the rendezvous store (launch/verdict.py)


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


@dataclass(frozen=True)
class Launch:
    """This worker's place in the job, as torchrun set it (one process: rank 0 of 1)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node: int  # this node's index among the job's nodes (torchrun's GROUP_RANK)
    restart: int  # torchrun's restart count on this node (0 again after a requeue)
    max_restarts: int
    run_id: str  # TORCHELASTIC_RUN_ID; "" when not started by torchrun
    distributed: bool  # RANK is set: join a process group

    @property
    def under_torchrun(self) -> bool:
        return bool(self.run_id)


def launch() -> Launch:
    world_size = _int("WORLD_SIZE", 1)
    return Launch(
        rank=_int("RANK", 0),
        local_rank=_int("LOCAL_RANK", 0),
        world_size=world_size,
        local_world_size=_int("LOCAL_WORLD_SIZE", world_size),
        node=_int("GROUP_RANK", 0),
        restart=_int("TORCHELASTIC_RESTART_COUNT", 0),
        max_restarts=_int("TORCHELASTIC_MAX_RESTARTS", 0),
        run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""),
        distributed="RANK" in os.environ,
    )


@dataclass(frozen=True)
class Rendezvous:
    """Where this attempt's process group meets (set by torchrun for its workers)."""

    host: str
    port: int
    agent_hosts_store: bool  # torchrun's agent runs the TCPStore (torch >= 2.4 with c10d)


def rendezvous() -> Rendezvous:
    return Rendezvous(
        host=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        agent_hosts_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def fault_spec() -> str:
    return os.environ.get(FAULT_ENV, "")


def job_secret() -> bytes | None:
    """The per-job secret every node was given (a Kubernetes Secret, the SLURM job's environment),
    or None: then the job's keys in the rendezvous store are not authenticated."""
    value = os.environ.get(SECRET_ENV, "")
    return value.encode() if value else None


def status_file() -> Path | None:
    value = os.environ.get(STATUS_ENV)
    return Path(value) if value else None


# -- /proc -----------------------------------------------------------------------------------------
def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 on (after the parenthesised command name, which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> str:
    return proc_stat(pid)[19]  # start time: tells a reused pid apart


def parent_of(pid: int) -> int:
    return int(proc_stat(pid)[1])


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def alive(pid: int) -> bool:
    """Neither gone nor a zombie (an orphan's zombie may never be reaped by its reader)."""
    try:
        return proc_stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    found = []
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in tasks.read_text().split()]
        except (OSError, ValueError):
            continue
    return found
