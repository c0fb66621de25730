"""launch/slurm.sbatch on a real SLURM cluster: one slurmctld and two slurmd (nodes n1, n2) on this
machine, set up by tests/slurm/cluster.sh (which apt-gets Slurm if needed; root only).

Every test submits the real batch script with sbatch: one torchrun per node (launch/local.sh, one
worker each, so world size 2), c10d rendezvous on the first node, and checks what Slurm itself
reports (``scontrol show job``: JobState, Restarts, ExitCode; there is no accounting daemon, so no
sacct) and what the run left behind. Without root, or when Slurm cannot be installed, the module is
skipped - unless FTJOB_REQUIRE_SLURM=1 (CI), which turns that into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, free_port, metrics_rows, tiny_args

CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
FIRST_ATTEMPT_TORCHRUN = REPO / "tests" / "slurm" / "first-attempt-torchrun.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm.sbatch"
BIN = Path(sys.executable).parent
REQUIRE = os.environ.get("FTJOB_REQUIRE_SLURM") == "1"
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

# func_only: the module's cluster set-up (install, start) is bounded by its own subprocess timeouts.
pytestmark = pytest.mark.timeout(180, func_only=True)


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"FTJOB_REQUIRE_SLURM=1, but {reason}")
    pytest.skip(reason)


def _sh(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 30) -> str:
        done = _sh(list(cmd), self.env, timeout)
        assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr}"
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record as `scontrol show job` has it (kept MinJobAge=300 s after it ends)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def submit(self, tmp_path: Path, args: list[str], options: tuple[str, ...] = (), **exports: str) -> str:
        """sbatch the real launch/slurm.sbatch from tmp_path (``options`` for sbatch itself); the job
        log goes to tmp_path/job.out."""
        exports = {
            "FTJOB_DIR": str(REPO),  # launch/ and train/ (the job is not submitted from the repo root)
            "PYTHON": sys.executable,
            "TORCHRUN": str(BIN / "torchrun"),
            "NPROC": "1",
            "MAX_RESTARTS": "0",  # no torchrun restarts (and no warm-start zygote): Slurm requeues
            "RDZV_PORT": str(free_port()),
            "TORCHRUN_ARGS": "--monitor-interval=0.2",
            "PYTHONUNBUFFERED": "1",
            **exports,
        }
        for key, value in exports.items():
            assert "," not in value, f"{key}={value}: --export cannot carry a comma"
        export = ",".join(["ALL", *(f"{k}={v}" for k, v in exports.items())])
        cmd = [
            "sbatch",
            "--parsable",
            f"--output={tmp_path / 'job.out'}",
            f"--chdir={tmp_path}",
            f"--export={export}",
            *options,
            str(SBATCH_SCRIPT),
            *args,
        ]
        done = subprocess.run(cmd, env=self.env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    def wait(self, job_id: str, tmp_path: Path, timeout: float, restarts: int = 0) -> dict[str, str]:
        """The job's record once it is in a final state after at least `restarts` requeues."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in FINAL_STATES and int(job.get("Restarts", 0)) >= restarts:
                return job
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} not done (restarts >= {restarts}) within {timeout}s: {self.job(job_id)}\n"
            f"{log_tail(tmp_path)}"
        )

    def wait_for_step(self, job_id: str, tmp_path: Path, run_dir: Path, step: int, timeout: float) -> None:
        """Until the run's metrics have a train row for `step` (while the job is still on its way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if max(logged_steps(run_dir), default=0) >= step:
                return
            job = self.job(job_id)
            assert job.get("JobState") not in FINAL_STATES, (
                f"job ended before step {step}: {job}\n" + log_tail(tmp_path)
            )
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}: step {step} not reached within {timeout}s\n{log_tail(tmp_path)}")


def job_processes(job_id: str, attempt: int) -> list[int]:
    """Pids of this machine's processes (both "nodes" run here) started by `attempt` of the job
    (0 = the first), told apart by the SLURM_JOB_ID and SLURM_RESTART_COUNT Slurm gives them."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or a kernel thread
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        restarts = int(env.get(b"SLURM_RESTART_COUNT", b"0"))
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and restarts == attempt:
            pids.append(int(proc.name))
    return pids


