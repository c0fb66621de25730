"""Every chaos family of `make chaos` (tests/chaos/run.py), with real torchrun processes, at 1-5
trials each: a SIGKILL at random instants, a damaged newest checkpoint, a full disk, SIGTERM, a hung
rank, a hung save, a squatted warm-start socket, bad input. ~3 minutes on 2 CPU cores."""

from __future__ import annotations

import sys

import pytest
from chaos.run import run_families, table

SHORT = {
    "sigkill": 3,
    "corruption": 2,
    "disk-full": 1,
    "sigterm": 1,
    "hung-rank": 1,
    "hung-save": 1,
    "squatter": 1,
    "bad-input": 5,  # each case once: config, data, other model, run dir, planted pickles
}


@pytest.mark.timeout(900)  # ~3 min alone on 2 cores; more when the machine is shared
def test_every_chaos_family_passes_a_few_trials() -> None:
    rows = run_families(trials=SHORT, progress=lambda line: print(line, file=sys.stderr))
    report = table(rows)
    print(report)
    assert {row.family for row in rows} == set(SHORT)
    failures = [line for row in rows for line in row.failures]
    assert not failures, report
    for row in rows:
        assert row.skipped or len(row.trials) == SHORT[row.family], report
