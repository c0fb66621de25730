"""A forged verdict: two nodes (two ftjob launchers, c10d on loopback, the job's FTJOB_JOB_SECRET),
and at a random step another process that reaches the rendezvous store writes a "permanent
failure" verdict without the secret. The launchers must ignore it (one warning) and the run must end
as the uninterrupted one, bit for bit."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

from chaos.checks import all_valid, compare, rows
from chaos.harness import REPO, STEPS, Job, Row, Session, Trial, tail
from conftest import free_port

FTJOB = REPO / "launch" / "ftjob.py"
# What anyone on the network can do: open the store as the launchers do, write the job's key.
FORGE = """
import json, sys, time
from launch import verdict
store = verdict._open("c10d", sys.argv[1], sys.argv[2], timeout_s=30)[1]
forged = {"code": 2, "reason": "forged", "node": "attacker", "time": time.time()}
store.set(verdict._key(sys.argv[2]), json.dumps(forged))
print("forged", flush=True)
"""


def run_family_forged_verdict(s: Session, trials: int) -> Row:
    row = Row("forged-verdict")
    reference = s.reference(s.args(s.root / "x"))
    for _ in range(trials):
        row.trials.append(_trial(s, reference))
    row.notes.append("2 launchers on loopback (c10d), a verdict without the job's HMAC at a random step")
    return row


def _trial(s: Session, reference: Path) -> Trial:
    where = s.fresh("forged-verdict")
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"chaos-{uuid.uuid4().hex[:8]}"
    env = {"TMPDIR": str(s.tmp), "FTJOB_JOB_SECRET": secrets.token_hex(16)}
    env["FTJOB_FAULT"] = "slow:ms=30:restart=any"
    dirs = [where / name / "run" for name in ("a", "b")]
    jobs = []
    for run_dir in dirs:
        cmd = [sys.executable, str(FTJOB), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", "--monitor-interval=0.2", "--",
               *s.args(run_dir, ckpt__interval=5)]  # fmt: skip
        jobs.append(Job(cmd, env, run_dir.parent / "log", timeout=300))
        jobs[-1].sleep(1.0)  # the first hosts the store
    at = s.rng.randint(5, STEPS // 2)  # late enough to be mid-run, early enough that the store is still up

    def reached() -> bool:
        return any(r.get("kind") == "train" and r["step"] >= at for d in dirs for r in rows(d))

    jobs[0].wait_for(reached)
    forger = subprocess.run(
        [sys.executable, "-c", FORGE, endpoint, run_id],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    codes = [job.wait() for job in jobs]
    said = "".join(job.err_path.read_text(errors="replace") for job in jobs)
    run_dir = next((d for d in dirs if any(r.get("kind") == "train" for r in rows(d))), dirs[0])
    checks = [
        ("forged" in forger.stdout, f"the forger failed: {tail(forger.stderr)}"),
        (codes == [0, 0], f"launchers exited {codes}: {tail(said)}"),
        ("ignoring a verdict in the rendezvous store" in said, "no warning about the forged verdict"),
    ]
    why = next((w for ok, w in checks if not ok), "") or all_valid(run_dir)
    problem = "" if why else compare(run_dir, reference)
    identical = None if why else not problem
    return Trial(not (why or problem), f"forged at step {at}: {why or problem}", 0, identical)
