"""What every chaos family needs: a session (corpus, reference runs, clean-up), real torchrun jobs
bounded by timeouts, the training processes of a job, and the result rows the table shows."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO / "tests", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from conftest import MAIN, TORCHRUN, tiny_args  # noqa: E402

STEPS = 200  # one training config (with the tiny model) for every family: one reference run
TAG_ENV = "FTJOB_CHAOS_TAG"  # marks every process a job of ours started, zygotes and trainers too
SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2"
# Options that do not change what is trained: runs differing only in these share a reference.
NOT_TRAINING = ("--run-dir", "--data.cache-dir", "--ckpt.", "--watchdog.", "--dist.")


# -- results -----------------------------------------------------------------------------------------
@dataclass
class Trial:
    ok: bool
    why: str = ""  # one line, when not ok
    lost: int | None = None  # completed steps lost
    identical: bool | None = None  # final weights vs the uninterrupted run; None: not applicable


@dataclass
class Row:
    family: str
    trials: list[Trial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""  # why the whole family did not run

    @property
    def passed(self) -> int:
        return sum(t.ok for t in self.trials)

    @property
    def failures(self) -> list[str]:
        return [
            f"{self.family} trial {i + 1}: {' '.join(t.why.split())}"
            for i, t in enumerate(self.trials)
            if not t.ok
        ]


# -- processes ---------------------------------------------------------------------------------------
@dataclass
class Proc:
    pid: int
    ppid: int
    state: str
    cmd: str
    env: dict[str, str]


def scan(tag: str, prefix: bool = False) -> dict[int, Proc]:
    """Every live process whose environment carries this tag (``prefix``: or one starting so)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _has_tag(int(entry), tag, prefix):
            continue
        try:
            raw = Path(f"/proc/{entry}/environ").read_bytes()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] in ("Z", "X"):
            continue
        env = dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)
        out[int(entry)] = Proc(int(entry), int(fields[1]), fields[0], cmd, env)
    return out


def pidfd_targets(pid: int) -> list[int]:
    """The pids of the pidfds a process holds (a forked trainer holds its worker's)."""
    found = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                    if line.startswith("Pid:"):
                        found.append(int(line.split()[1]))
    return found


@dataclass
class Target:
    pid: int
    rank: int
    restart: int
    warm: bool  # a trainer forked by the zygote (else the torchrun worker itself)


def training_processes(tag: str) -> list[Target]:
    """Each rank's training process: the worker (``train/main.py``, RANK in its environment) and,
    after a warm restart, the trainer the zygote forked for it (its environment in /proc is the
    zygote's, so its rank is its worker's: the one that holds its pidfd)."""
    procs = scan(tag)
    workers = {p.pid: p for p in procs.values() if "RANK" in p.env and "train/main.py" in p.cmd}
    zygotes = {p.pid for p in procs.values() if "train/runtime/zygote.py" in p.cmd}
    out = [
        Target(p.pid, int(p.env["RANK"]), int(p.env.get("TORCHELASTIC_RESTART_COUNT", "0")), False)
        for p in workers.values()
    ]
    trainers = {p.pid for p in procs.values() if p.ppid in zygotes}
    # The worker holds its trainer's pidfd (to pass signals on); the zygote holds the worker's.
    for worker in workers.values():
        for pid in pidfd_targets(worker.pid):
            if pid in trainers:
                restart = int(worker.env.get("TORCHELASTIC_RESTART_COUNT", "0"))
                out.append(Target(pid, int(worker.env["RANK"]), restart, True))
    return out


def _has_tag(pid: int, tag: str, prefix: bool) -> bool:
    want = f"{TAG_ENV}={tag}".encode()
    try:
        found = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(x == want or (prefix and x.startswith(want)) for x in found)


