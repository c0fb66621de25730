"""`pytest -m chaos tests/chaos`: the full reliability table of tests/chaos/run.py (`make chaos`),
CHAOS_TRIALS (default 100) SIGKILLs and the other families scaled from it."""

from __future__ import annotations

import pytest
from chaos.run import run_families, table

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(3600)]


def test_reliability_table() -> None:
    rows = run_families(progress=print)
    report = table(rows)
    print(report)
    assert not [line for row in rows for line in row.failures], report
