"""Storage that fails: the newest checkpoint damaged, a full disk (a real tmpfs), a save that hangs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from chaos.checks import (
    all_valid,
    checkpoints,
    committed,
    compare,
    error_lines,
    exit_record,
    last_step,
    newest_valid,
    rows,
)
from chaos.harness import STEPS, Row, Session, Trial, tail

DATA_FILES = ("model.safetensors", "optim.safetensors", "train.safetensors")
WAYS = ("truncate", "flip-byte", "delete", "garbage-manifest")


def make_partial(s: Session, reuse: bool = True) -> tuple[Path, str, str]:
    """A run stopped part-way (a SIGKILL after a random step, once per run dir): (run dir, the
    fault it ran with, '' or why it is unusable). Checkpoints every 5 steps, the newest 3 kept.
    ``reuse``: the session's one if there is one already (families only ever copy it)."""
    if reuse and s.partial is not None:
        return s.partial
    where = s.fresh("partial")
    run_dir = where / "run"
    step = s.rng.randint(17, STEPS - 30)
    fault = f"crash:step={step}:rank={s.rng.randint(0, 1)}:once={where / 'crash.once'}"
    code, job = s.run(s.args(run_dir, ckpt__interval=5), where / "log", fault=fault)
    valid = [st for st, ok, _ in checkpoints(run_dir) if ok]
    why = ""
    if code == 0 or len(valid) < 2:
        why = f"the stopped run exited {code} with checkpoints {valid}: {tail(job.stderr)}"
    if s.partial is None:
        s.partial = (run_dir, fault, why)
    return run_dir, fault, why


def copy_run(template: Path, where: Path) -> Path:
    run_dir = where / "run"
    shutil.copytree(template, run_dir, symlinks=True)
    return run_dir


def damage(ckpt: Path, way: str, rng) -> str:
    """Damage one checkpoint directory; say how."""
    if way == "truncate":
        file = ckpt / rng.choice(DATA_FILES)
        size = file.stat().st_size
        keep = rng.randrange(size)
        os.truncate(file, keep)
        return f"{file.name} truncated {size} -> {keep} bytes"
    if way == "flip-byte":
        file = ckpt / rng.choice(DATA_FILES)
        data = bytearray(file.read_bytes())
        at = rng.randrange(len(data))
        data[at] ^= rng.randint(1, 255)
        file.write_bytes(bytes(data))
        return f"{file.name} byte {at} changed"
    if way == "delete":
        file = ckpt / rng.choice((*DATA_FILES, "manifest.json"))
        file.unlink()
        return f"{file.name} deleted"
    garbage = rng.choice([b"", b"{", b"[1, 2]", b'{"files": 7}', os.urandom(64), b"\x00" * 512])
    (ckpt / "manifest.json").write_bytes(garbage)
    return f"manifest.json replaced by {len(garbage)} bytes of garbage"


def run_family_corruption(s: Session, trials: int) -> Row:
    row = Row("corruption")
    reference = s.reference(s.args(s.root / "x"))
    template = fault = problem = ""
    ways: list[str] = []
    used: list[str] = []
    for i in range(trials):
        if i % len(WAYS) == 0:  # every 4 trials: a new stopped run, the 4 ways in a random order
            template, fault, problem = make_partial(s, reuse=i == 0)
            ways = s.rng.sample(WAYS, len(WAYS))
        way = ways[i % len(WAYS)]
        used.append(way)
        if problem:
            row.trials.append(Trial(False, f"{way}: {problem}"))
            continue
        row.trials.append(_corruption_trial(s, Path(template), fault, way, reference))
    counts = ", ".join(f"{used.count(w)} {w}" for w in WAYS if w in used)
    row.notes.append(f"{counts}; each on the newest checkpoint of a run SIGKILLed at a random step")
    return row


def _corruption_trial(s: Session, template: Path, fault: str, way: str, reference: Path) -> Trial:
    where = s.fresh(f"corrupt-{way}")
    run_dir = copy_run(template, where)
    newest, older = committed(run_dir)[:2]
    name = f"step_{newest:08d}"
    how = damage(run_dir / "checkpoints" / name, way, s.rng)
    code, job = s.run(s.args(run_dir, ckpt__interval=5), where / "log", fault=fault)
    err = job.stderr
    resumes = [r for r in rows(run_dir) if r.get("kind") == "resume"]
    resumed = resumes[-1] if resumes else {}
    checks = [
        (code == 0, f"rerun exited {code}: {tail(err)}"),
        (
            any(name in ln and "not usable" in ln for ln in err.splitlines()),
            f"no log line says {name} was skipped",
        ),
        (
            resumed.get("step") == older,
            f"resumed from {resumed.get('step')}, not the next older step {older}",
        ),
        (name in resumed.get("skipped", [name]), "the resume row does not list the skipped checkpoint"),
    ]
    why = next((w for ok, w in checks if not ok), "") or all_valid(run_dir)
    problem = "" if why else compare(run_dir, reference)
    lost = resumed.get("lost_steps")
    return Trial(not (why or problem), f"{how}: {why or problem}", lost, None if why else not problem)


