"""Warm restarts: a restarted worker skips interpreter start-up and ``import torch``.

On this kind of machine a torchrun restart spends ~1.3 s of its ~2.5 s starting Python and
importing torch, in every worker, every time. So the first worker of a node (local rank 0) starts
a *zygote* for its torchrun agent: a process that imports torch and this package once and then
waits. When torchrun restarts the workers, each new worker - still only ``python train/main.py``
with the standard library loaded - hands its argv, environment, working directory and stdio to
the zygote, which forks a ready trainer. The worker stays behind as the trainer's stand-in, so
torchrun sees nothing different:
- signals torchrun (or anyone) sends the worker are passed on to the trainer (through a pidfd the
  zygote hands over, never through a pid number anyone could name);
- the worker exits with the trainer's exit status, or dies of the same signal;
- if the worker is SIGKILLed, the trainer kills itself at once (it watches the worker's pidfd).

Trust, both ways. The worker sends its environment (tokens included) and its stdio, so it talks
only to the zygote it expects: the socket lives in a directory only this user can write (mode
0700, checked, never followed through a symlink; see ``runtime_dir``), and before a single byte
goes out the worker checks with SO_PEERCRED that the listening process is that user's and is
exactly the zygote named in the pid file beside the socket. The zygote, in turn, serves only
processes of the same user whose parent is its agent. A forked trainer does nothing until its
worker confirms it is standing in (a worker that gave up waiting never leaves a second trainer
of its rank running). A directory another user owns or can write disables warm restarts with
one warning; ``--dist.warm-restart false`` or ``FTJOB_WARM_RESTART=0`` means no zygote and no
hand-off attempt at all.

The zygote only ever imports (no threads, no CUDA), so forking it is safe, and it exits when its
agent does. Its limits: a forked trainer runs the code and the import-time state of the first
start - environment variables that torch (or the job's modules) read at import keep the first
attempt's values (``OMP_NUM_THREADS`` is re-applied); edits to the package take effect at the
next torchrun launch. Without a zygote (first start, not Linux, not under torchrun, opted out) a
worker starts cold as before.

This module must import nothing beyond the standard library at the top: it runs before torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from train.runtime import env, private
from train.runtime.private import Untrusted

AGENT_PID_ENV = "FTJOB_AGENT_PID"  # the torchrun agent, for a trainer whose parent is the zygote
WARM_ENV = "FTJOB_WARM_START"  # set in a forked trainer: "<ms from worker start to fork>"


def warm_ms() -> str | None:
    """In a trainer forked by a warm restart: ms from its worker's start to the fork; else None."""
    return os.environ.get(WARM_ENV) or None


def on_start(enabled: bool) -> None:
    """At every start of a worker: say that it is a warm one, or start a zygote for the next."""
    if warm_ms():
        logging.getLogger("train").info(
            "warm restart: trainer forked %s ms after the worker started", warm_ms()
        )
    else:
        start_zygote(enabled)


OPT_OUT_ENV = "FTJOB_WARM_RESTART"  # "0"/"false"/"no"/"off": no zygote, no hand-off
RUNTIME_DIR_ENV = "FTJOB_RUNTIME_DIR"  # where sockets go (default: $XDG_RUNTIME_DIR/ftjob or /tmp/ftjob-UID)
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
REPLY_TIMEOUT_S = 30.0
GO = b"go\n"  # the worker's "I am standing in": only then does a forked trainer start
_FALSE = ("0", "false", "no", "off")


def supported() -> bool:
    return sys.platform == "linux" and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


def agent_pid() -> int:
    """The torchrun agent that started this worker (the parent, unless forked by a zygote)."""
    return int(os.environ.get(AGENT_PID_ENV) or os.getppid())


def torchrun_agent() -> int | None:
    """agent_pid() if this worker really is a torchrun worker (not, e.g., started by a wrapper
    script that torchrun runs, or by plain python)."""
    if not env.launch().under_torchrun:
        return None
    agent = agent_pid()
    try:
        cmdline = env.cmdline(agent)
    except OSError:
        return None
    return agent if ("torchrun" in cmdline or "torch.distributed.run" in cmdline) else None


# -- where the socket lives ------------------------------------------------------------------------
def runtime_dir() -> Path:
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and _private(Path(xdg)):
        return Path(xdg) / "ftjob"
    return Path(tempfile.gettempdir()) / f"ftjob-{os.getuid()}"


def _private(path: Path) -> bool:
    try:
        private.private_dir(path, create=False)
    except (OSError, Untrusted):
        return False
    return True


def private_dir(create: bool) -> Path:
    """runtime_dir(), made if asked; raises Untrusted unless only this user can enter it (anyone
    could pre-create /tmp/ftjob-UID)."""
    return private.private_dir(runtime_dir(), create)


def socket_paths(agent: int) -> tuple[Path, Path]:
    """(socket, pid file) of the zygote of this agent; the agent's start time tells a reused pid apart."""
    base = private_dir(create=False) / f"zygote-{agent}-{env.start_ticks(agent)}"
    return base.with_suffix(".sock"), base.with_suffix(".pid")


