"""What torchrun, the launcher and the kernel tell this process, read in one place.

Read when asked, never at import: a trainer forked by a warm restart was imported by the zygote,
in another process's environment. Standard library only (the warm-start hand-off runs before torch).
"""

from __future__ import annotations

import contextlib
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


def memory() -> tuple[int, int]:
    """This process's resident bytes now and at their peak (VmRSS, VmHWM); (0, 0) without /proc."""
    found = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def reset_peak() -> None:
    """Make the peak the current resident size, so a peak read later is of what ran since."""
    with contextlib.suppress(OSError):  # not Linux, or /proc read-only: the peak is since start
        Path("/proc/self/clear_refs").write_text("5")


# Filesystems another machine may be serving: a file there is not read once per node by re-reading it.
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
               "9p", "afs", "ocfs2", "gfs2", "fuse", "virtiofs"}  # fmt: skip


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` ("" if unknown), from /proc/self/mountinfo."""
    real, best, kind = os.path.realpath(path), "", ""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def on_local_filesystem(path: str) -> bool:
    """Whether ``path`` is on a filesystem of this machine's own (not one a network may serve)."""
    kind = filesystem_type(path)
    return bool(kind) and kind.split(".")[0] not in _NETWORK_FS


def disk_read_bytes() -> int:
    """Bytes this process has had fetched from storage devices (/proc/self/io read_bytes: page cache
    hits do not count); 0 where there is no such file."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
