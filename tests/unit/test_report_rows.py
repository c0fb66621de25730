"""The recovery report from a hand-written record: incidents, causes, lost steps, recovery times."""

from __future__ import annotations

import json
from pathlib import Path

from train.observe import records, report


def write(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, '{"kind": "train", "st')  # a line torn by a kill
    (run_dir / records.FILE).write_text("\n".join(lines) + "\n")


def steps(first: int, last: int, t0: float, world: int = 2, restart: int = 0) -> list[dict]:
    return [
        {
            "kind": "train",
            "step": s,
            "loss": 1.0,
            "lr": 1e-3,
            "samples": 8 * s,
            "world_size": world,
            "restart": restart,
            "time": t0 + (s - first) * 0.1,
            "step_time": 0.1,
        }
        for s in range(first, last + 1)
    ]


def test_incidents_causes_and_costs(tmp_path: Path) -> None:
    rows = [
        {"kind": "start", "time": 0.0, "restart": 0, "world_size": 2, "warm": False, "step": 0},
        *steps(1, 12, 1.0),
        {"kind": "checkpoint", "time": 1.9, "step": 10, "stall_s": 0.01},
        {"kind": "end", "time": 2.5, "code": 145, "secondary": True, "rank": 0, "reason": "peer gone"},
        {"kind": "start", "time": 3.0, "restart": 1, "world_size": 2, "warm": True, "step": 10},
        {"kind": "resume", "time": 3.1, "step": 10, "path": "ck/step_10", "lost_steps": 2, "skipped": []},
        *steps(11, 20, 4.0, restart=1),
        {"kind": "end", "time": 6.0, "code": 143, "secondary": False, "rank": 0, "reason": "preempted"},
        {"kind": "end", "time": 6.0, "code": 143, "secondary": False, "rank": 1, "reason": "preempted"},
        {"kind": "start", "time": 9.0, "restart": 0, "world_size": 1, "warm": False, "step": 20},
        {
            "kind": "resume",
            "time": 9.1,
            "step": 20,
            "path": "ck/step_20",
            "lost_steps": 0,
            "skipped": ["step_00000030"],
        },
        *steps(21, 25, 10.0, world=1),
        {"kind": "end", "time": 11.0, "code": 0, "secondary": False, "rank": 0, "reason": "finished"},
    ]
    write(tmp_path, rows)
    r = report.build(tmp_path)
    assert r["steps_done"] == 25 and r["attempts"] == 3 and len(r["incidents"]) == 2
    first, second = r["incidents"]
    assert first["cause"].startswith("rank 1 ended without a record")
    assert (first["last_step"], first["resumed_from_step"], first["steps_lost"]) == (12, 10, 2)
    assert abs(first["recovery_s"] - (4.0 - 2.1)) < 1e-6 and first["warm"]
    assert second["cause"].startswith("preemption") and "world size 2 -> 1" in second["cause"]
    assert second["fell_back"] and second["skipped"] == ["step_00000030"]
    assert r["throughput"]["steps_rerun"] == 2 and r["checkpoints"]["durable"] == 1
    assert r["state"].startswith("ended: finished")
    assert "2 incident(s)" in report.text(r)


def test_a_run_without_endings_or_start_rows(tmp_path: Path) -> None:
    """An older run dir (no start/end rows) and a rank 0 SIGKILLed: still a report."""
    write(tmp_path, [*steps(1, 5, 0.0), *steps(3, 8, 5.0)])
    r = report.build(tmp_path)
    assert r["steps_done"] == 8 and r["incidents"] == [] and r["state"].startswith("running")
    write(
        tmp_path,
        [
            {"kind": "start", "time": 0.0, "world_size": 2},
            *steps(1, 5, 0.0),
            {"kind": "start", "time": 3.0, "world_size": 2, "restart": 1},
            *steps(1, 3, 4.0),
        ],
    )
    (incident,) = report.build(tmp_path)["incidents"]
    assert incident["cause"] == report.NO_RECORD and incident["steps_lost"] == 5
