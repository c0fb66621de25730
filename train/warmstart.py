"""Warm restarts: a restarted worker skips interpreter start-up and ``import torch``.

On this kind of machine a torchrun restart spends ~1.3 s of its ~2.5 s starting Python and
importing torch, in every worker, every time. So the first worker of a node (local rank 0) starts
a *zygote* for its torchrun agent: a process that imports torch and this package once and then
waits. When torchrun restarts the workers, each new worker - still only ``python train/main.py``
with the standard library loaded - hands its argv, environment, working directory and stdio to
the zygote, which forks a ready trainer. The worker stays behind as the trainer's stand-in, so
torchrun sees nothing different:
- signals torchrun (or anyone) sends the worker are passed on to the trainer;
- the worker exits with the trainer's exit status, or dies of the same signal;
- if the worker is SIGKILLed, the trainer kills itself at once (it watches the worker's pidfd).
The zygote only ever imports (no threads, no CUDA), so forking it is safe; it listens on an
abstract Unix socket named after its agent, serves only processes of the same user whose parent is
that agent, and exits when the agent does. Without a zygote (first start, not Linux, not under
torchrun, ``--dist.warm-restart false``) a worker starts cold as before.

This module must import nothing beyond the standard library at the top: it runs before torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

AGENT_PID_ENV = "FTJOB_AGENT_PID"  # the torchrun agent, for a trainer whose parent is the zygote
WARM_ENV = "FTJOB_WARM_START"  # set in a forked trainer: "<ms from worker start to fork>"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_REPLY_TIMEOUT_S = 30.0


def supported() -> bool:
    return sys.platform == "linux" and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


def agent_pid() -> int:
    """The torchrun agent that started this worker (the parent, unless forked by a zygote)."""
    return int(os.environ.get(AGENT_PID_ENV) or os.getppid())


def torchrun_agent() -> int | None:
    """agent_pid() if this worker really is a torchrun worker (not, e.g., started by a wrapper
    script that torchrun runs, or by plain python)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    agent = agent_pid()
    try:
        cmdline = Path(f"/proc/{agent}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    return agent if ("torchrun" in cmdline or "torch.distributed.run" in cmdline) else None


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 on (after the parenthesised command name, which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> str:
    return _stat(pid)[19]  # start time: tells a reused pid apart


def _address(agent: int) -> bytes:
    return f"\0ftjob-zygote-{os.getuid()}-{agent}-{_start_ticks(agent)}".encode()


def listening(agent: int) -> bool:
    """Whether a zygote for this agent accepts workers now (it refuses this caller, harmlessly)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(_address(agent))
        except OSError:
            return False
    return True


# -- the worker side -------------------------------------------------------------------------------
def handoff() -> None:
    """Run this worker in a forked trainer if this agent has a zygote; return only if not."""
    os.environ.pop(AGENT_PID_ENV, None)
    if not supported() or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(_address(os.getppid()))
        request = {
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "env": {**os.environ, AGENT_PID_ENV: str(os.getppid())},
            "started": _process_start_time(),
        }
        payload = json.dumps(request).encode()
        socket.send_fds(sock, [struct.pack("!Q", len(payload))], [0, 1, 2])
        sock.sendall(payload)
        sock.settimeout(_REPLY_TIMEOUT_S)
        replies = sock.makefile("r")
        first = replies.readline()
    except OSError:  # no zygote (cold start), or it is gone: start cold
        sock.close()
        return
    if not first.startswith("pid "):
        return  # the zygote refused (e.g. shutting down): start cold
    _stand_in(int(first.split()[1]), sock, replies)


def _process_start_time() -> float:
    ticks = int(_start_ticks(os.getpid())) / os.sysconf("SC_CLK_TCK")
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks


def _stand_in(trainer: int, sock: socket.socket, replies) -> None:
    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(trainer, signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    sock.settimeout(None)
    status = replies.readline().split()
    if len(status) == 2 and status[0] == "signal":
        sig = int(status[1])
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    if len(status) == 2 and status[0] == "exit":
        os._exit(int(status[1]))
    # The zygote died before the trainer did: do not leave a trainer nobody can wait for.
    with contextlib.suppress(ProcessLookupError):
        os.kill(trainer, signal.SIGKILL)
    print("error: warm-start zygote vanished; the worker fails so torchrun restarts it", file=sys.stderr)
    os._exit(1)


# -- starting a zygote -----------------------------------------------------------------------------
def start_zygote(enabled: bool) -> None:
    """From a cold worker: give this worker's agent a zygote for its next restart, if useful."""
    if not (enabled and supported()):
        return
    if os.environ.get("LOCAL_RANK", "0") != "0" or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) < 1:
        return  # one per agent; and without restarts there is nothing to warm
    agent = torchrun_agent()
    if agent is None:
        return  # a zygote would be keyed to a wrapper process that dies with every attempt
    subprocess.Popen(
        [sys.executable, "-u", __file__, str(agent)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # out of the worker's process group, which torchrun kills
    )


# -- the zygote ------------------------------------------------------------------------------------
def serve(agent: int) -> None:
    try:
        agent_fd = os.pidfd_open(agent)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(_address(agent))  # taken: another zygote serves this agent
    except OSError:
        return
    # Bound but not listening yet: a worker that connects now is refused and starts cold.
    import torch._dynamo  # noqa: F401  the first optimizer built imports it: 0.8 s

    import train.main  # noqa: F401  what a worker would import, once
    from train import config

    with contextlib.suppress(BaseException):
        config.parse(["--run-dir", os.devnull])  # tyro builds its parser once: ~0.1 s less later

    listener.listen(64)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the worker's connection)
    while True:
        ready, _, _ = select.select([listener, agent_fd, *children], [], [])
        if agent_fd in ready:
            return  # the job is over (or the agent died): nothing left to serve
        for fd in ready:
            if fd in children:
                pid, conn = children.pop(fd)
                _report(pid, conn)
                os.close(fd)
        if listener in ready:
            _accept(listener, agent, agent_fd, children)


def _report(pid: int, conn: socket.socket) -> None:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with contextlib.suppress(OSError):
        conn.sendall(f"signal {-code}\n".encode() if code < 0 else f"exit {code}\n".encode())
    conn.close()


def _accept(listener: socket.socket, agent: int, agent_fd: int, children: dict) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(5.0)
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid() or int(_stat(pid)[1]) != agent:
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
            for fd, (_, other) in children.items():
                os.close(fd)
                other.close()
            conn.close()
            _run_trainer(request, fds, worker_fd)
        os._exit(1)
    for fd in fds:
        os.close(fd)
    os.close(worker_fd)
    children[os.pidfd_open(child)] = (child, conn)
    with contextlib.suppress(OSError):
        conn.settimeout(None)
        conn.sendall(f"pid {child}\n".encode())


def _run_trainer(request: dict, fds: list[int], worker_fd: int) -> None:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[WARM_ENV] = f"{(time.time() - request['started']) * 1000:.0f}"
    sys.argv = request["argv"]
    threading.Thread(target=_die_with_worker, args=(worker_fd,), daemon=True).start()
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # read at import, in the zygote's env
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from train.main import cli

    cli()


def _die_with_worker(worker_fd: int) -> None:
    select.select([worker_fd], [], [])  # readable once the worker has exited
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    serve(int(sys.argv[1]))
