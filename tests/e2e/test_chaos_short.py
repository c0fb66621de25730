"""`make chaos` (tests/chaos/run.py) still works: its harness, with real torchrun processes, at one
trial of a SIGKILL at a random instant. Each failure family has its own
end-to-end test here; the repeated trials of every family are `make chaos`'s (tests/README.md)."""

from __future__ import annotations

import sys

import pytest
from chaos.run import run_families, table

SHORT = {"sigkill": 1}


@pytest.mark.timeout(600)
def test_the_chaos_harness_runs_and_its_trials_pass() -> None:
    rows = run_families(
        trials=SHORT, families=list(SHORT), progress=lambda line: print(line, file=sys.stderr)
    )
    report = table(rows)
    print(report)
    assert {row.family for row in rows} == set(SHORT)
    failures = [line for row in rows for line in row.failures]
    assert not failures, report
    for row in rows:
        assert row.skipped or len(row.trials) == SHORT[row.family], report
