"""Who the warm-restart hand-off trusts, tried with real processes and a real second user.

A worker sends its whole environment (tokens included) and its stdio to the zygote, so these tests
play the attacker: another local user who squats the names a worker would connect to, a server of
the same user that is not the expected zygote, and a worker that gives up mid-hand-off.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos.squatter import Squat
from conftest import MAIN, REPO, metrics_rows, newest_checkpoint, run_torchrun, tiny_args
from safetensors.torch import load_file

from train.runtime import env as procs
from train.runtime import warmstart

pytestmark = pytest.mark.skipif(not warmstart.supported(), reason="warm restarts need Linux pidfds")
NOBODY = 65534


def test_private_dir_refuses_what_another_user_could_control(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "rt"
    monkeypatch.setenv(warmstart.RUNTIME_DIR_ENV, str(target))
    assert warmstart.private_dir(create=True) == target
    assert (target.stat().st_mode & 0o777) == 0o700

    target.chmod(0o755)  # others may enter: they could read a socket's name, or more
    with pytest.raises(warmstart.Untrusted, match="mode 755"):
        warmstart.private_dir(create=True)
    target.rmdir()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    target.symlink_to(elsewhere)  # a link planted where the directory should be
    with pytest.raises(warmstart.Untrusted, match="not a directory"):
        warmstart.private_dir(create=True)
    target.unlink()

    if os.getuid() == 0:
        target.mkdir(mode=0o700)
        os.chown(target, NOBODY, NOBODY)  # pre-created by another user
        with pytest.raises(warmstart.Untrusted, match=f"belongs to uid {NOBODY}"):
            warmstart.private_dir(create=True)


@pytest.mark.parametrize(
    ("argv", "env", "config", "off"),
    [
        ([], {}, None, False),
        (["--dist.warm-restart", "false"], {}, None, True),
        (["--dist.warm-restart=False"], {}, None, True),
        (["--dist.warm_restart", "0"], {}, None, True),
        (["--dist.warm-restart", "true"], {"FTJOB_WARM_RESTART": "0"}, None, True),
        (["--config", "CFG"], {}, "[dist]\nwarm_restart = false\n", True),
        (["--config", "CFG", "--dist.warm-restart", "true"], {}, "[dist]\nwarm_restart = false\n", False),
        (["--config", "CFG"], {}, '[dist]\nbackend = "gloo"\n', False),
    ],
)
def test_opt_out_is_read_before_the_config_parser(
    tmp_path: Path, monkeypatch, argv: list[str], env: dict, config: str | None, off: bool
) -> None:
    monkeypatch.delenv("FTJOB_WARM_RESTART", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if config is not None:
        (tmp_path / "c.toml").write_text(config)
        argv = [str(tmp_path / "c.toml") if a == "CFG" else a for a in argv]
    assert warmstart.opted_out(argv) is off


class FakeZygote:
    """A listener at this process's zygote address, trusted as far as a worker can tell (same user,
    named in the pid file): it counts connections and what it was sent, and answers nothing."""

    def __init__(self, runtime: Path):
        os.environ[warmstart.RUNTIME_DIR_ENV] = str(runtime)
        warmstart.private_dir(create=True)
        self.sock_path, pid_file = warmstart.socket_paths(os.getpid())
        pid_file.write_text(json.dumps({"pid": os.getpid(), "start": procs.start_ticks(os.getpid())}))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock_path))
        self.listener.listen(8)
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()  # the worker then starts cold


@pytest.fixture
def fake_zygote(tmp_path: Path) -> Iterator[FakeZygote]:
    saved = os.environ.get(warmstart.RUNTIME_DIR_ENV)
    fake = FakeZygote(tmp_path / "rt")
    yield fake
    fake.listener.close()
    if saved is None:
        os.environ.pop(warmstart.RUNTIME_DIR_ENV, None)
    else:
        os.environ[warmstart.RUNTIME_DIR_ENV] = saved


def _worker(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``python train/main.py`` as torchrun would start it (this process standing in for the agent)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "FTJOB_WARM_RESTART")}
    full.update({"TORCHELASTIC_RUN_ID": "trust-test", **env})
    return subprocess.run(
        [sys.executable, MAIN, *args], env=full, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_opt_out_really_opts_out(fake_zygote: FakeZygote, tmp_path: Path) -> None:
    assert _worker(["--help"]).returncode == 0
    assert fake_zygote.connections == 1  # without an opt-out the worker does knock

    (tmp_path / "off.toml").write_text("[dist]\nwarm_restart = false\n")
    for args, env in [
        (["--dist.warm-restart", "false", "--help"], {}),
        (["--help"], {"FTJOB_WARM_RESTART": "0"}),
        (["--config", str(tmp_path / "off.toml"), "--help"], {}),
    ]:
        result = _worker(args, **env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert fake_zygote.connections == 1, "an opted-out worker still connected"


def test_a_listener_that_is_not_the_expected_zygote_gets_nothing(fake_zygote: FakeZygote) -> None:
    # Same user, right path, but the pid file names another process: the worker must not send.
    _, pid_file = warmstart.socket_paths(os.getpid())
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(json.dumps({"pid": other.pid, "start": procs.start_ticks(other.pid)}))
        got = []

        def serve() -> None:
            fake_zygote.listener.close()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fake_zygote.sock_path.unlink()
            listener.bind(str(fake_zygote.sock_path))
            listener.listen(1)
            listener.settimeout(60)
            conn, _ = listener.accept()
            conn.settimeout(5)
            try:
                while chunk := conn.recv(65536):
                    got.append(chunk)
            except OSError:
                pass

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        time.sleep(0.2)
        result = _worker(["--help"])
        server.join(10)
        assert result.returncode == 0
        assert b"".join(got) == b"", "the worker sent bytes to a process it could not verify"
    finally:
        other.kill()
        other.wait()


def test_a_worker_that_gives_up_never_leaves_a_second_trainer(
    corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv(warmstart.RUNTIME_DIR_ENV, str(tmp_path / "rt"))
    zygote = subprocess.Popen(
        [sys.executable, str(REPO / "train" / "runtime" / "zygote.py"), str(os.getpid())],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not warmstart.listening(os.getpid()):
            assert zygote.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        run_dir = tmp_path / "run"
        # A worker that sends its request, gets the fork's answer, then gives up (as one whose reply
        # timed out would) and goes on cold: the forked trainer must not start.
        quitter = textwrap.dedent(
            f"""
            import json, os, socket, struct, sys
            sys.path.insert(0, {str(REPO)!r})
            from train.runtime import warmstart
            sock = warmstart._connect(os.getppid())
            payload = json.dumps({{"argv": [{MAIN!r}, *{tiny_args(run_dir, corpus, max_steps=3)!r}],
                                  "cwd": os.getcwd(), "env": dict(os.environ), "started": 0}}).encode()
            socket.send_fds(sock, [struct.pack("!Q", len(payload))], [0, 1, 2])
            sock.sendall(payload)
            reply, fds, _, _ = socket.recv_fds(sock, 64, 1)
            print(reply.decode().split()[1])
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", quitter],
            env={**os.environ, "TORCHELASTIC_RUN_ID": "trust-test"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        forked = int(out.stdout.strip() or 0)
        assert forked, out.stderr[-2000:]
        deadline = time.monotonic() + 20
        while _alive(forked) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(forked), "the fork of an abandoned hand-off is still running"
        assert not (run_dir / "metrics.jsonl").exists(), "the abandoned fork trained"
        assert zygote.poll() is None
    finally:
        zygote.kill()
        zygote.wait()


def _alive(pid: int) -> bool:
    try:
        return procs.proc_stat(pid)[0] not in ("Z", "X")
    except OSError:
        return False


# -- a real second user ----------------------------------------------------------------------------
@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_another_user_squatting_the_socket_gets_nothing_and_the_run_is_correct(
    corpus: Path, tmp_path: Path, monkeypatch
) -> None:
    """The squatter (tests/chaos/squatter.py, as uid 65534) owns the runtime dir a job with its
    TMPDIR would use, binds the new and the old socket names, and would have a process killed."""
    run_dir, steps = tmp_path / "run", 24
    squat = Squat(run_dir, seconds=90)
    try:
        env = {"TMPDIR": str(squat.shared), "FTJOB_FAULT": "slow:ms=60:restart=any;crash:step=12:rank=1"}
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.delenv(warmstart.RUNTIME_DIR_ENV, raising=False)
        result = run_torchrun(tiny_args(run_dir, corpus, max_steps=steps), max_restarts=2, env=env)
        squatted = squat.log.read_text()
        assert "bound" in squatted, squatted  # the attack was in place before the crash
        assert result.returncode == 0, result.stderr[-3000:]
        assert "accepted" not in squatted and "received" not in squatted, squatted
        assert squat.victim.poll() is None, "the worker killed a pid the squatter named"
        assert result.stderr.count("warning: warm restarts off:") == 1, result.stderr[-3000:]
        assert f"belongs to uid {NOBODY}" in result.stderr
        assert "warm restart: trainer forked" not in result.stderr  # cold, as it must be
        assert max(r.get("restart", 0) for r in metrics_rows(run_dir)) == 1

        reference = tmp_path / "reference"
        clean = run_torchrun(tiny_args(reference, corpus, max_steps=steps))
        assert clean.returncode == 0, clean.stderr[-3000:]
        assert newest_checkpoint(run_dir) == steps
        got = load_file(run_dir / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
        want = load_file(reference / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    finally:
        squat.close()
