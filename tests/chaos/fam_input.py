"""Bad input: each gives its own exit code through the real launcher (launch/local.sh, torchrun
under it) with one `error:` line and loses nothing; a planted pickle never runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from chaos.checks import (
    all_valid,
    checkpoints,
    committed,
    compare,
    error_lines,
    exit_record,
    rows,
    tree_digest,
)
from chaos.fam_storage import copy_run, make_partial
from chaos.harness import REPO, Job, Row, Session, Trial, tail

from train.ckpt.manifest import checksum

CASES = ("config", "data", "other-model", "run-dir", "pickle")
BAD_VALUES = [  # (option, value): each a config error
    ("--ckpt.keep", "0"),
    ("--ckpt.interval", "-3"),
    ("--global-batch-size", "0"),
    ("--model.n-layer", "many"),
    ("--ckpt.intervl", "5"),
    ("--optim.lr", "-1"),
]


def launch(s: Session, args: list[str], where: Path, fault: str = "") -> tuple[int | None, Job, dict]:
    """launch/local.sh as a scheduler runs it (3 restarts allowed): its exit code, and the status."""
    status = where / "status.json"
    env = {
        "TMPDIR": str(s.tmp),
        "MAX_RESTARTS": "3",
        "TORCHRUN_ARGS": "--monitor-interval=0.2",
        "FTJOB_STATUS_FILE": str(status),
        "PYTHON": str(REPO / ".venv" / "bin" / "python"),
        **({"FTJOB_FAULT": fault} if fault else {}),
    }
    job = Job(["bash", str(REPO / "launch" / "local.sh"), *args], env, where / "log", timeout=180)
    code = job.wait()
    return code, job, exit_record(status)


def _set(args: list[str], option: str, value: str) -> list[str]:
    out = list(args)
    if option in out:
        out[out.index(option) + 1] = value
    else:
        out += [option, value]
    return out


def run_family_bad_input(s: Session, trials: int) -> Row:
    row = Row("bad-input")
    reference = s.reference(s.args(s.root / "x"))
    template, _, problem = make_partial(s)
    for i in range(trials):
        case = CASES[i % len(CASES)]
        if problem and case in ("config", "data", "pickle"):
            row.trials.append(Trial(False, f"{case}: {problem}"))
            continue
        trial = {
            "config": _config,
            "data": _data,
            "other-model": _other_model,
            "run-dir": _run_dir,
            "pickle": _pickle,
        }[case](s, template, reference)
        trial.why = f"{case}: {trial.why}" if trial.why else ""
        row.trials.append(trial)
    row.notes.append("codes 2 config, 3 data, 4 other model, 5 run dir; pickles planted as checkpoint files")
    return row


def _permanent(code: int | None, job: Job, record: dict, want: int) -> str:
    """'' if the launcher exited ``want`` with one error line and no restart spent, else why not."""
    errors = error_lines(job.stderr)
    if code != want:
        return f"launcher exited {code}, not {want}: {tail(job.stderr)}"
    if len(errors) != 1 or f"exit {want}: permanent" not in errors[0]:
        return f"{len(errors)} error lines: {errors[:2]}"
    if record.get("code") != want or record.get("restart") != 0:
        return f"status {record}"
    return ""


def _unchanged(s: Session, template: Path, where: Path, mutate) -> Trial:
    """Start a stopped run again with bad input: the permanent error, and its checkpoints untouched."""
    run_dir = copy_run(template, where)
    before = tree_digest(run_dir / "checkpoints")
    args, want = mutate(s.args(run_dir, ckpt__interval=5))
    code, job, record = launch(s, args, where)
    why = _permanent(code, job, record, want)
    if not why and tree_digest(run_dir / "checkpoints") != before:
        why = "the checkpoints changed"
    return Trial(not why, why or "", 0 if not why else None)


def _config(s: Session, template: Path, reference: Path) -> Trial:
    option, value = s.rng.choice(BAD_VALUES)
    trial = _unchanged(s, template, s.fresh("bad-config"), lambda a: (_set(a, option, value), 2))
    trial.why = f"{option} {value}: {trial.why}" if trial.why else ""
    return trial


def _data(s: Session, template: Path, reference: Path) -> Trial:
    missing = str(s.root / "no-such-dir" / "corpus.txt")
    return _unchanged(s, template, s.fresh("bad-data"), lambda a: (_set(a, "--data.path", missing), 3))


def _other_model(s: Session, template: Path, reference: Path) -> Trial:
    where = s.fresh("other-model")
    run_dir = where / "run"
    code, job, _ = launch(
        s, s.args(run_dir, ckpt__interval=5, model__n_embd=48, max_steps=20), where / "first"
    )
    if code != 0:
        return Trial(False, f"training the other model exited {code}: {tail(job.stderr)}")
    before = tree_digest(run_dir / "checkpoints")
    code, job, record = launch(s, s.args(run_dir, ckpt__interval=5), where)
    why = _permanent(code, job, record, 4)
    if not why and tree_digest(run_dir / "checkpoints") != before:
        why = "the other model's checkpoints changed"
    why = why or all_valid(run_dir)
    return Trial(not why, why, 0 if not why else None)


def _run_dir(s: Session, template: Path, reference: Path) -> Trial:
    where = s.fresh("bad-run-dir")
    (where / "a-file").write_text("not a directory\n")
    code, job, record = launch(s, s.args(where / "a-file" / "run", ckpt__interval=5), where)
    why = _permanent(code, job, record, 5)
    return Trial(not why, why, 0 if not why else None)


class Trap:
    """Unpickling this creates ``marker``: proof that a checkpoint file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(run_dir: Path, source: int, step: int, files: dict[str, bytes]) -> None:
    """A checkpoint dir of ``step``: the files of ``source`` with ``files`` replaced or added, and
    a manifest whose sizes and checksums match every file, as a tamperer would write it."""
    src = run_dir / "checkpoints" / f"step_{source:08d}"
    dst = run_dir / "checkpoints" / f"step_{step:08d}"
    shutil.copytree(src, dst)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["step"] = step
    for name, data in files.items():
        (dst / name).write_bytes(data)
        manifest["files"][name] = {"size": len(data), "xxh3_64": checksum(data)}
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _pickle(s: Session, template: Path, reference: Path) -> Trial:
    where = s.fresh("pickle")
    run_dir = copy_run(template, where)
    markers = [where / "model-pickle-ran", where / "evil-pt-ran"]
    proof = where / "trap-armed"
    pickle.loads(pickle.dumps(Trap(proof)))  # the trap is real: unpickling it does create the file
    if not proof.exists():
        return Trial(False, "the pickle trap does not work")
    newest = committed(run_dir)[0]
    planted = [newest + 5, newest + 10]
    _plant(run_dir, newest, planted[0], {"model.safetensors": pickle.dumps(Trap(markers[0]))})
    _plant(run_dir, newest, planted[1], {"evil.pt": pickle.dumps(Trap(markers[1]))})
    code, job, _ = launch(s, s.args(run_dir, ckpt__interval=5), where)
    err = job.stderr
    resumes = [r for r in rows(run_dir) if r.get("kind") == "resume"]
    skipped_lines = [ln for ln in err.splitlines() if "not usable" in ln]
    checks = [
        (not any(m.exists() for m in markers), "a planted pickle was unpickled (its marker exists)"),
        (code == 0, f"launcher exited {code}: {tail(err)}"),
        (
            all(any(f"step_{p:08d}" in ln for ln in skipped_lines) for p in planted),
            f"skips logged: {skipped_lines}",
        ),
        (
            bool(resumes) and resumes[-1].get("step") == newest,
            f"resumed from {resumes[-1:]} not step {newest}",
        ),
        (
            not [c for c in checkpoints(run_dir) if not c[1]],
            "an invalid checkpoint is left among the committed",
        ),
    ]
    why = next((w for ok, w in checks if not ok), "") or all_valid(run_dir)
    problem = "" if why else compare(run_dir, reference)
    lost = resumes[-1].get("lost_steps") if resumes else None
    return Trial(not (why or problem), why or problem, lost, None if why else not problem)
