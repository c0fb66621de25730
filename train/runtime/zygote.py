"""The warm-start zygote: one per torchrun agent, it imports torch once and forks ready trainers.

Started by ``warmstart.start_zygote`` (``python train/runtime/zygote.py AGENT_PID``); see warmstart.py
for the protocol and who trusts whom. It never runs torch code itself, starts no threads and
touches no GPU, so forking it is safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.runtime.env import parent_of, start_ticks
from train.runtime.warmstart import (
    GO,
    REPLY_TIMEOUT_S,
    WARM_ENV,
    Untrusted,
    peer_credentials,
    private_dir,
    socket_paths,
)

PR_SET_PDEATHSIG = 1


def serve(agent: int) -> None:
    try:
        agent_fd = os.pidfd_open(agent)
        private_dir(create=True)
        sock_path, pid_file = socket_paths(agent)
        # One zygote per agent: the lock is held for life, so a socket left by a killed one is stale.
        lock = os.open(sock_path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))
    except (OSError, Untrusted):
        return
    try:
        # Bound but not listening yet: a worker that connects now is refused and starts cold.
        import torch._dynamo  # noqa: F401  the first optimizer built imports it: 0.8 s

        import train.main  # noqa: F401  what a worker would import, once
        from train import config

        with contextlib.suppress(BaseException):
            config.parse(["--run-dir", os.devnull])  # tyro builds its parser once: ~0.1 s less later

        listener.listen(64)
        tmp = pid_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "start": start_ticks(os.getpid())}))
        os.replace(tmp, pid_file)  # workers trust only the process this file names
        _serve(listener, agent, agent_fd)
    finally:
        for path in (pid_file, sock_path, sock_path.with_suffix(".lock")):
            path.unlink(missing_ok=True)


@dataclass
class _Trainer:
    pid: int
    conn: socket.socket  # to its worker: the exit status goes there
    pidfd: int
    worker_fd: int  # readable once the worker has exited; -1 once it has


def _serve(listener: socket.socket, agent: int, agent_fd: int) -> None:
    """Fork trainers for the agent's workers while it lives, and watch each trainer's worker: a
    trainer whose worker is gone is SIGKILLed from here, a single-threaded process that needs
    nothing of the trainer's (not its GIL: a trainer deadlocked in its own teardown holds it).
    Once the agent is gone, serve no more, but watch until the last trainer has ended."""
    trainers: dict[int, _Trainer] = {}  # by pidfd
    accepting = True
    while accepting or trainers:
        watched = [t.worker_fd for t in trainers.values() if t.worker_fd >= 0]
        serving = [listener, agent_fd] if accepting else []
        ready, _, _ = select.select([*serving, *trainers, *watched], [], [])
        for trainer in list(trainers.values()):
            if trainer.worker_fd in ready:  # its worker is gone: the trainer must not outlive it
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(trainer.pidfd, signal.SIGKILL)
                os.close(trainer.worker_fd)
                trainer.worker_fd = -1
            if trainer.pidfd in ready:
                _report(trainer.pid, trainer.conn)
                os.close(trainer.pidfd)
                if trainer.worker_fd >= 0:
                    os.close(trainer.worker_fd)
                del trainers[trainer.pidfd]
        if accepting and agent_fd in ready:
            accepting = False  # the job is over (or the agent died): nothing left to serve
            listener.close()
        elif accepting and listener in ready:
            _accept(listener, agent, agent_fd, trainers)


def _report(pid: int, conn: socket.socket) -> None:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):
        conn.sendall(f"signal {-code}\n".encode() if code < 0 else f"exit {code}\n".encode())
    conn.close()


def _accept(listener: socket.socket, agent: int, agent_fd: int, trainers: dict) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(5.0)
        pid, uid = peer_credentials(conn)
        if uid != os.getuid() or parent_of(pid) != agent:
            raise PermissionError(f"pid {pid} is not a worker of agent {agent}")
        header, fds, _, _ = socket.recv_fds(conn, 8, 3)
        (size,) = struct.unpack("!Q", header)
        payload = b""
        while len(payload) < size:
            chunk = conn.recv(size - len(payload))
            if not chunk:
                raise ConnectionError("worker went away")
            payload += chunk
        request = json.loads(payload)
        worker_fd = os.pidfd_open(pid)
    except (OSError, ValueError, struct.error):
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    child = os.fork()
    if child == 0:
        with contextlib.suppress(BaseException):
            listener.close()
            os.close(agent_fd)
            for other in trainers.values():
                for fd in (other.pidfd, other.worker_fd):
                    if fd >= 0:
                        os.close(fd)
                other.conn.close()
            os.close(worker_fd)
            _await_go(conn)
            _run_trainer(request, fds)
        os._exit(1)
    for fd in fds:
        os.close(fd)
    child_fd = os.pidfd_open(child)
    trainers[child_fd] = _Trainer(child, conn, child_fd, worker_fd)
    with contextlib.suppress(OSError):
        conn.settimeout(None)
        socket.send_fds(conn, [f"pid {child}\n".encode()], [child_fd])


def _await_go(conn: socket.socket) -> None:
    """In the forked trainer: run only once the worker confirms it stands in for us. A worker
    that timed out and started cold closes the connection instead, and this fork exits."""
    conn.settimeout(REPLY_TIMEOUT_S + 5)
    got = b""
    while len(got) < len(GO):
        chunk = conn.recv(len(GO) - len(got))
        if not chunk:
            os._exit(1)
        got += chunk
    if got != GO:
        os._exit(1)
    conn.close()


def _run_trainer(request: dict, fds: list[int]) -> None:
    # Should the zygote die, the kernel kills this trainer (its worker, which stands in for it,
    # does too); the zygote kills it when its worker dies. Neither needs anything of this process.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the zygote died before the line above
        os._exit(1)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[WARM_ENV] = f"{(time.time() - request['started']) * 1000:.0f}"
    sys.argv = request["argv"]
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # read at import, in the zygote's env
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from train.main import cli

    cli()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