def _expected_zygote(pid_file: Path) -> int:
    """The zygote's pid, from the file it wrote, if that process is still the one that wrote it."""
    record = json.loads(pid_file.read_text())
    pid = int(record["pid"])
    if env.start_ticks(pid) != record["start"]:
        raise ProcessLookupError(f"zygote {pid} is gone")
    return pid


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def _connect(agent: int) -> socket.socket:
    """A connection to this agent's zygote, checked to be that very process; raises OSError or
    ValueError when there is none (or it is not the one expected)."""
    sock_path, pid_file = socket_paths(agent)
    expected = _expected_zygote(pid_file)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        sock.connect(str(sock_path))
        pid, uid = peer_credentials(sock)
        if uid != os.getuid() or pid != expected:
            raise PermissionError(
                f"socket {sock_path} is served by pid {pid} uid {uid}, not zygote {expected}"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def listening(agent: int) -> bool:
    """Whether this agent's zygote accepts workers now (it refuses this caller, harmlessly)."""
    try:
        _connect(agent).close()
    except (OSError, ValueError, KeyError, Untrusted):
        return False
    return True


def opted_out(argv: list[str]) -> bool:
    """``--dist.warm-restart false`` (CLI, or the ``--config`` file) or FTJOB_WARM_RESTART=0, read
    without the config parser: the hand-off runs before torch or tyro is imported."""
    if os.environ.get(OPT_OUT_ENV, "").lower() in _FALSE:
        return True
    flags = ("--dist.warm-restart", "--dist.warm_restart")
    cli = config_file = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name in flags:
            cli = value
        elif name == "--config":
            config_file = value
    if cli is not None:
        return cli.lower() in _FALSE
    return config_file is not None and _file_says_off(config_file)


def _file_says_off(path: str) -> bool:
    try:
        text = Path(path).read_text()
        raw = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
        section = raw.get("dist", {})
        value = section.get("warm_restart", section.get("warm-restart", True))
    except (OSError, ValueError, AttributeError):
        return False  # the job itself reports a bad config file
    return value is False or str(value).lower() in _FALSE


# -- the worker side -------------------------------------------------------------------------------
def handoff() -> None:
    """Run this worker in a forked trainer if this agent has a zygote; return only if not."""
    os.environ.pop(AGENT_PID_ENV, None)
    if not supported() or not env.launch().under_torchrun or opted_out(sys.argv[1:]):
        return
    try:
        sock = _connect(os.getppid())
    except (OSError, ValueError, KeyError, Untrusted):
        return  # no zygote (a cold start), or not one this worker can trust
    try:
        request = {
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "env": {**os.environ, AGENT_PID_ENV: str(os.getppid())},
            "started": _process_start_time(),
        }
        payload = json.dumps(request).encode()
        socket.send_fds(sock, [struct.pack("!Q", len(payload))], [0, 1, 2])
        sock.sendall(payload)
        sock.settimeout(REPLY_TIMEOUT_S)
        reply, fds, _, _ = socket.recv_fds(sock, 64, 1)
        if not reply.startswith(b"pid ") or len(fds) != 1:
            raise ConnectionError("the zygote refused")
        sock.sendall(GO)
    except OSError:
        # Gave up (or was refused): start cold. Without our "go", a trainer the zygote may still
        # fork for this request exits at once, so this rank never runs twice.
        sock.close()
        return
    _stand_in(fds[0], sock)


def _process_start_time() -> float:
    ticks = int(env.start_ticks(os.getpid())) / os.sysconf("SC_CLK_TCK")
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks


def _stand_in(trainer_fd: int, sock: socket.socket) -> None:
    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(trainer_fd, signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    sock.settimeout(None)
    status = sock.makefile("r").readline().split()
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
        signal.pidfd_send_signal(trainer_fd, signal.SIGKILL)
    print("error: warm-start zygote vanished; the worker fails so torchrun restarts it", file=sys.stderr)
    os._exit(1)


# -- starting a zygote -----------------------------------------------------------------------------
def start_zygote(enabled: bool) -> None:
    """From a cold worker: give this worker's agent a zygote for its next restart, if useful."""
    if not (enabled and supported()) or os.environ.get(OPT_OUT_ENV, "").lower() in _FALSE:
        return
    launch = env.launch()
    if launch.local_rank != 0 or launch.max_restarts < 1:
        return  # one per agent; and without restarts there is nothing to warm
    agent = torchrun_agent()
    if agent is None:
        return  # a zygote would be keyed to a wrapper process that dies with every attempt
    try:
        private_dir(create=True)
    except (OSError, Untrusted) as e:
        if launch.restart == 0:  # say it once, not per attempt
            print(
                f"warning: warm restarts off: {e}; set {RUNTIME_DIR_ENV} to a directory only you can "
                "write (mode 0700)",
                file=sys.stderr,
                flush=True,
            )
        return
    subprocess.Popen(
        [sys.executable, "-u", str(Path(__file__).with_name("zygote.py")), str(agent)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # out of the worker's process group, which torchrun kills
    )