def kill_ours(pid: int, tag: str, prefix: bool = False) -> bool:
    """SIGKILL ``pid`` if it still is a process of ours carrying ``tag`` (checked through a pidfd,
    so a pid reused meanwhile is never hit); whether it was sent."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not _has_tag(pid, tag, prefix):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kill_tag(tag: str, prefix: bool = False) -> None:
    """SIGKILL every process of ours that carries the tag (zygotes and trainers included)."""
    for _ in range(3):
        procs = scan(tag, prefix)
        if not procs:
            return
        for pid in procs:
            kill_ours(pid, tag, prefix)
        time.sleep(0.2)


# -- jobs --------------------------------------------------------------------------------------------
class Job:
    """One real torchrun (or launcher) process, its output in files, bounded by a timeout."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_dir: Path, timeout: float):
        self.tag = f"{SESSION_TAG}-{uuid.uuid4().hex[:8]}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.err_path = log_dir / "stderr.txt"
        full = {k: v for k, v in os.environ.items() if k not in ("FTJOB_FAULT", "FTJOB_STATUS_FILE")}
        full.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", TAG_ENV: self.tag, **env})
        with open(log_dir / "stdout.txt", "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd, env=full, cwd=REPO, stdout=out, stderr=err, start_new_session=True
            )
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timed_out = False
        _live_jobs.add(self.tag)

    def running(self) -> bool:
        """Still running, and within its timeout (past it, it is killed: False from then on)."""
        if self.proc.poll() is not None:
            return False
        if time.monotonic() > self.deadline:
            self.timed_out = True
            self.stop()
            return False
        return True

    def sleep(self, seconds: float) -> None:
        """Sleep, but no longer than the job runs."""
        end = time.monotonic() + seconds
        while self.running() and time.monotonic() < end:
            time.sleep(min(0.02, max(end - time.monotonic(), 0)))

    def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until ``condition()`` holds or the job has ended."""
        while self.running() and not condition():
            time.sleep(0.02)

    def wait(self) -> int | None:
        """The exit code, or None if it ran past its timeout (then it and all it started are killed).
        Whatever it started that outlives it by LEFTOVER_S (a trainer, a zygote, a DataLoader
        worker) is noted in LEFTOVERS before it is killed."""
        try:
            self.proc.wait(timeout=max(self.deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.timed_out = True
        if not self.timed_out:
            gone_by = time.monotonic() + LEFTOVER_S
            while (left := scan(self.tag)) and time.monotonic() < gone_by:
                time.sleep(0.2)
            LEFTOVERS.extend(f"pid {p.pid} ({p.cmd[:100]}) outlived its job" for p in left.values())
        self.stop()
        return None if self.timed_out else self.proc.returncode

    def stop(self) -> None:
        """Kill it and everything it started (found by the tag in their environment)."""
        if self.proc.poll() is None:  # not reaped: its process group id is still ours
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        kill_tag(self.tag)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        _live_jobs.discard(self.tag)

    @property
    def stderr(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except OSError:
            return ""

    def took(self) -> float:
        return time.monotonic() - self.started


LEFTOVER_S = 10.0
LEFTOVERS: list[str] = []  # processes that outlived their job, until a family reports them
SESSION_TAG = f"chaos-{os.getpid()}-{uuid.uuid4().hex[:6]}"
_live_jobs: set[str] = set()


def torchrun_cmd(args: list[str], max_restarts: int = 0, extra: list[str] | None = None) -> list[str]:
    return [
        *TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        *(extra or []),
        MAIN,
        *args,
    ]


def tail(text: str, n: int = 3) -> str:
    """The last few meaningful lines of a log, joined into one line for a failure reason."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("  ")]
    return " | ".join(lines[-n:])[-400:]


# -- the session -------------------------------------------------------------------------------------
class Session:
    """Temporary directories, the corpus, the data cache and the reference runs of one chaos run."""

    def __init__(self, root: Path, seed: int):
        self.root, self.seed = root, seed
        self.rng = random.Random(seed)
        self.corpus = root / "corpus.txt"
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
        self.corpus.write_bytes(b"\n".join(p.read_bytes() for p in files))
        self.cache = root / "data-cache"
        self._references: dict[tuple[str, ...], Path | str] = {}
        self._count = 0
        self.mounts: list[Path] = []
        self.partial: tuple[Path, str, str] | None = None  # a stopped run several families copy
        self.tmp = root / "tmp"  # TMPDIR of every job: torchrun's logs, warm-start sockets go there
        self.tmp.mkdir(mode=0o700)

    def fresh(self, name: str) -> Path:
        self._count += 1
        path = self.root / f"{self._count:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def args(self, run_dir: Path, **overrides: object) -> list[str]:
        opts: dict[str, object] = {"max_steps": STEPS, "ckpt__keep": 3, "data__cache_dir": self.cache}
        opts.update(overrides)
        return tiny_args(run_dir, self.corpus, **opts)

    def job(
        self,
        args: list[str],
        log_dir: Path,
        fault: str = "",
        max_restarts: int = 0,
        timeout: float = 240,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Job:
        cmd = torchrun_cmd(args, max_restarts, extra)
        env = {"TMPDIR": str(self.tmp), **({"FTJOB_FAULT": fault} if fault else {}), **(env or {})}
        return Job(cmd, env, log_dir, timeout)

    def run(self, args: list[str], log_dir: Path, **how) -> tuple[int | None, Job]:
        job = self.job(args, log_dir, **how)
        return job.wait(), job

    def reference(self, args: list[str]) -> Path:
        """The uninterrupted run of the training config these args describe (computed once)."""
        key = _training_key(args)
        if key not in self._references:
            where = self.fresh("reference")
            run_dir = where / "run"
            ref_args = _with_run_dir(args, run_dir)
            code, job = self.run(ref_args, where / "log", timeout=300)
            self._references[key] = (
                run_dir
                if code == 0
                else f"the uninterrupted reference run failed ({code}): {tail(job.stderr)}"
            )
        found = self._references[key]
        if isinstance(found, str):
            raise RuntimeError(found)
        return found

    def close(self, keep: bool = False) -> None:
        """Kill whatever of ours still runs, unmount, and delete the work dir unless ``keep``."""
        for tag in list(_live_jobs):
            kill_tag(tag)
        kill_tag(SESSION_TAG, prefix=True)
        for mount in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        self.mounts.clear()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def _training_key(args: list[str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(args):
        name, value = args[i], args[i + 1]
        if not any(name == p or (p.endswith(".") and name.startswith(p)) for p in NOT_TRAINING):
            out += [name, value]
        i += 2
    return tuple(out)


def _with_run_dir(args: list[str], run_dir: Path) -> list[str]:
    out = list(args)
    out[out.index("--run-dir") + 1] = str(run_dir)
    return out
