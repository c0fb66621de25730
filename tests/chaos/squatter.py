"""Runs as another local user: squats every name a worker of one torchrun job could connect to.

    squatter.py SHARED_TMP LOG VICTIM_PID UID RUN_DIR SECONDS

It owns SHARED_TMP/ftjob-UID (the runtime dir a job with TMPDIR=SHARED_TMP would use), binds the
socket names there and the abstract names of the old protocol for the torchrun agent whose command
line names RUN_DIR, answers every connection with "pid VICTIM_PID" and logs every byte it receives.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time


def start_ticks(pid: str) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]


def main() -> None:
    shared, log_path, victim, uid, run_dir = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        sys.argv[4],
        sys.argv[5],
    )
    log = open(log_path, "a", buffering=1)  # noqa: SIM115
    squat = os.path.join(shared, f"ftjob-{uid}")
    os.mkdir(squat, 0o777)
    os.chmod(squat, 0o777)
    log.write(f"owns {squat}\n")
    listeners: list[socket.socket] = []
    conns: list[socket.socket] = []
    seen: set[str] = set()
    deadline = time.monotonic() + float(sys.argv[6])
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or entry in seen:
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
                ticks = start_ticks(entry)
            except OSError:
                continue
            seen.add(entry)
            if b"torch.distributed.run" not in cmd or run_dir.encode() not in cmd:
                continue
            for address in (
                f"\0ftjob-zygote-{uid}-{entry}-{ticks}",
                os.path.join(squat, f"zygote-{entry}-{ticks}.sock"),
            ):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.bind(address)
                    s.listen(16)
                    listeners.append(s)
                    log.write(f"bound {address!r}\n")
                except OSError as e:
                    log.write(f"bind failed {address!r}: {e}\n")
            with open(os.path.join(squat, f"zygote-{entry}-{ticks}.pid"), "w") as f:
                json.dump({"pid": os.getpid(), "start": start_ticks(str(os.getpid()))}, f)
        ready, _, _ = select.select(listeners + conns, [], [], 0.02)
        for s in ready:
            if s in listeners:
                c, _ = s.accept()
                conns.append(c)
                log.write("accepted\n")
                c.sendall(f"pid {victim}\n".encode())  # the old protocol's "please signal this pid"
            else:
                data = s.recv(65536)
                log.write(f"received {len(data)} bytes\n")
                if not data:
                    conns.remove(s)
                    s.close()


class Squat:
    """Start this script as another user (nobody) against the torchrun of RUN_DIR, with a process of
    ours it will ask to have killed; for the tests (they run as root). ``close()`` ends it."""

    NOBODY = 65534

    def __init__(self, run_dir: object, seconds: float = 300):
        import shutil
        import subprocess
        import tempfile
        from pathlib import Path

        self.shared = Path(tempfile.mkdtemp(prefix="ftjob-squat-"))  # a second /tmp: sticky, world-writable
        self.shared.chmod(0o1777)
        self.log = self.shared / "squatter.log"
        self.log.touch()
        self.log.chmod(0o666)
        script = self.shared / "squatter.py"
        shutil.copy(__file__, script)
        script.chmod(0o644)
        self.victim = subprocess.Popen(["sleep", str(int(seconds) + 60)])
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={self.NOBODY}", f"--regid={self.NOBODY}", "--clear-groups", sys.executable,
             str(script), str(self.shared), str(self.log), str(self.victim.pid), str(os.getuid()),
             str(run_dir), str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def close(self) -> None:
        import shutil
        import signal

        for proc in (self.proc, self.victim):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        shutil.rmtree(self.shared, ignore_errors=True)


if __name__ == "__main__":
    main()
