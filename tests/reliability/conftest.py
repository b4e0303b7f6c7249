"""Reliability suites: print every suite's summary at the end of the session, whatever -s says."""

from __future__ import annotations

import pytest

from tests.reliability.helpers import RESULTS_DIR, SUMMARIES, Group


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not SUMMARIES:
        return
    terminalreporter.section("filefeed reliability figures")
    for name, data in SUMMARIES:
        flat = {k: v for k, v in data.items() if k not in ("suite", "recorded_at")}
        terminalreporter.write_line(f"{name}: {flat}")
    terminalreporter.write_line(f"(JSON in {RESULTS_DIR})")


@pytest.fixture
def group(tmp_path):
    """filefeed servers in their own process groups, all stopped at teardown even on failure."""
    g = Group(tmp_path)
    try:
        yield g
    finally:
        g.close()
