"""The recovery report: ``python -m train.report RUN_DIR [--json] [--plot out.png]``.

Built from the run's own record (metrics.jsonl, records.py) and nothing else, so it works on
a run that is still going and on a run directory copied from elsewhere: how far it got, how fast,
where the time went (training, recovering, the loop's checkpoint stalls), and every incident in
order - its cause where the record tells it, the steps it cost, the seconds from the last step
before it to the first step after, and the checkpoint the run came back from.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

import tyro

from train.errors import EXIT_CRASH, EXIT_HANG, EXIT_PEER, EXIT_PREEMPTED, EXIT_STORAGE
from train.observe import records

NO_RECORD = "no ending recorded by rank 0: SIGKILL (a person, the OOM killer) or the loss of its node"


def _first_line(text: object) -> str:
    return (str(text).strip().splitlines() or [""])[0][:200]


def _cause(attempt: records.Attempt, world: int) -> str:
    """What ended an attempt, from the endings its ranks recorded (a SIGKILLed rank records none)."""
    ends = attempt.ends
    primary = [e for e in ends if not e.get("secondary")]
    if not ends:
        return NO_RECORD
    if not primary:  # every rank that spoke failed because another did: who did not speak?
        silent = sorted(set(range(world)) - {int(e.get("rank", -1)) for e in ends})
        who = f"rank {', '.join(map(str, silent))}" if silent else "another rank or node"
        # gloo's words carry a source path and an address in brackets: the gist is the rest
        seen = " ".join(re.sub(r"\[[^\]]*\]:?\d*", "", _first_line(ends[0].get("reason"))).split())
        seen = seen.split(". ")[0][:100]
        return f"{who} ended without a record (SIGKILL, OOM kill or node loss); the others saw: {seen}"
    end = min(primary, key=lambda e: e.get("time", 0))
    code, reason = int(end.get("code", -1)), _first_line(end.get("reason"))
    words = {
        EXIT_PREEMPTED: "preemption (stop signal: saved and exited)",
        EXIT_HANG: f"hang ({reason})",
        EXIT_CRASH: f"crash: {reason}",
        EXIT_PEER: f"another rank or node failed first ({reason})",
        EXIT_STORAGE: f"storage failure: {reason}",
        0: "finished",
    }
    return words.get(code, f"{end.get('cause', 'exit')} (exit {code}): {reason}")


def _incident(before: records.Attempt, after: list[records.Attempt], restarts: int) -> dict:
    """The failure that ended ``before``; ``after``: the attempts that followed (the first of them
    with a step is where the run was training again)."""
    start = before.start or {}
    world = int(start.get("world_size", 0) or 0)
    nxt = after[0]
    cause = _cause(before, world)
    new_world = int((nxt.start or {}).get("world_size", world) or world)
    if cause == "finished":
        cause = "finished, then launched again (with more steps?)"
    if new_world < world and "without a record" in cause:  # it did not come back: its node is gone
        cause = "node loss: " + cause
    if new_world != world:
        cause += f"; world size {world} -> {new_world}"
    last = before.steps[-1] if before.steps else None
    back = next((a for a in after if a.steps), None)
    resume = next(iter(nxt.of("resume")), None)
    resumed_step = int(resume["step"]) if resume else 0
    incident = {
        "attempt": restarts,
        "restart": int((nxt.start or {}).get("restart", 0) or 0),
        "warm": bool((nxt.start or {}).get("warm")),
        "cause": cause,
        "last_step": int(last["step"]) if last else None,
        "resumed_from_step": resumed_step,
        "resumed_from": resume.get("path") if resume else None,
        "fell_back": bool(resume and resume.get("skipped")),
        "skipped": list(resume.get("skipped", [])) if resume else [],
        "steps_lost": max(int(last["step"]) - resumed_step, 0) if last else 0,
        "recovery_s": None,
        "world_size": [world, new_world],
    }
    if last is not None and back is not None:
        incident["recovery_s"] = round(back.steps[0]["time"] - last["time"], 3)
        incident["span"] = [last["time"], back.steps[0]["time"]]  # wall-clock: down from, back at
    return incident


def build(run_dir: str | Path) -> dict:
    rows = records.read(run_dir)
    attempts = records.attempts(rows)
    steps = [r for r in rows if r["kind"] == "train"]
    incidents = [
        _incident(attempts[i], attempts[i + 1 :], i + 1)
        for i in range(len(attempts) - 1)
        if attempts[i].steps or attempts[i].ends  # one that never trained and said nothing: noise
    ]
    stalls = [r for r in rows if r["kind"] == "checkpoint"]
    recovering = sum(i["recovery_s"] or 0.0 for i in incidents)
    training = sum(float(r.get("step_time", 0.0)) for r in steps)
    stalled = sum(float(r.get("stall_s", 0.0)) for r in stalls)
    wall = (rows[-1]["time"] - rows[0]["time"]) if rows else 0.0
    done = records.last_step(rows)  # the furthest step reached (a re-run after a resume is behind it)
    config = _config(run_dir)
    last = attempts[-1] if attempts else None
    ending = _cause(last, int((last.start or {}).get("world_size", 1) or 1)) if last and last.ends else None
    samples = int(steps[-1].get("samples", 0)) if steps else 0
    return {
        "run_dir": str(run_dir),
        "steps_done": done,
        "max_steps": config.get("max_steps"),
        "attempts": len(attempts),
        "state": "ended: " + ending if ending else "running, or ended without a record",
        "wall_s": round(wall, 3),
        "time": {
            "training_s": round(training, 3),
            "recovering_s": round(recovering, 3),
            "checkpoint_stall_s": round(stalled, 3),
            "other_s": round(max(wall - training - recovering - stalled, 0.0), 3),
        },
        "throughput": {
            "steps_per_s": round(done / wall, 4) if wall else None,
            "samples_per_s": round(samples / wall, 2) if wall else None,
            "steps_per_s_while_training": round(len(steps) / training, 4) if training else None,
            "steps_rerun": max(len(steps) - len({r["step"] for r in steps}), 0),
        },
        "checkpoints": {
            "durable": sum(1 for r in stalls if r.get("tier") != "local"),
            "local": sum(1 for r in stalls if r.get("tier") == "local"),
            "skipped": sum(1 for r in rows if r["kind"] == "checkpoint_skipped"),
            "failed": sum(1 for r in rows if r["kind"] == "checkpoint_failed"),
        },
        "incidents": incidents,
    }


def _config(run_dir: str | Path) -> dict:
    try:
        found = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _n(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _s(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f} s"


def text(report: dict) -> str:
    t, tp, c = report["time"], report["throughput"], report["checkpoints"]
    of = f" of {report['max_steps']}" if report.get("max_steps") else ""
    lines = [
        f"run {report['run_dir']}: step {report['steps_done']}{of}, {report['attempts']} attempt(s), "
        f"{len(report['incidents'])} incident(s); {report['state']}",
        f"wall {_s(report['wall_s'])}: training {_s(t['training_s'])}, recovering {_s(t['recovering_s'])}, "
        f"checkpoint stalls {_s(t['checkpoint_stall_s'])}, other (start-up, eval) {_s(t['other_s'])}",
        f"throughput: {_n(tp['steps_per_s'])} steps/s, {_n(tp['samples_per_s'])} samples/s overall; "
        f"{_n(tp['steps_per_s_while_training'])} steps/s in the steps themselves; "
        f"{tp['steps_rerun']} step(s) re-run",
        f"checkpoints: {c['durable']} durable and {c['local']} node-local saves, {c['skipped']} skipped "
        f"(previous still running), {c['failed']} failed",
    ]
    for n, i in enumerate(report["incidents"], 1):
        back = f"resumed from step {i['resumed_from_step']}" + (
            f" ({i['resumed_from']})" if i["resumed_from"] else ""
        )
        if i["fell_back"]:
            back += f", falling back past {', '.join(i['skipped'])}"
        how = f"restart {i['restart']}, {'warm' if i['warm'] else 'cold'}"
        lines.append(
            f"  {n}. after step {i['last_step']}: {i['cause']}; {back}; {i['steps_lost']} step(s) lost; "
            f"training again after {_s(i['recovery_s'])} ({how})"
        )
    return "\n".join(lines)


Dir = Annotated[str, tyro.conf.Positional]


def main(
    run_dir: Dir, /, json_out: Annotated[bool, tyro.conf.arg(name="json")] = False, plot: str = ""
) -> int:
    """Recovery report of a run directory (works while it runs, and on a copy).

    Args:
        run_dir: the --run-dir of a training run (it holds metrics.jsonl).
        json_out: print the report as JSON.
        plot: also draw loss, restarts, world size and throughput into this PNG (needs matplotlib).
    """
    if not records.path(run_dir).exists():
        print(
            f"error: no {records.FILE} in {run_dir!r}; pass the --run-dir of a training run", file=sys.stderr
        )
        return 2
    report = build(run_dir)
    print(json.dumps(report, indent=1) if json_out else text(report))
    if plot:
        from train.observe import plot as plotting

        try:
            plotting.draw(run_dir, report, plot)
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'ftjob[report]'", file=sys.stderr)
            return 2
    return 0


def cli() -> int:
    return tyro.cli(main)


if __name__ == "__main__":
    sys.exit(cli())
