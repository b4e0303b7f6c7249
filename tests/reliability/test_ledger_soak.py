"""The endurance soak of bench/soak.py, short: many feeds, batches every second, a ledger retention shorter than the
run. Checks: the ledger is pruned to its retention and stays there, descriptors and RSS stay flat, every acknowledged
row is delivered exactly once. The 30-minute run is `python bench/soak.py --minutes 30` (README, Benchmarks)."""

from __future__ import annotations

import pytest

from bench import soak
from tests.reliability.helpers import env_float, record_summary

pytestmark = pytest.mark.reliability

SECONDS = env_float("FILEFEED_LEDGER_SOAK_SECONDS", 90)
RETENTION = 30.0


@pytest.mark.timeout(int(SECONDS) + 400)
def test_ledger_soak(tmp_path):
    figures = soak.run(SECONDS, feeds=50, rate=100, batch_feeds=10, retention_seconds=RETENTION, sample_seconds=5,
                       tmp=tmp_path, verbose=False)
    record_summary("ledger_soak", {k: v for k, v in figures.items() if k != "samples"})
    warm, end = figures["warm_sample"], figures["end_sample"]
    assert figures["errors"] == 0, figures["first_errors"]
    assert figures["lost"] == 0 and figures["duplicated"] == 0 and figures["partial"] == 0, figures
    # pruned: the ledger holds about the retention's worth of rolls, not everything published
    assert end["rolls"] < figures["published_rolls"], figures
    assert end["rolls"] <= warm["rolls"] * soak.LEDGER_GROWTH + 20, figures
    assert end["bytes"] <= warm["bytes"] * soak.LEDGER_GROWTH, figures
    assert figures["fd_growth"] <= soak.FD_GROWTH, figures
    assert end["rss_mb"] <= warm["rss_mb"] * 1.3 + 30, figures
