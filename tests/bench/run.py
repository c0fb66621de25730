"""Benchmark suite: ratios of the job against plain baselines, measured side by side in one run.

    .venv/bin/python tests/bench/run.py [--quick] [--out FILE]      (or: make bench)

Prints one markdown table (machine description above it, notes below) and writes it to
``runs/bench/results.md`` (or FILE); every raw sample goes to ``results.json`` beside it. Each row
compares two things timed alternately on the same machine in the same run, so machine noise mostly
cancels in the ratio. Progress goes to stderr; logs of every launched run stay in runs/bench/logs/.

Rows:
  T1  job overhead: steps/s of train/main.py / steps/s of tests/bench/bare_ddp.py (2 ranks, torchrun)
  P1  stall per checkpoint save / memcpy of the whole state (ours async; ours sync, torch.save and
      DCP async_save for reference), ~50 MB and ~500 MB of params + AdamW state (ckpt_bench.py)
  P7  resume load (load_latest + restore) / plain read of the checkpoint's files, each in a fresh
      process as on a restart (target row), and repeated in one process (reference)
  P8  checkpoint bytes on disk / tensor bytes
  P2  steps/s with a checkpoint every 50 steps / steps/s without (async; sync for reference)
  P4  recovery after SIGKILL of a rank (kill -> first step completed after the restart), ours vs
      tests/bench/seed_train.py (plain init_process_group + torch.save), same torchrun flags;
      ours with warm restarts off for reference
  M1-M3 memory and time of moving a checkpoint (memory_bench.py)
  L1-L3 the node-local tier: steps/s with it, steps lost to a SIGKILL and to a node loss
      (local_tier_bench.py)
  N1-N2 node loss and rejoin through the launcher, its default settings (launcher_bench.py)
  W1-W2 DataLoader workers and bf16 (training_bench.py)
  X1-X6 resume at a cluster's shape: 2 nodes x 1, 2, 4 ranks on loopback: bytes pulled per node,
        time, a slow reader, the first save of an attempt (scale_bench.py); a node's memory (X2,
        with M1-M3: memory_bench.py); a projection to 1024 nodes (projection.py)
  S1-S4 durable checkpoints on a real S3 server on loopback vs local disk (s3_bench.py)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tests" / "bench"
MAIN = REPO / "train" / "main.py"
ROOT = REPO / "runs" / "bench"
CACHE = ROOT / "cache"
WORK = ROOT / "work"
LOGS = ROOT / "logs"
NPROC = 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}"]
WARMUP_STEPS = 10

# The ~50 MB model of P2 (4.1M params x 12 bytes); small global batch so 50 steps take seconds on CPU.
P2_MODEL = {"n-layer": 5, "n-embd": 256, "n-head": 4}
P2_BATCH = 8

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def launch(cmd: list[str], name: str, timeout: float, env: dict[str, str] | None = None) -> tuple[int, bool]:
    """Run ``cmd`` (a torchrun) with its output in logs/<name>.log; return (exit code, timed out).

    On timeout: SIGTERM to torchrun (it stops its workers), then SIGKILL to whatever it started that
    is still there (torchrun puts workers in their own sessions, so each is killed by pid).
    """
    full_env = {k: v for k, v in os.environ.items() if k != "FTJOB_FAULT"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "w") as log:
        proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            pids = _descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pids = sorted(set(pids + _descendants(proc.pid)))
                proc.kill()
                proc.wait()
            _signal(pids, signal.SIGKILL)
            return proc.returncode, True


def trials(keys_and_fns: list[tuple[str, Callable[[int], dict]]], count: int) -> dict[str, list[dict]]:
    """``count`` rounds of each trial function; a trial that raised is recorded as {"error": why}."""
    out: dict[str, list[dict]] = {key: [] for key, _ in keys_and_fns}
    for i in range(count):
        for key, fn in keys_and_fns:
            try:
                r = fn(i)
            except Exception as e:  # a failed trial is a result too
                r = {"error": str(e)[:200]}
            out[key].append(r)
            say(f"{key.upper()} {i}: {r}")
    return out


def log_tail(name: str, n: int = 3) -> str:
    lines = (LOGS / f"{name}.log").read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip()[:200] for line in lines[-n:])


def failure_reason(name: str) -> str:
    """The first line of the log that says what went wrong, else its last lines."""
    lines = (LOGS / f"{name}.log").read_text(errors="replace").splitlines()
    for pattern in ("connectFullMesh", "DistStoreError", "Error:", "error:"):
        hits = [line.strip() for line in lines if pattern in line]
        if hits:
            return hits[0][:300]
    return log_tail(name, 2)


def jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def steps_per_s(times: list[float], warmup: int = WARMUP_STEPS) -> float:
    """``times[i]``: wall time at which step i+1 completed. Rate over the steps after the warm-up."""
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} steps completed")
    return (len(times) - warmup) / (times[-1] - times[warmup - 1])


def job_args(run_dir: Path, steps: int, **opts: object) -> list[str]:
    args = {
        "run-dir": run_dir,
        "data.cache-dir": CACHE,
        "max-steps": steps,
        "ckpt.interval": 0,
        "eval-interval": 0,
        "sample-bytes": 0,
        "dist.backend": "gloo",  # CPU, like the baselines, even where a GPU exists
    }
    args.update({k.replace("__", ".").replace("_", "-"): v for k, v in opts.items()})
    return [str(x) for k, v in args.items() for x in (f"--{k}", v)]


def job_step_times(run_dir: Path, restart: int = 0) -> list[float]:
    rows = [r for r in jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    by_step = {r["step"]: r["time"] for r in rows if r.get("restart") == restart}
    return [by_step[s] for s in sorted(by_step)]


def median_interval(times: list[float], warmup: int = WARMUP_STEPS) -> float:
    """Median seconds per step after the warm-up: insensitive to load bursts (a cross-check)."""
    return statistics.median(b - a for a, b in zip(times[warmup - 1 :], times[warmup:], strict=False))


def run_job(name: str, steps: int, timeout: float, **opts: object) -> list[float]:
    """Run train/main.py under torchrun; return the wall time at which each step completed."""
    run_dir = fresh(WORK / name)
    rc, timed_out = launch([*TORCHRUN, MAIN, *job_args(run_dir, steps, **opts)], name, timeout)
    if rc != 0 or timed_out:
        raise RuntimeError(f"{name}: exit {rc}{' (timeout)' if timed_out else ''}: {failure_reason(name)}")
    times = job_step_times(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return times


# -- T1 --------------------------------------------------------------------------------------------
def bench_t1(pairs: int, steps: int) -> dict:
    job, bare = [], []
    for i in range(pairs):
        job.append(run_job(f"t1_job_{i}", steps, timeout=300))
        say(f"T1 job  {i}: {steps_per_s(job[-1]):.3f} steps/s")
        times_file = fresh(WORK / f"t1_bare_{i}.json")
        cmd = [*TORCHRUN, BENCH / "bare_ddp.py", "--steps", steps, "--cache-dir", CACHE]
        cmd += ["--times-out", times_file]
        rc, timed_out = launch(cmd, f"t1_bare_{i}", timeout=300)
        if rc != 0 or timed_out:
            raise RuntimeError(f"bare_ddp: exit {rc}: {failure_reason(f't1_bare_{i}')}")
        bare.append(json.loads(times_file.read_text())["times"])
        say(f"T1 bare {i}: {steps_per_s(bare[-1]):.3f} steps/s")
    return {"job_times": job, "bare_times": bare, "steps": steps}


# -- P1 / P7 / P8 ----------------------------------------------------------------------------------
def bench_ckpt(mb: int, rounds: int, load_rounds: int, cold_rounds: int, fresh_rounds: int) -> dict:
    out = fresh(WORK / f"ckpt_{mb}.json")
    cmd = [
        sys.executable,
        BENCH / "ckpt_bench.py",
        "--mb",
        mb,
        "--rounds",
        rounds,
        "--load-rounds",
        load_rounds,
        "--cold-rounds",
        cold_rounds,
        "--fresh-rounds",
        fresh_rounds,
        "--dir",
        WORK / f"ckpt_{mb}",
        "--out",
        out,
    ]
    name = f"ckpt_{mb}"
    LOGS.mkdir(parents=True, exist_ok=True)
    with open(LOGS / f"{name}.log", "w") as log:
        cmd = [str(c) for c in cmd]
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"ckpt_bench {mb} MB: exit {proc.returncode}: {log_tail(name)}")
    say(f"P1/P7/P8 {mb} MB: {log_tail(name, 1)}")
    return json.loads(out.read_text())


# -- P2 --------------------------------------------------------------------------------------------
def excess_per_save(times: list[float], every: int, after: int = 5) -> float | None:
    """Seconds the ``after`` steps following each save took beyond the run's median step.

    A per-run estimate of what one save costs the step loop that load bursts between runs do not
    disturb (a cross-check for the P2 ratio, which compares separate runs).
    """
    med = median_interval(times)
    saves = [s for s in range(every, len(times) - after + 1, every) if s > WARMUP_STEPS]
    extra = [sum(times[j] - times[j - 1] - med for j in range(s, s + after)) for s in saves]
    return statistics.median(extra) if extra else None


def bench_p2(reps: int, steps: int) -> dict:
    model = {f"model.{k}": v for k, v in P2_MODEL.items()}
    variants = {
        "none": {"ckpt.interval": 0},
        "async": {"ckpt.interval": 50, "ckpt.async": True},
        "sync": {"ckpt.interval": 50, "ckpt.async": False},
    }
    times: dict[str, list[list[float]]] = {k: [] for k in variants}
    for i in range(reps):
        for v, opts in variants.items():
            times[v].append(
                run_job(f"p2_{v}_{i}", steps, timeout=600, global_batch_size=P2_BATCH, **model, **opts)
            )
            say(f"P2 {v:5s} {i}: {steps_per_s(times[v][-1]):.3f} steps/s")
    return {"times": times, "steps": steps}


# -- P4 --------------------------------------------------------------------------------------------
CRASH_STEP, CKPT_EVERY, P4_STEPS = 7, 5, 8
# A restart budget, as real jobs have: an attempt that fails to re-initialise costs a restart and
# its time counts in the recovery, as it does for a user.
P4_RESTARTS = 3


def kill_time(rows: list[dict]) -> float | None:
    kill = [r["time"] for r in rows if r.get("step") == CRASH_STEP and r.get("restart") == 0]
    return kill[0] if kill else None


def recovery(rows: list[dict]) -> float | None:
    """Seconds from the kill (the crash step's row, first attempt) to the first row after restart."""
    kill = kill_time(rows)
    after = [r["time"] for r in rows if r.get("restart", 0) >= 1]
    return min(after) - kill if kill is not None and after else None


def censored_median(trials: list[dict]) -> tuple[float, bool] | None:
    """Median recovery over all trials; a trial that never recovered counts as at least the time
    from its kill to its end (a lower bound). Returns (value, whether it is such a bound)."""
    values = sorted(
        (t["recovery_s"], False) if t["ok"] else (t["lower_s"], True)
        for t in trials
        if t["ok"] or t.get("lower_s") is not None
    )
    return values[(len(values) - 1) // 2] if values else None


_AGENT_LINE = re.compile(r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")


def stop_delay(name: str) -> float | None:
    """From torchrun's own log: its SIGTERM to the surviving worker -> worker group found stopped."""
    sent = done = None
    for line in (LOGS / f"{name}.log").read_text(errors="replace").splitlines():
        m = _AGENT_LINE.match(line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        if sent is None and "closing signal SIGTERM" in line:
            sent = t
        elif sent is not None and done is None and "failed (exitcode" in line:
            done = t
    return (done - sent) % 86400 if sent is not None and done is not None else None


def p4_trial(kind: str, i: int, timeout: float) -> dict:
    name = f"p4_{kind}_{i}"
    run_dir = fresh(WORK / name)
    flags = [*TORCHRUN, f"--max-restarts={P4_RESTARTS}"]
    if kind in ("ours", "ours_cold"):
        args = job_args(run_dir, P4_STEPS, ckpt__interval=CKPT_EVERY, dist__warm_restart=kind == "ours")
        env = {"FTJOB_FAULT": f"crash:step={CRASH_STEP}:rank=1"}
        rc, timed_out = launch([*flags, MAIN, *args], name, timeout, env)
        rows = [r for r in jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    else:
        run_dir.mkdir(parents=True)
        log = run_dir / "steps.jsonl"
        args = ["--cache-dir", CACHE, "--max-steps", P4_STEPS, "--ckpt", run_dir / "ckpt.pt"]
        args += ["--step-log", log, "--ckpt-interval", CKPT_EVERY]
        args += ["--crash-step", CRASH_STEP, "--crash-rank", 1]
        rc, timed_out = launch([*flags, BENCH / "seed_train.py", *args], name, timeout)
        rows = jsonl(log)
    took, end, kill = recovery(rows), time.time(), kill_time(rows)
    shutil.rmtree(run_dir, ignore_errors=True)
    if took is not None and rc == 0:
        warm = "warm restart: trainer forked" in (LOGS / f"{name}.log").read_text(errors="replace")
        restarts = max(r.get("restart", 0) for r in rows)  # >1: a restart failed to re-initialise
        return {
            "ok": True,
            "recovery_s": took,
            "stop_s": stop_delay(name),
            "warm": warm,
            "restarts": restarts,
        }
    why = "timeout" if timed_out else f"exit {rc}"
    lower = end - kill if kill is not None else None
    return {
        "ok": False,
        "why": f"{why}: {failure_reason(name)}",
        "stop_s": stop_delay(name),
        "lower_s": lower,
    }


def bench_p4(trials: int, timeout: float) -> dict:
    res: dict[str, list[dict]] = {"ours": [], "seed": [], "ours_cold": []}
    for i in range(trials):
        for kind in res:
            r = p4_trial(kind, i, timeout)
            res[kind].append(r)
            took = f"{r['recovery_s']:.2f} s, {r['restarts']} restart(s)" if r["ok"] else None
            say(f"P4 {kind} {i}: " + (took or f"FAILED ({r['why']})"))
    return res


# -- report ----------------------------------------------------------------------------------------
def machine() -> list[str]:
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- CPU: {cpu}; cores: {os.cpu_count()} ({usable} usable)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def fmt_mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB"


class Table:
    HEAD = ("ID", "Metric", "Ours", "Baseline", "Ratio", "Target", "Result")

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, rid: str, metric: str, ours: str, base: str, ratio: float | None, target: str) -> None:
        if ratio is None:
            verdict, shown = "n/a", "n/a"
        else:
            shown = f"{ratio:.3f}"
            op, bound = target.split()[0], float(target.split()[1].rstrip("x"))
            if op == "ref":
                verdict = "(ref)"
            else:
                verdict = "pass" if (ratio >= bound if op == ">=" else ratio <= bound) else "FAIL"
        self.rows.append((rid, metric, ours, base, shown, target.replace("ref 0", "—"), verdict))

    def error(self, rid: str, metric: str, err: BaseException) -> None:
        self.rows.append((rid, metric, "error", "", "", "", f"error: {str(err)[:150]}"))

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEAD) + " |", "|" + "|".join("---" for _ in self.HEAD) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(" ".join(c.replace("|", "/").split()) for c in row) + " |")
        return "\n".join(lines)


def section(table: Table, rid: str, metric: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as e:  # one broken section must not hide the others
        say(f"{rid} failed: {e!r}")
        table.error(rid, metric, e)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps, rounds and trials (~3-6 min)")
    p.add_argument("--out", default=str(ROOT / "results.md"), help="where to write the table")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated sections: T1,P1/P7/P8,P2,P4,M1-M3,L1-L3,N1-N2,S1-S4,W1-W2,X1-X6,F1-F5",
    )
    args = p.parse_args()
    q = args.quick
    out = Path(args.out)
    plan = {
        "t1": (1, 30) if q else (3, 60),  # (pairs, steps)
        # size in MB: (timed save rounds, warm load rounds, cold load rounds, fresh-process loads)
        "ckpt": {50: (5, 3, 1, 3), 500: (1, 1, 1, 1)} if q else {50: (10, 5, 2, 5), 500: (4, 3, 2, 3)},
        "p2": (1, 60) if q else (2, 110),  # (reps, steps): saves at 50 (quick), 50 and 100 (full)
        "p4": (3, 40.0) if q else (5, 40.0),  # (trials per side, timeout per trial; a good one ~8 s)
        "memory": 100 if q else 500,  # MB of state
        "l1": (1, 60) if q else (2, 110),  # (reps, steps)
        "l2": (2, 60) if q else (5, 80),  # (trials of each kind, steps)
        "n1": 1 if q else 3,  # trials per rendezvous backend
        "s3": (50, 2) if q else (200, 4),  # (MB of state, timed rounds)
        "w1": (1, 40) if q else (2, 60),  # (runs per side, steps)
    }
    header = [f"## ftjob benchmarks ({'quick' if q else 'full'} mode)", "", *machine()]
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)

    # Prepare the corpus once, outside every timed run (both the job and the baselines reuse it).
    sys.path.insert(0, str(REPO))
    from train.config import Config
    from train.lm.data import prepare

    d = Config().data
    prepare(d.path, str(CACHE), d.val_every)

    raw: dict = {"plan": {k: str(v) for k, v in plan.items()}}
    table = Table()
    notes: list[str] = []
    extra: list[str] = []  # sections printed after the table

    def t1() -> None:
        r = raw["t1"] = bench_t1(*plan["t1"])
        job = statistics.median(steps_per_s(t) for t in r["job_times"])
        bare = statistics.median(steps_per_s(t) for t in r["bare_times"])
        table.add(
            "T1",
            f"steps/s, job / bare DDP loop (default GPT, 2 ranks, {r['steps']} steps, "
            f"median of {len(r['job_times'])} runs each)",
            f"{job:.3f}",
            f"{bare:.3f}",
            job / bare,
            ">= 0.97",
        )
        mj = statistics.median(median_interval(t) for t in r["job_times"])
        mb = statistics.median(median_interval(t) for t in r["bare_times"])
        notes.append(
            f"T1 cross-check, median step interval: job {mj * 1e3:.1f} ms, bare {mb * 1e3:.1f} ms "
            f"(ratio of rates {mb / mj:.3f})."
        )

    def ckpt() -> None:
        for mb, rounds in plan["ckpt"].items():
            r = raw[f"ckpt_{mb}"] = bench_ckpt(mb, *rounds)
            med, size = r["median"], f"{r['tensor_bytes'] / 1e6:.0f} MB"
            memcpy = med["memcpy"]
            for key, label, target in (
                ("ours_async", "ours async", "<= 1.0x"),
                ("ours_async_no_overlap", "ours async, deferred copy not overlapped", "ref 0"),
                ("ours_sync", "ours sync", "ref 0"),
                ("seed", "seed torch.save", "ref 0"),
                ("dcp", "DCP async_save", "ref 0"),
            ):
                if key not in med:
                    continue
                table.add(
                    "P1",
                    f"save stall, {size} state, {label} / memcpy",
                    fmt_ms(med[key]),
                    fmt_ms(memcpy),
                    med[key] / memcpy,
                    target,
                )
            for label, load, read, target in (
                (
                    "plain read, {}, in a fresh process as on a restart, page cache warm",
                    "load_fresh",
                    "read_fresh",
                    "<= 1.2x",
                ),
                (
                    "our bare read (readinto numpy, no checksum, no restore), {}, fresh process, warm",
                    "load_fresh",
                    "readinto_fresh",
                    "ref 0",
                ),
                ("plain read, {}, repeated in one process, page cache warm", "load", "read", "ref 0"),
                ("plain read, {}, cold (fadvise DONTNEED)", "load_cold", "read_cold", "ref 0"),
            ):
                if load in med and read in med:
                    table.add(
                        "P7",
                        "resume load / " + label.format(size),
                        fmt_ms(med[load]),
                        fmt_ms(med[read]),
                        med[load] / med[read],
                        target,
                    )
            table.add(
                "P8",
                f"checkpoint bytes / tensor bytes, {size}",
                fmt_mb(r["ckpt_bytes"]),
                fmt_mb(r["tensor_bytes"]),
                r["ckpt_bytes"] / r["tensor_bytes"],
                "<= 1.02x",
            )
            m, smp = r["model"], r["samples"]
            slow = [a - b for a, b in zip(smp["compute_during_save"], smp["compute"], strict=True)]
            notes.append(
                f"P1 {size}: the forward/backward after an async save took "
                f"{statistics.median(smp['compute_during_save']) * 1e3:.1f} ms vs "
                f"{statistics.median(smp['compute']) * 1e3:.1f} ms alone (median paired slowdown "
                f"{statistics.median(slow) * 1e3:.1f} ms: the background save shares the cores)."
            )
            notes.append(
                f"{size} state: GPT n_layer={m['n_layer']} n_embd={m['n_embd']}; "
                f"{len(r['samples']['memcpy'])} save rounds after 1 warm-up; best stall ours async "
                f"{fmt_ms(r['best']['ours_async'])}, best memcpy {fmt_ms(r['best']['memcpy'])}; "
                f"seed file {fmt_mb(r['seed_bytes'])}, DCP dir {fmt_mb(r['dcp_bytes'])}"
            )

    def p2() -> None:
        r = raw["p2"] = bench_p2(*plan["p2"])
        none = statistics.median(steps_per_s(t) for t in r["times"]["none"])
        none_step = statistics.median(median_interval(t) for t in r["times"]["none"])
        for v, target in (("async", ">= 0.98"), ("sync", "ref 0")):
            rate = statistics.median(steps_per_s(t) for t in r["times"][v])
            table.add(
                "P2",
                f"steps/s, ckpt every 50 ({v}) / no ckpt, ~50 MB state, {r['steps']} steps, "
                f"median of {len(r['times'][v])} runs each",
                f"{rate:.3f}",
                f"{none:.3f}",
                rate / none,
                target,
            )
            extra = [x for t in r["times"][v] if (x := excess_per_save(t, 50)) is not None]
            if extra:
                e = statistics.median(extra)
                notes.append(
                    f"P2 {v} cross-check within runs: a save costs the next 5 steps {e * 1e3:.0f} ms "
                    f"beyond the median step ({none_step * 1e3:.0f} ms without checkpoints), "
                    f"i.e. ratio ~{1 / (1 + e / (50 * none_step)):.3f} at one save per 50 steps."
                )

    def p4() -> None:
        r = raw["p4"] = bench_p4(*plan["p4"])
        n = plan["p4"][0]
        ok = {k: [t["recovery_s"] for t in r[k] if t["ok"]] for k in r}
        med = {k: statistics.median(v) if v else None for k, v in ok.items()}
        failed = {k: [t["why"] for t in r[k] if not t["ok"]] for k in r}
        retried = {k: sum(t["ok"] and t["restarts"] > 1 for t in r[k]) for k in r}
        cm = {k: censored_median(r[k]) for k in r}

        def shown(k: str) -> str:
            return "n/a" if cm[k] is None else f"{'>= ' if cm[k][1] else ''}{cm[k][0]:.2f} s"

        table.add(
            "P4",
            "recovery after SIGKILL of rank 1: kill -> first step completed after the restart(s), "
            f"torchrun --max-restarts={P4_RESTARTS}, median of all trials, a trial that never "
            "recovered counted as at least its kill -> end of trial (ours recovered "
            f"{len(ok['ours'])}/{n}, {retried['ours']} needing more than one restart; seed recovered "
            f"{len(ok['seed'])}/{n}, {retried['seed']} needing more than one restart)",
            shown("ours"),
            shown("seed"),
            cm["ours"][0] / cm["seed"][0] if cm["ours"] and cm["seed"] and not cm["ours"][1] else None,
            "<= 0.6x",
        )
        first = [t["recovery_s"] for t in r["seed"] if t["ok"] and t["restarts"] == 1]
        if first and med["ours"] is not None:
            table.add(
                "P4",
                f"the same, seed counted only where its first restart re-initialised ({len(first)}/{n})",
                f"{med['ours']:.2f} s",
                f"{statistics.median(first):.2f} s",
                med["ours"] / statistics.median(first),
                "ref 0",
            )
        if med["ours_cold"] is not None and first:
            table.add(
                "P4",
                f"the same, ours with --dist.warm-restart false (recovered {len(ok['ours_cold'])}/{n}) "
                "vs the seed's first-restart successes",
                f"{med['ours_cold']:.2f} s",
                f"{statistics.median(first):.2f} s",
                med["ours_cold"] / statistics.median(first),
                "ref 0",
            )
        warm = sum(bool(t.get("warm")) for t in r["ours"])
        notes.append(f"P4 ours: {warm} of {len(ok['ours'])} successful restarts were warm (zygote fork).")
        stops = {k: [t["stop_s"] for t in r[k] if t.get("stop_s") is not None] for k in r}
        if stops["ours"] and stops["seed"]:
            notes.append(
                "P4 part of it, torchrun's SIGTERM to the surviving rank -> worker group stopped "
                f"(from torchrun's log), median: ours {statistics.median(stops['ours']):.2f} s, "
                f"seed {statistics.median(stops['seed']):.2f} s."
            )
        for kind in r:
            reasons: dict[str, int] = {}
            for why in failed[kind]:
                key = re.sub(r"\d+", "N", why)[:240]
                reasons[key] = reasons.get(key, 0) + 1
            notes.extend(f"P4 {kind} failed {c}x: {why}" for why, c in reasons.items())

    def memory() -> None:
        from memory_bench import measure

        r = raw["memory"] = measure(plan["memory"], WORK / "memory")
        first, later = r["save"]
        size = f"{first['state_bytes'] / 1e6:.0f} MB state"
        table.add("M1", f"rank 0's peak RSS growth during its first save / state bytes, {size} "
                  "(staging buffers included)", fmt_mb(first["growth"]), fmt_mb(first["state_bytes"]),
                  first["growth"] / first["state_bytes"], "<= 1.5x")  # fmt: skip
        table.add("M1", "the same, a later save (staging buffers reused)", fmt_mb(later["growth"]),
                  fmt_mb(later["state_bytes"]), later["growth"] / later["state_bytes"], "ref 0")  # fmt: skip
        got = r["resume"]
        rounds = f"median of {len(r['rounds'])} rounds"
        table.add("M2", f"peak RSS growth of a rank receiving the checkpoint at resume / state bytes, {size}, "  # noqa: E501
                  f"2 ranks, gloo, {rounds}", fmt_mb(got["growth"]), fmt_mb(got["state_bytes"]),
                  got["growth"] / got["state_bytes"], "<= 1.2x")  # fmt: skip
        cores = os.environ.get("BENCH_CORES_PER_SIDE", "1")
        received, local, wire = (f"{got[k]:.2f} s" for k in ("received_s", "local_s", "wire_s"))
        table.add("M3", "resume time of a rank receiving the checkpoint / a local load of it, each a "
                  f"fresh process, page cache warm, {size}, {cores} core(s) per side, {rounds}",
                  received, local, got["ratio"], "<= 1.3x")  # fmt: skip
        table.add("M3", "the wire alone: the same bytes broadcast between the same two processes, as "
                  f"stream.py cuts them, warm memory, no disk or checksums / the local load, {rounds}",
                  wire, local, got["wire_ratio"], "ref 0")  # fmt: skip
        table.add("M3", f"resume time of the receiving rank / the wire alone, {rounds}",
                  received, wire, got["over_wire"], "ref 0")  # fmt: skip
        both = got["local_s"] + got["wire_s"]
        table.add("M3", f"resume time of the receiving rank / (the local load + the wire alone), {rounds}: "
                  "the receiver waits for the sender's read, then the bytes", received, f"{both:.2f} s",
                  got["received_s"] / both, "<= 1.1x")  # fmt: skip
        sent = "its leader passing its copy on over the node's group (as from a bucket or a network fs)"
        for what, how in (("node", "each reading the node's copy"), ("nodesent", sent)):
            for ranks, node_rows in r["nodes"][what].items():
                excess = sum(row["excess"] for row in node_rows)  # each rank's own peak: an upper bound
                state = node_rows[0]["state_bytes"]
                table.add("X2", f"a node's peak host RSS at resume beyond what its ranks hold once resumed "
                          f"(sum of each rank's) / state bytes, {ranks} rank(s) on the node, {how}, {size}",
                          fmt_mb(excess), fmt_mb(state), excess / state, "<= 1.2x")  # fmt: skip

    def local_tier() -> None:
        from local_tier_bench import K, bench_l1, bench_l2_l3

        r = raw["local"] = bench_l1(*plan["l1"])
        none, local = (statistics.median(steps_per_s(t) for t in r["times"][v]) for v in ("none", "local"))
        table.add("L1", f"steps/s, a local checkpoint every {K} steps (+ durable every 50) / no checkpoints, "
                  f"default GPT, 2 ranks, {r['steps']} steps, median of {len(r['times']['none'])} runs each",
                  f"{local:.3f}", f"{none:.3f}", local / none, ">= 0.97")  # fmt: skip
        kills = raw["local_kills"] = bench_l2_l3(*plan["l2"])
        for key, what in (
            ("l2", "a SIGKILL of a random rank at a random instant"),
            ("l3", "the loss of a whole node (its agent and workers), rank 0's and the other in turn"),
        ):
            ok = [t for t in kills[key] if "lost" in t]
            worst = max((t["lost"] for t in ok), default=None)
            lost = ", ".join(str(t["lost"]) for t in ok)
            table.add(key.upper(), f"steps lost to {what}, worst of {len(ok)}/{len(kills[key])} trials "
                      f"({lost}) / K = {K}", str(worst), str(K), worst / K if worst is not None else None,
                      "<= 1x")  # fmt: skip
            notes.extend(f"{key.upper()} trial failed: {t['error']}" for t in kills[key] if "error" in t)

    def nodes() -> None:
        from launcher_bench import bench_n1_n2

        r = raw["nodes"] = bench_n1_n2(plan["n1"])
        for backend, trials in r.items():
            ok = [t for t in trials if "error" not in t]
            notes.extend(f"N1/N2 {backend} trial failed: {t['error']}" for t in trials if "error" in t)
            if not ok:
                continue
            n = f"{len(ok)}/{len(trials)}"
            which = "the first node" if backend == "etcd-v2" else "the other node"
            loss = statistics.median(t["loss_s"] for t in ok)
            table.add("N1", f"node loss through the launcher, {backend} rendezvous, {which} killed: kill -> "
                      f"first step at world size 1, s, median of {n} trials", f"{loss:.1f} s", "5 s",
                      loss / 5, "<= 1x")  # fmt: skip
            grow = statistics.median(t["rejoin_s"] for t in ok)
            table.add("N2", f"a node joining after that, {backend}: its launcher started -> first step "
                      f"at world size 2, median of {n} trials", f"{grow:.1f} s", "-", None,
                      "report")  # fmt: skip

    def s3() -> None:
        from s3_bench import bench_s3

        mb, rounds = plan["s3"]
        r = raw["s3"] = bench_s3(mb, rounds, fresh(WORK / "s3"))
        local, remote = r["local"], r["s3"]
        what = f"{r['ckpt_mb']:.0f} MB checkpoint, median of {rounds} rounds, S3 server on loopback"
        table.add("S1", f"save throughput to S3 / to local disk (upload + read-back verification), {what}",
                  f"{remote['save_mb_s']:.0f} MB/s", f"{local['save_mb_s']:.0f} MB/s",
                  remote["save_mb_s"] / local["save_mb_s"], "ref 0")  # fmt: skip
        table.add("S2", f"load throughput from S3 / from local disk (download, checksums, restore), {what}",
                  f"{remote['load_mb_s']:.0f} MB/s", f"{local['load_mb_s']:.0f} MB/s",
                  remote["load_mb_s"] / local["load_mb_s"], "ref 0")  # fmt: skip
        table.add("S3", f"step-loop stall of an async save to S3 / memcpy of the state, {what}",
                  fmt_ms(remote["stall_median_s"]), fmt_ms(r["memcpy_s"]),
                  remote["stall_median_s"] / r["memcpy_s"], "<= 1.0x")  # fmt: skip
        table.add("S3", "the same, an async save to local disk / memcpy", fmt_ms(local["stall_median_s"]),
                  fmt_ms(r["memcpy_s"]), local["stall_median_s"] / r["memcpy_s"], "ref 0")  # fmt: skip
        save, load = r["rss"]["s3save"], r["rss"]["s3load"]
        mb = f"{save['state_bytes'] / 1e6:.0f} MB state"
        table.add("S4", f"peak RSS growth during a save to S3 / state bytes, {mb}, a fresh process's "
                  "second save (staging buffers allocated by the first)",
                  fmt_mb(save["growth"]), fmt_mb(save["state_bytes"]), save["growth"] / save["state_bytes"],
                  "<= 1.5x")  # fmt: skip
        table.add("S4", f"peak RSS growth of a fresh process resuming from S3 / state bytes, {mb} "
                  f"(download, verify, restore; {load['load_s']:.2f} s; the S3 client's own set-up before "
                  f"it, once per process: {load['client_growth'] / 1e6:.0f} MB)",
                  fmt_mb(load["growth"]), fmt_mb(load["state_bytes"]), load["growth"] / load["state_bytes"],
                  "<= 1.2x")  # fmt: skip

    def training() -> None:
        from training_bench import bench_w1_w2

        reps, steps = plan["w1"]
        r = raw["training"] = bench_w1_w2(reps, steps)
        n = f"{steps} steps, median of {reps} runs each"
        table.add("W1", f"steps/s, 2 DataLoader workers / none, 1 rank, samples of ~7 ms CPU each, {n}",
                  f"{r['workers']['median']:.3f}", f"{r['main']['median']:.3f}",
                  r["workers"]["median"] / r["main"]["median"], ">= 1.5x")  # fmt: skip
        table.add("W2", f"steps/s, --precision bf16 / fp32, default GPT, 2 ranks, CPU, {n}",
                  f"{r['bf16']['median']:.3f}", f"{r['fp32']['median']:.3f}",
                  r["bf16"]["median"] / r["fp32"]["median"], "ref 0")  # fmt: skip

    def sharded() -> None:
        from fsdp_bench import bench_f1_f2, bench_f3, bench_f4, bench_f5

        raw["fsdp_f1_f2"] = bench_f1_f2()
        ranks = raw["fsdp_f1_f2"]["ranks"]
        shard = fmt_mb(max(r["shard_bytes"] for r in ranks))
        worst = max(ranks, key=lambda r: statistics.median(r["stalls"]) / r["memcpy_s"])
        stall = statistics.median(worst["stalls"])
        table.add("F1", "a save's stall of the step loop (the call, then the wait for its copy after "
                  f"the next forward/backward) / a memcpy of the rank's shard ({shard}; fsdp, GPT 8x512, "
                  f"2 ranks; worst rank, median of {len(worst['stalls'])} saves)",
                  fmt_ms(stall), fmt_ms(worst["memcpy_s"]), stall / worst["memcpy_s"], "<= 1.0")  # fmt: skip
        grown = max(ranks, key=lambda r: r["growth"] / r["shard_bytes"])
        table.add("F2", "a rank's peak RSS growth during its first save (staging allocated, written, "
                  f"read back, committed) / its shard bytes ({shard}), worst rank",
                  fmt_mb(grown["growth"]), fmt_mb(grown["shard_bytes"]),
                  grown["growth"] / grown["shard_bytes"], "<= 1.5")  # fmt: skip
        f3 = raw["fsdp_f3"] = bench_f3(20 if q else 30)
        if f3["resume_s"] is not None:
            table.add("F3", "resume, a 2-rank fsdp job's checkpoint by a 1-rank job (rows by byte range, "
                      "verified by block, restored) / a plain read of its shard files "
                      f"({fmt_mb(f3['shard_file_bytes'])}), page cache warm, best of 3 each",
                      fmt_ms(f3["resume_s"]), fmt_ms(f3["plain_read_s"]),
                      f3["resume_s"] / f3["plain_read_s"], "<= 1.3")  # fmt: skip
        reps, steps = (1, 30) if q else (2, 60)
        f4 = raw["fsdp_f4"] = bench_f4(reps, steps)
        table.add("F4", f"steps/s, fsdp / ddp, default GPT, 2 ranks, {steps} steps, median of {reps}",
                  f"{f4['fsdp']['median']:.3f}", f"{f4['ddp']['median']:.3f}",
                  f4["fsdp"]["median"] / f4["ddp"]["median"], "ref 0")  # fmt: skip
        f5 = raw["fsdp_f5"] = bench_f5(1 if q else 3, WORK / "f5")
        ok = [t for t in f5 if "lost" in t]
        notes.extend(f"F5 trial failed: {t['error']}" for t in f5 if "error" in t)
        worst = max((t["lost"] for t in ok), default=None)
        k = ok[0]["k"] if ok else 3
        table.add("F5", "steps lost when the node holding rank 0 of a 2-node x 2-rank fsdp run is "
                  f"SIGKILLed, resumed from the survivor's node-local copy of both nodes' shards, worst "
                  f"of {len(ok)}/{len(f5)} trials ({', '.join(str(t['lost']) for t in ok)}) / K = "
                  f"--ckpt.local-interval {k}", str(worst), str(k),
                  worst / k if worst is not None else None, "<= 1x")  # fmt: skip

    def scale() -> None:
        from scale_bench import measure

        r = raw["scale"] = measure(WORK / "scale", quick=q)
        by = {(t["case"], t["ranks"]): t for t in r["trials"]}
        size = by[("local", 4)]["ckpt_bytes"]
        shape = f"2 nodes x 4 ranks, {size / 1e6:.0f} MB checkpoint"
        cases = [
            ("local", "every node its own copy", "<= 1.05x"),
            ("other", "node 1 without one (receives)", "<= 1.05x"),
            ("bucket", "both from a bucket (S3 on loopback; listing and manifests included)", "<= 1.3x"),
        ]
        for case, what, target in cases:
            if (case, 4) not in by:
                table.add("X1", f"{what}: not measured ({r.get('bucket_error', '?')})", "", "", None, target)
                continue
            t = by[(case, 4)]
            worst = max(t["pulled_per_node"])
            disk = f"{max(t['disk_per_node']) / 1e6:.0f} MB"
            table.add("X1", f"bytes pulled per node at resume / checkpoint bytes, {what}, {shape} "
                      f"(readers {t['read_by']}, receivers {t['received_by']}; worst node; read from "
                      f"disk devices, page cache dropped first: {disk})",
                      fmt_mb(worst), fmt_mb(t["ckpt_bytes"]), worst / t["ckpt_bytes"], target)  # fmt: skip
        four, one = by[("local", 4)]["resume_s"], by[("local", 1)]["resume_s"]
        table.add("X3", f"resume time (start to end of the resume, slowest rank), 4 ranks per node / 1 per "
                  f"node ({os.cpu_count()} cores for the 8 or 2 processes)",
                  f"{four:.2f} s", f"{one:.2f} s", four / one, "<= 1.3x")  # fmt: skip
        cpu4, cpu1 = by[("local", 4)]["cpu_s_per_rank"], by[("local", 1)]["cpu_s_per_rank"]
        table.add("X3", "CPU seconds a rank spends resuming (its process, every thread; mean over ranks), 4 "
                  "ranks per node / 1: what sets the resume time where each rank has a core",
                  f"{cpu4:.3f} s", f"{cpu1:.3f} s", cpu4 / cpu1, "ref 0")  # fmt: skip
        slow = by[("slow", 4)]
        table.add("X4", "rank 0's reads 3 s slower per file (9 s in all) under --dist.init-timeout-s 5: "
                  "resumed and finished; resume time / the same without the fault",
                  f"{slow['resume_s']:.2f} s", f"{four:.2f} s", slow["resume_s"] / four, "ref 0")  # fmt: skip
        fs, un = r["first_save"], r["first_save_unmarked"]
        mb = f"{fs['state_bytes'] / 1e6:.0f} MB"
        table.add("X5", f"a restarted process's first save / its second, writer time, {mb} state, 3 older "
                  f"checkpoints kept (median of {len(fs['rounds'])})",
                  f"{fs['first_s']:.2f} s", f"{fs['later_s']:.2f} s", fs["ratio"], "<= 1.2x")  # fmt: skip
        table.add("X5", "the same with the verified marks removed (as before them: the kept ones re-read)",
                  f"{un['first_s']:.2f} s", f"{un['later_s']:.2f} s", un["ratio"], "ref 0")  # fmt: skip
        import projection

        rates = projection.measure()
        wire = raw.get("memory", {}).get("resume", {})
        if wire.get("wire_s"):
            rates["wire"] = wire["state_bytes"] / wire["wire_s"] / 1e9  # M3: gloo on loopback
        else:
            rates["wire"] = 1.0
            notes.append("X6: M3 did not run, so the loopback wire is taken as 1 GB/s (not measured).")
        raw["projection"] = {"rates": rates, "hardware": projection.HARDWARE}
        measured = ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
        notes.append(f"X6 per-byte costs measured here (GB/s, one core): {measured}; "
                     f"hardware assumed (GB/s): {projection.HARDWARE}")  # fmt: skip
        title = "### X6: resume at 8 ranks a node, projected (tests/bench/projection.py)"
        extra.append(f"{title}\n\n{projection.table(rates)}\n\n"
                     f"Nodes that must receive the checkpoint from one that holds it:\n\n"
                     f"{projection.receive_table(rates)}")  # fmt: skip

    wanted = set(args.only.split(",")) if args.only else None
    for rid, metric, fn in (
        ("T1", "job vs bare DDP steps/s", t1),
        ("P1/P7/P8", "checkpoint stall / load / size", ckpt),
        ("P2", "steps/s with vs without checkpoints", p2),
        ("P4", "recovery after SIGKILL", p4),
        ("M1-M3", "memory and time of moving a checkpoint", memory),
        ("L1-L3", "the node-local tier", local_tier),
        ("N1-N2", "node loss and rejoin through the launcher", nodes),
        ("S1-S4", "checkpoints in object storage", s3),
        ("W1-W2", "DataLoader workers, mixed precision", training),
        ("X1-X6", "resume at a cluster's shape", scale),
        ("F1-F5", "sharded training (fsdp) and its checkpoints", sharded),
    ):
        if wanted is None or rid in wanted:
            section(table, rid, metric, fn)

    header.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header.append(f"- wall time: {time.monotonic() - T0:.0f} s")
    notes = [
        "Ratio = ours / baseline. Stall and load rows: medians of the timed rounds; memcpy: best of 3 "
        "per round, median over rounds; steps/s: after a warm-up of "
        f"{WARMUP_STEPS} steps, from step-completion wall times, median over runs.",
        f"P2: GPT {P2_MODEL}, global batch {P2_BATCH}, 2 ranks. P4: default GPT, checkpoint every "
        f"{CKPT_EVERY} steps, rank 1 SIGKILLed after step {CRASH_STEP}, "
        f"torchrun --max-restarts={P4_RESTARTS}.",
        *notes,
    ]
    text = "\n".join(
        [*header, "", table.markdown(), "", *(f"- {n}" for n in notes), *(f"\n{e}" for e in extra)]
    )
    text += "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    shutil.rmtree(WORK, ignore_errors=True)
    say(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