def first_attempt_gone(job_id: str, since: float, timeout: float) -> float:
    """The monotonic time at which no process of the job's first attempt was left."""
    while time.monotonic() - since < timeout:
        if not job_processes(job_id, 0):
            return time.monotonic()
        time.sleep(0.05)
    left = job_processes(job_id, 0)
    raise AssertionError(f"job {job_id}: first attempt's processes {left} outlived {timeout}s")


def record_stop_time(what: str, seconds: float) -> None:
    """Stop signal -> last process gone, printed and, with FTJOB_STOP_TIMES=FILE, appended there
    (launch/README.md's table is made from those lines)."""
    line = f"{what}: last process gone {seconds:.2f}s after the stop signal"
    print(line)
    if out := os.environ.get("FTJOB_STOP_TIMES"):
        with open(out, "a") as f:
            f.write(line + "\n")


def logged_steps(run_dir: Path) -> list[int]:
    """Train steps in metrics.jsonl so far (a line being written is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return steps


def log_tail(tmp_path: Path, lines: int = 60) -> str:
    path = tmp_path / "job.out"
    text = path.read_text(errors="replace") if path.exists() else "(no job.out)"
    return "--- job.out (tail)\n" + "\n".join(text.splitlines()[-lines:])


def outcome(job: dict[str, str]) -> tuple[str, str, str]:
    return job.get("JobState", "?"), job.get("ExitCode", "?"), job.get("Restarts", "?")


def job_log(tmp_path: Path) -> str:
    return (tmp_path / "job.out").read_text(errors="replace")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        _unavailable("the SLURM tests need root (they install Slurm and start its daemons)")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "FTJOB_", "TORCHELASTIC_"))
    }
    env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    try:
        done = _sh(["bash", str(CLUSTER_SH), "install"], env, timeout=600)
    except subprocess.TimeoutExpired:
        _unavailable("installing Slurm (tests/slurm/cluster.sh install) took over 600 s")
    if done.returncode != 0:
        _unavailable(f"Slurm could not be installed (tests/slurm/cluster.sh install):\n{done.stderr[-2000:]}")
    cluster_dir = tmp_path_factory.mktemp("slurm")
    env["SLURM_CONF"] = str(cluster_dir / "slurm.conf")
    try:
        done = _sh(["bash", str(CLUSTER_SH), "start", str(cluster_dir)], env, timeout=120)
        assert done.returncode == 0, f"tests/slurm/cluster.sh start failed:\n{done.stderr[-4000:]}"
        yield Cluster(cluster_dir, env)
    finally:
        done = _sh(["bash", str(CLUSTER_SH), "stop", str(cluster_dir)], env, timeout=120)
        if done.returncode != 0:
            print(f"tests/slurm/cluster.sh stop failed:\n{done.stderr}", file=sys.stderr)


def test_cluster_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in (REPO / "tests" / "slurm").glob("*.sh"))
    assert str(CLUSTER_SH) in scripts
    done = subprocess.run([str(BIN / "shellcheck"), *scripts], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_two_node_job_completes(slurm: Cluster, corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = slurm.submit(tmp_path, tiny_args(run_dir, corpus, max_steps=30))
    job = slurm.wait(job_id, tmp_path, timeout=150)
    assert outcome(job) == ("COMPLETED", "0:0", "0"), log_tail(tmp_path)
    assert job["NumNodes"] == "2"
    assert job["NodeList"] == "n[1-2]"
    train = [r for r in metrics_rows(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert {r["world_size"] for r in train} == {2}  # one worker on each of the two nodes
    assert "finished" in job_log(tmp_path)


@pytest.mark.parametrize(
    ("stop", "seen"),
    [(("scancel", "--signal=USR1", "--batch"), "USR1"), (("scontrol", "requeue"), "TERM")],
    ids=["scancel-usr1", "scontrol-requeue"],
)
def test_preemption_saves_requeues_and_completes_with_no_step_lost(
    slurm: Cluster, corpus: Path, tmp_path: Path, stop: tuple[str, ...], seen: str
) -> None:
    # scontrol requeue: Slurm SIGTERMs the batch script, which asks the job to save, then requeues it.
    run_dir, steps = tmp_path / "run", 40
    job_id = slurm.submit(
        tmp_path,
        tiny_args(run_dir, corpus, max_steps=steps),
        FTJOB_FAULT="slow:ms=100:restart=any",  # timing only: the signal lands mid-run
    )
    slurm.wait_for_step(job_id, tmp_path, run_dir, 5, timeout=90)
    signalled = time.monotonic()
    slurm.run(*stop, job_id)
    stop_s = first_attempt_gone(job_id, signalled, timeout=120) - signalled
    record_stop_time(f"slurm {' '.join(stop[:2])}", stop_s)
    # Slurm's KillWait (30 s by default) is how long a node gives a job's processes after SIGTERM.
    assert stop_s < 30, f"last process of attempt 1 gone {stop_s:.1f}s after the stop\n{log_tail(tmp_path)}"
    job = slurm.wait(job_id, tmp_path, timeout=180, restarts=1)
    assert outcome(job) == ("COMPLETED", "0:0", "1"), log_tail(tmp_path)
    rows = metrics_rows(run_dir)
    resumes = [i for i, r in enumerate(rows) if r["kind"] == "resume"]
    assert len(resumes) == 1, rows
    resume = rows[resumes[0]]
    before = [r["step"] for r in rows[: resumes[0]] if r["kind"] == "train"]
    after = [r["step"] for r in rows[resumes[0] :] if r["kind"] == "train"]
    saved = resume["step"]
    assert 5 <= saved < steps
    assert resume["lost_steps"] == 0
    assert before == list(range(1, saved + 1))  # the save was of the last completed step
    assert after == list(range(saved + 1, steps + 1))  # the requeued attempt went on from the next one
    assert {r["world_size"] for r in rows if r["kind"] == "train"} == {2}
    log = job_log(tmp_path)
    assert f"got SIG{seen}" in log
    assert "exit 143: preempted and saved" in log
    assert "attempt 2] finished" in log


def test_retryable_failure_is_requeued_and_the_next_attempt_completes(
    slurm: Cluster, corpus: Path, tmp_path: Path
) -> None:
    run_dir, steps = tmp_path / "run", 20
    # FTJOB_FAULT's restart=0 is torchrun's restart count, 0 again after every requeue: the wrapper
    # sets the fault only while SLURM_RESTART_COUNT is 0, so exactly the first Slurm attempt fails.
    wrapper = tmp_path / FIRST_ATTEMPT_TORCHRUN.name  # a copy: executable whatever git kept of its mode
    shutil.copyfile(FIRST_ATTEMPT_TORCHRUN, wrapper)
    wrapper.chmod(0o755)
    job_id = slurm.submit(
        tmp_path,
        tiny_args(run_dir, corpus, max_steps=steps, ckpt__interval=2),
        TORCHRUN=str(wrapper),
        REAL_TORCHRUN=str(BIN / "torchrun"),
        FIRST_ATTEMPT_FAULT="raise:step=5",
        MAX_RESTARTS="0",  # torchrun gives up at once: launch/local.sh exits 144 (unknown: retryable)
    )
    job = slurm.wait(job_id, tmp_path, timeout=150, restarts=1)
    assert outcome(job) == ("COMPLETED", "0:0", "1"), log_tail(tmp_path)
    log = job_log(tmp_path)
    assert "fault injection: exception after step 5" in log
    assert "exit 144: retryable failure (retry 1 of 3); requeueing" in log
    assert "attempt 2] finished" in log
    rows = metrics_rows(run_dir)
    resumes = [i for i, r in enumerate(rows) if r["kind"] == "resume"]
    assert len(resumes) == 1, rows
    saved = rows[resumes[0]]["step"]
    assert saved in (2, 4)  # a checkpoint of the first attempt
    assert rows[resumes[0]]["lost_steps"] == 5 - saved  # step 5 completed, then the exception
    after = [r["step"] for r in rows[resumes[0] :] if r["kind"] == "train"]
    assert after == list(range(saved + 1, steps + 1))


def test_retryable_failure_every_attempt_gives_up_after_the_retry_budget(
    slurm: Cluster, corpus: Path, tmp_path: Path
) -> None:
    # Without the wrapper the fault fires in every Slurm attempt (torchrun's restart count is 0 in
    # each): requeued FTJOB_MAX_RETRIES times, then the job fails with the retryable code.
    job_id = slurm.submit(
        tmp_path,
        tiny_args(tmp_path / "run", corpus, max_steps=20),
        FTJOB_FAULT="raise:step=2",
        FTJOB_MAX_RETRIES="1",
    )
    job = slurm.wait(job_id, tmp_path, timeout=150, restarts=1)
    assert outcome(job) == ("FAILED", "144:0", "1"), log_tail(tmp_path)
    log = job_log(tmp_path)
    assert "exit 144: retryable failure (retry 1 of 1); requeueing" in log
    assert "exit 144: retryable failure, but already requeued 1 times; giving up" in log


# --- permanent errors on both nodes, requeue, node down, time limit ---------------------------------


def assert_failed_at_once(slurm: Cluster, job_id: str, tmp_path: Path, code: int, started: float) -> str:
    job = slurm.wait(job_id, tmp_path, timeout=60)
    took = time.monotonic() - started
    assert outcome(job) == ("FAILED", f"{code}:0", "0"), log_tail(tmp_path)
    assert took < 60, f"{took:.0f} s"
    log = job_log(tmp_path)
    assert f"exit {code}: permanent failure, not requeueing" in log
    assert log.count("\nerror: ") + log.startswith("error: ") == 1, log  # said once per job
    return log


@pytest.mark.timeout(420, func_only=True)  # five jobs, each bounded on its own
def test_a_bad_flag_fails_on_both_nodes_in_seconds_every_time(
    slurm: Cluster, corpus: Path, tmp_path: Path
) -> None:
    # Checked by each node's launcher before any rendezvous: nobody waits for anybody.
    took = []
    for i in range(5):
        where = tmp_path / str(i)
        where.mkdir()
        started = time.monotonic()
        job_id = slurm.submit(where, tiny_args(where / "run", corpus, ckpt__keep=0))
        log = assert_failed_at_once(slurm, job_id, where, 2, started)
        assert "--ckpt.keep must be >= 1" in log
        took.append(time.monotonic() - started)
    time.sleep(4)  # two scheduler intervals: still failed, still not requeued
    assert (slurm.job(job_id)["JobState"], slurm.job(job_id)["Restarts"]) == ("FAILED", "0")
    print(f"\nbad flag on 2 SLURM nodes: FAILED after {', '.join(f'{t:.0f}' for t in took)} s")


@pytest.mark.timeout(420, func_only=True)  # six jobs, each bounded on its own
def test_an_incompatible_checkpoint_fails_on_both_nodes_every_time(
    slurm: Cluster, corpus: Path, tmp_path: Path
) -> None:
    # Found at resume, after the rendezvous, by every rank: each node's torchrun is stopped, and
    # no node is left waiting in a rendezvous for another that has exited.
    run_dir = tmp_path / "run"
    first = tmp_path / "first"
    first.mkdir()
    job = slurm.wait(slurm.submit(first, tiny_args(run_dir, corpus, max_steps=10)), first, timeout=150)
    assert outcome(job) == ("COMPLETED", "0:0", "0"), log_tail(first)
    took = []
    for i in range(5):
        where = tmp_path / str(i)
        where.mkdir()
        started = time.monotonic()
        job_id = slurm.submit(where, tiny_args(run_dir, corpus, max_steps=20, model__n_embd=64))
        log = assert_failed_at_once(slurm, job_id, where, 4, started)
        assert "written by a different model/config" in log
        assert "Traceback" not in log, log
        took.append(time.monotonic() - started)
    print(f"\nincompatible checkpoint on 2 SLURM nodes: FAILED after {', '.join(f'{t:.0f}' for t in took)} s")


def resumed_without_loss(run_dir: Path, steps: int) -> dict:
    rows = metrics_rows(run_dir)
    resumes = [i for i, r in enumerate(rows) if r["kind"] == "resume"]
    assert len(resumes) == 1, rows
    resume = rows[resumes[0]]
    after = [r["step"] for r in rows[resumes[0] :] if r["kind"] == "train"]
    assert after == list(range(resume["step"] + 1, steps + 1))
    return resume


def test_a_node_marked_down_requeues_and_the_job_resumes(
    slurm: Cluster, corpus: Path, tmp_path: Path
) -> None:
    run_dir, steps = tmp_path / "run", 40
    job_id = slurm.submit(
        tmp_path,
        tiny_args(run_dir, corpus, max_steps=steps, ckpt__interval=5),
        FTJOB_FAULT="slow:ms=100:restart=any",
    )
    slurm.wait_for_step(job_id, tmp_path, run_dir, 12, timeout=90)
    slurm.run("scontrol", "update", "nodename=n2", "state=down", "reason=ftjob-test")
    try:
        deadline = time.monotonic() + 60
        while int(slurm.job(job_id).get("Restarts", 0)) < 1:
            assert time.monotonic() < deadline, f"not requeued: {slurm.job(job_id)}"
            time.sleep(0.5)
    finally:
        # ReturnToService=2 may have brought it back already; then resuming it is an error
        _sh(["scontrol", "update", "nodename=n2", "state=resume"], slurm.env, timeout=30)
    assert "DOWN" not in slurm.run("scontrol", "show", "node", "n2")
    job = slurm.wait(job_id, tmp_path, timeout=180, restarts=1)
    assert outcome(job) == ("COMPLETED", "0:0", "1"), log_tail(tmp_path)
    resume = resumed_without_loss(run_dir, steps)
    assert resume["step"] >= 10 and resume["lost_steps"] <= 5  # at most a checkpoint interval


def test_the_time_limit_signal_saves_and_requeues(slurm: Cluster, corpus: Path, tmp_path: Path) -> None:
    # --signal=B:USR1@150 with a 3-minute limit: USR1 ~30 s in (Slurm sends it up to a minute late).
    run_dir = tmp_path / "run"
    job_id = slurm.submit(
        tmp_path,
        tiny_args(run_dir, corpus, max_steps=100_000, ckpt__interval=50),
        options=("--time=3", "--signal=B:USR1@150"),
        FTJOB_FAULT="slow:ms=100:restart=any",
    )
    try:
        deadline = time.monotonic() + 170
        while "resumed from step" not in (job_log(tmp_path) if (tmp_path / "job.out").exists() else ""):
            assert time.monotonic() < deadline, f"not resumed: {slurm.job(job_id)}\n{log_tail(tmp_path)}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job_id], env=slurm.env, timeout=30, check=False)
    log = job_log(tmp_path)
    assert "got SIGUSR1" in log and "exit 143: preempted and saved; requeueing" in log, log_tail(tmp_path)
    (resume,) = [r for r in metrics_rows(run_dir) if r["kind"] == "resume"]
    assert resume["lost_steps"] == 0  # saved at the step boundary after the signal, resumed from it
