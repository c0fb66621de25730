"""SIGKILL families: random kills of a random rank's training process at random instants in one
torchrun run, and the same while another local user squats the warm-start socket names."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from chaos.checks import all_valid, committed, compare, exit_record, rows, temporaries
from chaos.harness import Job, Row, Session, Target, Trial, kill_ours, scan, tail, training_processes
from chaos.squatter import Squat

# Steps take ~30 ms and every checkpoint file 5 ms longer to write: with --ckpt.interval 2 a save
# (or the wait for one) is in flight for a good part of the time, so kills land in saves and commits.
KILL_FAULT = "slow:ms=20:restart=any;slow_write:ms=5:restart=any"
FIRST_KILL_S = 5.0  # the first kill of a run: U(0, this) after torchrun starts (cold start-up ~4 s)
GAP_S = 2.0  # later kills: U(0, this) after the job is training again...
STARTUP_SHARE = 0.25  # ...or, this often, U(0, STARTUP_GAP_S) after the restarted workers appear
STARTUP_GAP_S = 1.0
ZYGOTE_SHARE = 0.1  # of the kills that could hit a warm attempt: its zygote instead (its trainers go too)
RUN_TIMEOUT_S = 420


@dataclass
class Kill:
    time: float  # time.time() just before the signal
    pid: int
    rank: int
    restart: int  # the attempt it killed (TORCHELASTIC_RESTART_COUNT)
    warm: bool
    phase: str  # "start-up" (this attempt logged no step yet), "saving" (a write in flight), "training"
    newest: int | None  # newest committed checkpoint at that instant
    logged: int  # last step logged at that instant


def kill_one(job: Job, run_dir: Path, rng, after_restart: int) -> Kill | None:
    """SIGKILL one training process of an attempt later than ``after_restart``, chosen at random,
    as soon as one exists; None if the job ended first."""
    while job.running():
        targets = [t for t in training_processes(job.tag) if t.restart > after_restart]
        if not targets:
            time.sleep(0.02)
            continue
        target = rng.choice(targets)
        warm = [t for t in targets if t.warm]
        if warm and rng.random() < ZYGOTE_SHARE:  # its trainers die with it: a warm attempt fails
            zygote = scan(job.tag).get(rng.choice(warm).pid)
            if zygote is not None:
                target = Target(zygote.ppid, -1, target.restart, True)
        newest = (committed(run_dir) or [None])[0]
        saving = bool(temporaries(run_dir))
        found = rows(run_dir)
        trained = [r["step"] for r in found if r.get("kind") == "train"]
        started = any(r.get("kind") == "train" and r.get("restart") == target.restart for r in found)
        when = time.time()
        if not kill_ours(target.pid, job.tag):
            continue  # gone meanwhile
        phase = "saving" if saving else ("training" if started else "start-up")
        return Kill(
            when, target.pid, target.rank, target.restart, target.warm, phase, newest, max(trained, default=0)
        )
    return None


def restarted(job: Job, after: int) -> bool:
    """Whether the processes of an attempt later than ``after`` exist."""
    return any(t.restart > after for t in training_processes(job.tag))


def training_again(run_dir: Path, after: int) -> bool:
    """Whether an attempt later than ``after`` has logged a step."""
    return any(r.get("restart", -1) > after for r in rows(run_dir) if r.get("kind") == "train")


def kill_run(job: Job, run_dir: Path, rng, quota: int) -> list[Kill]:
    """Up to ``quota`` kills at random instants while the job runs."""
    kills: list[Kill] = []
    job.sleep(rng.uniform(0, FIRST_KILL_S))
    while job.running() and len(kills) < quota:
        last = kills[-1].restart if kills else -1
        if kills and rng.random() < STARTUP_SHARE:
            job.wait_for(lambda last=last: restarted(job, last))
            job.sleep(rng.uniform(0, STARTUP_GAP_S))
        elif kills:
            job.wait_for(lambda last=last: training_again(run_dir, last))
            job.sleep(rng.uniform(0, GAP_S))
        kill = kill_one(job, run_dir, rng, last)
        if kill is None:
            break
        kills.append(kill)
    return kills


def judge_kills(run_dir: Path, kills: list[Kill]) -> tuple[list[str], list[int], list[float]]:
    """Per kill: why it was not followed by a correct resume ('' if it was), the completed steps it
    cost (each execution of a step counted lost once), and kill -> first step after it (s)."""
    found = rows(run_dir)
    resumes = [r for r in found if r.get("kind") == "resume"]
    trains = [r for r in found if r.get("kind") == "train"]
    whys, recovery = [], []
    for kill in kills:
        after = [r for r in resumes if r["time"] > kill.time]
        first = next(
            (r for r in trains if r["time"] > kill.time and r.get("restart", -1) > kill.restart), None
        )
        resumed = after[0] if after and (first is None or after[0]["time"] < first["time"]) else None
        why = ""
        if kill.newest is not None and resumed is None and not (after and first is None):
            why = f"killed with step {kill.newest} committed, but no resume followed"
        elif kill.newest is not None and after and after[0]["step"] < kill.newest:
            why = f"resumed from step {after[0]['step']} although step {kill.newest} was committed"
        elif kill.newest is None and resumed is None and first is not None and first["step"] != 1:
            why = f"no checkpoint, no resume, yet the next attempt started at step {first['step']}"
        if first is not None:
            recovery.append(first["time"] - kill.time)
        whys.append(why)
    # The job's own account: lost_steps = last step logged before the resume - the step resumed.
    lost = [0] * len(kills)
    live: list[int] = []
    seen = 0
    for row in found:
        if row.get("kind") == "train":
            live.append(row["step"])
            seen = max(seen, row["step"])
        elif row.get("kind") == "resume":
            dropped = sum(1 for s in live if s > row["step"])
            claimed = max(seen - row["step"], 0)
            if row.get("lost_steps") != claimed:
                whys = [
                    w or f"resume row says {row.get('lost_steps')} steps lost, metrics say {claimed}"
                    for w in whys
                ]
            live = [s for s in live if s <= row["step"]]
            k = max((i for i, kill in enumerate(kills) if kill.time < row["time"]), default=None)
            if k is not None:
                lost[k] += dropped
    # A step logged after a resume must follow it: "next step S+1".
    expect = None
    for row in found:
        if row.get("kind") == "resume":
            expect = row["step"] + 1
        elif row.get("kind") == "train" and expect is not None:
            if row["step"] != expect:
                whys = [
                    w or f"resumed at {expect - 1} but the next step logged is {row['step']}" for w in whys
                ]
            expect = None
    return whys, lost, recovery


def run_family_sigkill(s: Session, trials: int) -> Row:
    row = Row("sigkill")
    args_of = lambda d: s.args(d, ckpt__interval=2)  # noqa: E731
    reference = s.reference(args_of(s.root / "x"))
    phases: dict[str, int] = {}
    ranks = {0: 0, 1: 0, -1: 0}  # -1: a zygote
    warm = runs = warm_restarts = 0
    recovery: list[float] = []
    while len(row.trials) < trials:
        where = s.fresh("sigkill")
        run_dir = where / "run"
        quota = trials - len(row.trials)
        job = s.job(
            args_of(run_dir), where / "log", fault=KILL_FAULT, max_restarts=quota + 3, timeout=RUN_TIMEOUT_S
        )
        kills = kill_run(job, run_dir, s.rng, quota)
        code = job.wait()
        runs += 1
        warm_restarts += job.stderr.count("warm restart: trainer forked")
        if not kills:
            if code != 0:
                row.trials.append(Trial(False, f"run without a kill failed ({code}): {tail(job.stderr)}"))
            continue
        whys, lost, rec = judge_kills(run_dir, kills)
        recovery += rec
        run_problem = ""
        if code != 0:
            run_problem = "timed out" if job.timed_out else f"torchrun exited {code}: {tail(job.stderr)}"
        else:
            attempts = exit_record(run_dir / "exit_status.json").get("restart")
            if attempts != len(kills):
                run_problem = (
                    f"{len(kills)} kills but the last attempt was restart {attempts} (a failed restart?)"
                )
            run_problem = run_problem or all_valid(run_dir)
        identical = None
        if code == 0:
            problem = compare(run_dir, reference)
            identical = not problem
            run_problem = run_problem or problem
        for kill, why, n in zip(kills, whys, lost, strict=True):
            phases[kill.phase] = phases.get(kill.phase, 0) + 1
            ranks[kill.rank] += 1
            warm += kill.warm
            why = why or run_problem
            if why:
                why = f"run {runs}, kill of rank {kill.rank} ({kill.phase}, restart {kill.restart}): {why}"
            row.trials.append(Trial(not why, why, n, identical))
    row.notes.append(f"{runs} torchrun runs, ckpt every 2 steps")
    row.notes.append("kills in " + ", ".join(f"{v} {k}" for k, v in sorted(phases.items())))
    row.notes.append(
        f"rank0/rank1/zygote {ranks[0]}/{ranks[1]}/{ranks[-1]}, {warm} of them forked trainers or a zygote"
    )
    row.notes.append(f"{warm_restarts // 2} warm restarts")
    if recovery:
        row.notes.append(
            f"kill -> next step median {statistics.median(recovery):.2f} s, max {max(recovery):.2f} s"
        )
    return row


# -- another local user squats the warm-start names --------------------------------------------------
NOBODY = 65534
SQUATTER = Path(__file__).with_name("squatter.py")


def run_family_squatter(s: Session, trials: int) -> Row:
    row = Row("squatter")
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        row.skipped = "needs root and setpriv (to run a second user)"
        return row
    args_of = lambda d: s.args(d, ckpt__interval=5)  # noqa: E731
    reference = s.reference(args_of(s.root / "x"))
    for _ in range(trials):
        row.trials.append(_squat_trial(s, args_of, reference))
    row.notes.append("squatter (uid 65534) binds the zygote names and owns the runtime dir; 1 kill each")
    return row


def _squat_trial(s: Session, args_of, reference: Path) -> Trial:
    where = s.fresh("squatter")
    run_dir = where / "run"
    squat = Squat(run_dir)
    shared, log, victim = squat.shared, squat.log, squat.victim
    try:
        env = {"TMPDIR": str(shared), "XDG_RUNTIME_DIR": "", "FTJOB_RUNTIME_DIR": ""}
        job = s.job(args_of(run_dir), where / "log", fault="slow:ms=20:restart=any", max_restarts=2, env=env)
        job.wait_for(lambda: "bound" in log.read_text() and bool(rows(run_dir)))
        job.sleep(s.rng.uniform(0, GAP_S))
        kill = kill_one(job, run_dir, s.rng, -1)
        code = job.wait()
        squatted = log.read_text()
        err = job.stderr
        if kill is None:
            return Trial(False, "the run ended before the kill")
        whys, lost, _ = judge_kills(run_dir, [kill])
        checks = [
            ("bound" in squatted, "the squatter never got its sockets in place"),
            (code == 0, f"torchrun exited {code}: {tail(err)}"),
            ("received" not in squatted, "the squatter received bytes: " + tail(squatted, 2)),
            ("accepted" not in squatted, "a worker connected to the squatter"),
            (victim.poll() is None, "the worker signalled a pid the squatter named"),
            ("warm restart: trainer forked" not in err, "a warm restart happened through a squatted dir"),
            (f"belongs to uid {NOBODY}" in err, "no warning about the squatted runtime dir"),
            (not whys[0], whys[0]),
        ]
        why = next((w for ok, w in checks if not ok), "")
        problem = compare(run_dir, reference) if code == 0 else ""
        return Trial(not (why or problem), why or problem, lost[0], None if code else not problem)
    finally:
        squat.close()