# -- a full disk -------------------------------------------------------------------------------------
def run_family_disk_full(s: Session, trials: int) -> Row:
    row = Row("disk-full")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        row.skipped = "mounting a tmpfs needs root"
        return row
    reference = s.reference(s.args(s.root / "x"))
    sizes = []
    for _ in range(trials):
        size_k = s.rng.randint(600, 1500)  # 1 to 3 checkpoints of ~425 kB; --ckpt.keep 3 needs 4
        sizes.append(size_k)
        row.trials.append(_disk_full_trial(s, size_k, reference))
        if row.skipped:
            break
    row.notes.append(
        f"tmpfs of {', '.join(map(str, sizes))} kB, then enlarged to 16 MB; keep 3, max-failures 2"
    )
    return row


def _disk_full_trial(s: Session, size_k: int, reference: Path) -> Trial:
    where = s.fresh("disk-full")
    mount = where / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return Trial(False, f"cannot mount a tmpfs: {done.stderr.strip()}")
    s.mounts.append(mount)
    try:
        run_dir = mount / "run"
        status = where / "status.json"  # a launcher's per-node status file: outside the full disk
        args = s.args(run_dir, ckpt__interval=5, ckpt__max_failures=2)
        code, job = s.run(args, where / "log", max_restarts=3, env={"FTJOB_STATUS_FILE": str(status)})
        err = job.stderr
        record = exit_record(status)
        errors = error_lines(err)
        last, newest = last_step(run_dir), newest_valid(run_dir)
        checks = [
            (code not in (0, None), f"torchrun exited {code} on a full disk"),
            (record.get("code") == 6, f"exit status {record.get('code')}, not 6 (disk full): {tail(err)}"),
            (record.get("restart") == 0, "a restart was spent on a full disk"),
            (len(errors) == 1 and "exit 6: permanent" in errors[0], f"error lines: {errors}"),
        ]
        why = next((w for ok, w in checks if not ok), "") or all_valid(run_dir)
        lost = last - (newest or 0)
        if why:
            return Trial(False, f"{size_k} kB: {why}", lost)
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True, capture_output=True)
        code, job = s.run(args, where / "log-after", env={"FTJOB_STATUS_FILE": str(status)})
        why = "" if code == 0 else f"rerun on the enlarged disk exited {code}: {tail(job.stderr)}"
        why = why or all_valid(run_dir)
        problem = "" if why else compare(run_dir, reference)
        return Trial(
            not (why or problem), f"{size_k} kB: {why or problem}", lost, None if why else not problem
        )
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        s.mounts.remove(mount)


# -- a hung save ---------------------------------------------------------------------------------------
SAVE_TIMEOUT_S = 3
HANG_BOUND_S = SAVE_TIMEOUT_S + 20  # the hung save's step -> torchrun gone


def run_family_hung_save(s: Session, trials: int) -> Row:
    row = Row("hung-save")
    reference = s.reference(s.args(s.root / "x"))
    took = []
    for _ in range(trials):
        trial, seconds = _hung_save_trial(s, reference)
        row.trials.append(trial)
        if seconds is not None:
            took.append(seconds)
    row.notes.append(f"--ckpt.save-timeout-s {SAVE_TIMEOUT_S}")
    if took:
        row.notes.append(f"hung save's step -> exit max {max(took):.1f} s")
    return row


def _hung_save_trial(s: Session, reference: Path) -> tuple[Trial, float | None]:
    where = s.fresh("hung-save")
    run_dir = where / "run"
    step = 5 * s.rng.randint(2, 20)
    hang = f"hang_write:save_step={step}:once={where / 'hang.once'}"
    args = s.args(run_dir, ckpt__interval=5, ckpt__save_timeout_s=SAVE_TIMEOUT_S)
    code, job = s.run(args, where / "log", fault=f"{hang};slow:ms=30:restart=any", timeout=180)
    ended = time.time()
    record = exit_record(run_dir / "exit_status.json")
    saved = next((r["time"] for r in rows(run_dir) if r.get("kind") == "train" and r["step"] == step), None)
    seconds = None if saved is None else ended - saved
    valid = checkpoints(run_dir)
    newest = newest_valid(run_dir)
    checks = [
        (code not in (0, None), f"torchrun exited {code}: {tail(job.stderr)}"),
        (record.get("code") == 147, f"exit status {record.get('code')}, not 147: {tail(job.stderr)}"),
        (seconds is not None and seconds < HANG_BOUND_S, f"step {step} -> exit took {seconds} s"),
        (all(ok for _, ok, _ in valid), f"an invalid checkpoint: {valid}"),
        (newest is not None and newest < step and newest == committed(run_dir)[0],
         f"newest valid checkpoint {newest} with the save of step {step} hung"),
    ]  # fmt: skip
    why = next((w for ok, w in checks if not ok), "")
    lost = last_step(run_dir) - (newest or 0)
    if why:
        return Trial(False, f"hang at the save of step {step}: {why}", lost), seconds
    code, again = s.run(args, where / "log-requeue", fault=hang)
    why = "" if code == 0 else f"requeue exited {code}: {tail(again.stderr)}"
    why = why or all_valid(run_dir)
    problem = "" if why else compare(run_dir, reference)
    return Trial(
        not (why or problem), f"save of step {step}: {why or problem}", lost, None if why else not problem
    ), seconds
