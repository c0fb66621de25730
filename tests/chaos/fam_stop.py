"""Stops from outside and hangs inside: SIGTERM to torchrun at a random instant (preemption), and a
rank that stops making progress (the watchdog)."""

from __future__ import annotations

import signal
import statistics
import time

from chaos.checks import all_valid, compare, exit_record, last_step, newest_valid, rows
from chaos.harness import SIGNALS, STEPS, Row, Session, Trial, tail

SIGTERM_WINDOW_S = 12.0  # U(0, this) after torchrun starts: ~4 s start-up, then ~8 s of steps
SIGTERM_FAULT = "slow:ms=40:restart=any"  # timing only: the signal lands mid-run
STOP_BOUND_S = 60.0  # signal -> torchrun gone


def run_family_sigterm(s: Session, trials: int) -> Row:
    row = Row("sigterm")
    reference = s.reference(s.args(s.root / "x"))
    early, took = 0, []
    for _ in range(trials):
        trial, before_first_step, seconds = _sigterm_trial(s, reference)
        row.trials.append(trial)
        early += before_first_step
        if seconds is not None:
            took.append(seconds)
    row.notes.append(f"{early} landed before the first step (nothing to save)")
    if took:
        row.notes.append(f"signal -> exit median {statistics.median(took):.1f} s")
    return row


def _sigterm_trial(s: Session, reference) -> tuple[Trial, bool, float | None]:
    where = s.fresh("sigterm")
    run_dir = where / "run"
    args = s.args(run_dir, ckpt__interval=5)
    job = s.job(args, where / "log", fault=SIGTERM_FAULT, extra=[SIGNALS], timeout=180)
    job.sleep(s.rng.uniform(0, SIGTERM_WINDOW_S))
    if not job.running():
        job.wait()
        return Trial(False, f"ended before the signal: {tail(job.stderr)}"), False, None
    sent = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    code = job.wait()
    seconds = time.monotonic() - sent
    record = exit_record(run_dir / "exit_status.json")
    last, newest = last_step(run_dir), newest_valid(run_dir)
    lost = last - (newest or 0)
    early = last == 0
    if code is None:
        return Trial(False, "torchrun did not exit after SIGTERM", lost), early, None
    if early:  # before the first step: an exit status may be missing, nothing may be saved
        bad = record and record.get("code") != 143
        why = f"exit_status.json says {record.get('code')}, not 143" if bad else ""
    elif record.get("code") == 0 and last == STEPS:
        why = ""  # the signal came during the final save: finished
    else:
        why = (
            ""
            if record.get("code") == 143
            else f"exit_status.json: {record or 'missing'}; {tail(job.stderr)}"
        )
    why = why or (
        "" if lost == 0 else f"{lost} completed step(s) lost: last step {last}, checkpoint {newest}"
    )
    why = why or ("" if seconds < STOP_BOUND_S else f"took {seconds:.0f} s to stop")
    why = why or all_valid(run_dir)
    if why:
        return Trial(False, why, lost), early, seconds
    code, again = s.run(args, where / "log-requeue")
    if code != 0:
        return Trial(False, f"requeue exited {code}: {tail(again.stderr)}", lost), early, seconds
    problem = compare(run_dir, reference)
    return Trial(not problem, problem, lost, not problem), early, seconds


def run_family_hung_rank(s: Session, trials: int) -> Row:
    row = Row("hung-rank")
    reference = s.reference(s.args(s.root / "x"))
    gaps = []
    for _ in range(trials):
        step, rank = s.rng.randint(3, STEPS - 20), s.rng.randint(0, 1)
        where = s.fresh("hung-rank")
        run_dir = where / "run"
        args = s.args(run_dir, ckpt__interval=5, watchdog__timeout_s=4)
        code, job = s.run(
            args, where / "log", fault=f"hang:step={step}:rank={rank}", max_restarts=1, timeout=180
        )
        err = job.stderr
        found = rows(run_dir)
        resumes = [r for r in found if r.get("kind") == "resume"]
        lost = sum(r.get("lost_steps", 0) for r in resumes)
        hung_at = next((r["time"] for r in found if r.get("kind") == "train" and r["step"] == step), None)
        back = next((r["time"] for r in found if r.get("kind") == "train" and r.get("restart") == 1), None)
        if hung_at is not None and back is not None:
            gaps.append(back - hung_at)
        checks = [
            (code == 0, f"torchrun exited {code}: {tail(err)}"),
            ("made no progress" in err, "the watchdog never fired"),
            (exit_record(run_dir / "exit_status.json").get("restart") == 1, "not exactly one restart"),
            (
                len(resumes) == 1 if step > 5 else len(resumes) <= 1,
                f"{len(resumes)} resumes after a hang at step {step}",
            ),
        ]
        why = next((w for ok, w in checks if not ok), "") or all_valid(run_dir)
        problem = "" if why else compare(run_dir, reference)
        row.trials.append(
            Trial(not (why or problem), f"hang after step {step} on rank {rank}: {why or problem}", lost,
                  None if why else not problem)
        )  # fmt: skip
    row.notes.append("watchdog 4 s, --max-restarts 1")
    if gaps:
        row.notes.append(f"hang -> first step after the restart median {statistics.median(gaps):.1f} s")
    return row
