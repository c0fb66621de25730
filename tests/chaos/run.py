"""`make chaos`: every failure family, caused for real with torchrun on the tiny test model, in one
reliability table.

    python tests/chaos/run.py                 # CHAOS_TRIALS=100 by default: 100 SIGKILLs, ...
    CHAOS_TRIALS=20 python tests/chaos/run.py
    CHAOS_FAMILIES=sigkill,sigterm python tests/chaos/run.py
    CHAOS_SEED=7 ...                          # the same random instants and choices again
    CHAOS_KEEP=1 ...                          # keep the work dir (kept anyway when a trial fails)

Exit status 1 if any trial failed. ``run_families()`` is the same from Python (tests/e2e uses it
with a few trials per family).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from chaos import fam_input, fam_kill, fam_stop, fam_storage, fam_untrusted, fam_verdict, harness
from chaos.harness import Row, Session, Trial

# family -> (runner, trials for a given CHAOS_TRIALS)
FAMILIES: dict[str, tuple[Callable[[Session, int], Row], Callable[[int], int]]] = {
    "sigkill": (fam_kill.run_family_sigkill, lambda n: n),
    "corruption": (fam_storage.run_family_corruption, lambda n: max(4, n // 25)),
    "disk-full": (fam_storage.run_family_disk_full, lambda n: max(2, n // 20)),
    "sigterm": (fam_stop.run_family_sigterm, lambda n: max(2, n // 20)),
    "hung-rank": (fam_stop.run_family_hung_rank, lambda n: max(2, n // 20)),
    "hung-save": (fam_storage.run_family_hung_save, lambda n: max(2, n // 20)),
    "squatter": (fam_kill.run_family_squatter, lambda n: max(2, n // 20)),
    "bad-input": (fam_input.run_family_bad_input, lambda n: max(len(fam_input.CASES), n // 20)),
    "untrusted": (fam_untrusted.run_family_untrusted, lambda n: max(4, n // 25)),
    "io-error": (fam_untrusted.run_family_io_error, lambda n: max(2, n // 20)),
    "forged-verdict": (fam_verdict.run_family_forged_verdict, lambda n: max(2, n // 50)),
}


def run_families(
    trials: int | dict[str, int] | None = None,
    families: list[str] | None = None,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """One Row per family. ``trials``: per family (a dict), the same for all (an int), or None for
    the counts CHAOS_TRIALS (default 100) gives."""
    names = families or list(FAMILIES)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    scale = int(os.environ.get("CHAOS_TRIALS", "100"))
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 100_000)) if seed is None else seed
    session = Session(Path(tempfile.mkdtemp(prefix="ftjob-chaos-")), seed)
    out = []
    if progress is not None:
        progress(f"chaos: seed {seed} (CHAOS_SEED={seed} repeats the same choices), work dir {session.root}")
    try:
        for name in names:
            runner, default = FAMILIES[name]
            n = (
                trials.get(name, 1)
                if isinstance(trials, dict)
                else trials
                if trials is not None
                else default(scale)
            )
            started = time.monotonic()
            try:
                row = runner(session, n)
            except Exception as e:  # a harness problem: reported as a failed trial, the rest goes on
                row = Row(name, [Trial(False, f"{type(e).__name__}: {e}")])
            row.notes.append(f"{time.monotonic() - started:.0f} s")
            row.trials += [Trial(False, f"{name}: {leak}") for leak in harness.LEFTOVERS]
            harness.LEFTOVERS.clear()
            out.append(row)
            if progress is not None:
                skipped = f" (skipped: {row.skipped})" if row.skipped else ""
                progress(f"{name}: {row.passed}/{len(row.trials)} passed{skipped}")
    finally:
        failed = any(not t.ok for row in out for t in row.trials)
        keep = failed or os.environ.get("CHAOS_KEEP") == "1"
        session.close(keep=keep)
        if keep and progress is not None:
            progress(f"chaos: logs and run dirs kept in {session.root}")
    return out


def _identical(row: Row) -> str:
    known = [t.identical for t in row.trials if t.identical is not None]
    if not known:
        return "n-a"
    return "yes" if all(known) else "no"


def _lost(row: Row) -> str:
    known = [t.lost for t in row.trials if t.lost is not None]
    return f"{sum(known)} (max {max(known)})" if known else "n-a"


def table(rows: list[Row]) -> str:
    lines = [
        "| family | trials | passed | steps lost: total (max per trial) "
        "| final weights identical to the uninterrupted run | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.family} | 0 | 0 | n-a | n-a | skipped: {row.skipped} |")
            continue
        notes = "; ".join(row.notes)
        lines.append(
            f"| {row.family} | {len(row.trials)} | {row.passed} | {_lost(row)} | {_identical(row)} "
            f"| {notes} |"
        )
    failures = [line for row in rows for line in row.failures]
    if failures:
        lines += ["", "Failures:"] + [f"- {line}" for line in failures]
    return "\n".join(lines)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (processes, mounts) first
    families = [f for f in os.environ.get("CHAOS_FAMILIES", "").split(",") if f] or None
    started = time.monotonic()
    rows = run_families(families=families, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(rows))
    total = sum(len(r.trials) for r in rows)
    failed = sum(len(r.trials) - r.passed for r in rows)
    print(f"\n{total} trials, {failed} failed, {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
