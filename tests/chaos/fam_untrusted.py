"""Checkpoints nobody should trust, and a disk that fails: a checkpoint that passes its checksums
but does not fit (crafted by hand: its RNG, scheduler or sampler state), one planted by another
user, and a save that fails with EIO. Each run must end as the uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from chaos.checks import all_valid, committed, compare, rows
from chaos.fam_storage import copy_run, make_partial
from chaos.harness import Row, Session, Trial, tail

from train.ckpt.manager import CheckpointManager, decode
from train.ckpt.storage import LocalStorage

CRAFTS = ("rng", "scheduler", "sampler")
NOBODY = 65534


def craft(ckpt_root: Path, name: str, what: str) -> str:
    """Rewrite checkpoint ``name`` as a valid one (checksums match) whose ``what`` does not fit."""
    manager = CheckpointManager(LocalStorage(ckpt_root), keep=10)
    manifest, blobs = manager.read_verified(name)
    objects = decode(blobs)
    train = objects["train.safetensors"]
    if what == "rng":
        train["rng"][-1]["python"] = [3, [1, 2, 3], None]
    elif what == "scheduler":
        train["scheduler"]["base_lrs"] = [*train["scheduler"]["base_lrs"], 0.5]
    else:
        train["sampler"]["cursor"] = -8
    meta = {k: v for k, v in manifest.items() if k not in ("format", "step", "time", "torch", "files")}
    shutil.rmtree(ckpt_root / name)
    manager.save(int(name[5:]), objects, meta)
    return f"{what} state crafted in {name}"


def plant(ckpt_root: Path, newest: str) -> str:
    """A checkpoint far newer than any, another user's (a shared, sticky checkpoint root)."""
    planted = ckpt_root / "step_99999999"
    shutil.copytree(ckpt_root / newest, planted)
    manifest = json.loads((planted / "manifest.json").read_text())
    (planted / "manifest.json").write_text(json.dumps({**manifest, "step": 99999999}))
    for path in (planted, *planted.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    return f"step_99999999 planted by uid {NOBODY}"


def run_family_untrusted(s: Session, trials: int) -> Row:
    row = Row("untrusted")
    reference = s.reference(s.args(s.root / "x"))
    ways = [*CRAFTS, *(["planted"] if os.geteuid() == 0 else [])]
    template, fault, problem = make_partial(s)
    for i in range(trials):
        way = ways[i % len(ways)]
        if problem:
            row.trials.append(Trial(False, f"{way}: {problem}"))
            continue
        row.trials.append(_trial(s, Path(template), fault, way, reference))
    planted = "" if "planted" in ways else " (planted: needs root, skipped)"
    row.notes.append(
        f"crafted {', '.join(CRAFTS)} states that verify, newer checkpoints of uid {NOBODY}{planted}"
    )
    return row


def _trial(s: Session, template: Path, fault: str, way: str, reference: Path) -> Trial:
    where = s.fresh(f"untrusted-{way}")
    run_dir = copy_run(template, where)
    root = run_dir / "checkpoints"
    newest, older = committed(run_dir)[:2]
    name = f"step_{newest:08d}"
    how = plant(root, name) if way == "planted" else craft(root, name, way)
    code, job = s.run(s.args(run_dir, ckpt__interval=5), where / "log", fault=fault)
    err = job.stderr
    resumes = [r for r in rows(run_dir) if r.get("kind") == "resume"]
    resumed = resumes[-1] if resumes else {}
    want = newest if way == "planted" else older  # another user's is never a candidate at all
    checks = [
        (code == 0, f"rerun exited {code}: {tail(err)}"),
        (resumed.get("step") == want, f"resumed from {resumed.get('step')}, not {want}"),
        (err.count("process group up") == 2, "more than one attempt: a crash loop"),
    ]
    if way == "planted":
        checks.append(((root / "step_99999999").is_dir(), "the planted checkpoint was deleted"))
        shutil.rmtree(root / "step_99999999")  # not ours: all_valid below would count it
    else:
        checks.append(
            (any(name in ln and "not usable" in ln for ln in err.splitlines()), f"{name} not skipped")
        )
    why = next((w for ok, w in checks if not ok), "") or all_valid(run_dir)
    problem = "" if why else compare(run_dir, reference)
    return Trial(
        not (why or problem),
        f"{how}: {why or problem}",
        resumed.get("lost_steps"),
        None if why else not problem,
    )


def run_family_io_error(s: Session, trials: int) -> Row:
    """A checkpoint write that fails with EIO at a random save: one failed save, training goes on,
    the next interval saves, nothing lost but that save."""
    row = Row("io-error")
    reference = s.reference(s.args(s.root / "x"))
    for _ in range(trials):
        where = s.fresh("io-error")
        run_dir = where / "run"
        step = 5 * s.rng.randint(2, 30)
        fail = f"fail_write:save_step={step}:once={where / 'fail.once'}"
        code, job = s.run(
            s.args(run_dir, ckpt__interval=5), where / "log", fault=f"{fail};slow:ms=20:restart=any"
        )
        failed = [r for r in rows(run_dir) if r.get("kind") == "checkpoint_failed"]
        checks = [
            (code == 0, f"exited {code}: {tail(job.stderr)}"),
            (len(failed) == 1, f"{len(failed)} failed saves recorded, not 1"),
            (step not in committed(run_dir), f"step {step} committed though its write failed"),
        ]
        why = next((w for ok, w in checks if not ok), "") or all_valid(run_dir)
        problem = "" if why else compare(run_dir, reference)
        row.trials.append(
            Trial(
                not (why or problem),
                f"save of step {step}: {why or problem}",
                0,
                None if why else not problem,
            )
        )
    row.notes.append("EIO in the write of a random save's file; training goes on")
    return row
