"""`filefeed status` on a terminal: at 80 and 120 columns no number, partition or date is cut or folded; --wide
shows everything; a pipe gets whole lines."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.ledger import Ledger, LedgerEntry, partition_dir
from pipeline.model import Partition
from pipeline.staging import Staging
from tests.conftest import ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG_SEGMENT = "4512567890"
FILE = f"{LONG_SEGMENT}/20261201T101500Z_UPSERT_20261201T101500-0123456789_part00001.csv.gz"


# when _fill's deliveries were published: three hours before the test runs (so "3.0h ago"); between 00:00 and
# 03:00 UTC that date is not today's (the test once asserted today's, and failed)
WRITTEN: dict[str, datetime] = {}


def _fill(root: Path, feeds: Path) -> None:
    """A feed with a long history: 12 M rows delivered, a hundred thousand staged."""
    staging = Staging(root)
    try:
        for op in ("UPSERT", "DELETE"):
            p = Partition("42", LONG_SEGMENT, op)
            staging.append_sync(p, [("USER_EMAIL", f"{i:064x}", 1717494873000 + i, "1", "1023", f"up-{i}")
                                    for i in range(123_456 if op == "UPSERT" else 7)])
            WRITTEN["published"] = datetime.now(UTC) - timedelta(hours=3)
            Ledger(partition_dir(root, p)).record(LedgerEntry(
                roll_id="20261201T101500-0123456789", partition=str(p), planned_at="2026-12-01T10:15:00+00:00",
                published_at=WRITTEN["published"].isoformat(),
                files=({"name": FILE, "rows": 1_000_000, "bytes": 98_765_432, "sha256": "0" * 64},), manifest=None,
                rows=12_345_678, bytes=987_654_321, segments=("w1-00000001.jnl",)))
    finally:
        staging.close()
    feeds.write_text(f'[feeds.42]\ndestination_uri = "{(root / "out").as_uri()}"\n')


def _on_terminal(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """Run the CLI with a pseudo-terminal as its stdout (rich sizes its tables to COLUMNS there)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "filefeed", *args], env=env, stdout=slave, stderr=slave,
                            cwd=str(ROOT))
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=10) == 0, b"".join(chunks).decode(errors="replace")
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r", "")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "staging"
    _fill(root, tmp_path / "feeds.toml")
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FILEFEED_", "PLUGIN_", "GATEWAY_"))}
    full.update({"PYTHONPATH": str(ROOT), "FILEFEED_STAGING_DIR": str(root), "FILEFEED_FEEDS": str(tmp_path /
                                                                                                 "feeds.toml"),
                 "TERM": "xterm"})
    return full


WHOLE = ("123,456", "12,345,678", "4512567890", "42/4512567890/UPSERT", "42/4512567890/DELETE", "3.0h ago")


@pytest.mark.parametrize("columns", [80, 120])
def test_status_fits_the_terminal(env: dict[str, str], columns: int) -> None:
    text = _on_terminal({**env, "COLUMNS": str(columns), "LINES": "50"}, "status")
    for value in WHOLE:  # each on one line, never folded or cut with an ellipsis
        assert any(value in line for line in text.splitlines()), f"{value!r} cut at {columns} columns:\n{text}"
    assert "…" not in text, text
    title, *lines = text.splitlines()  # the title line is soft: the terminal wraps it, the path stays whole
    assert "/staging (disk free" in title
    assert all(len(line) <= columns for line in lines), text
    # the names say what each count is, on two header lines
    top, bottom = lines[1].split(), lines[2].split()
    assert top[:2] == ["staged", "oldest"] and bottom[:3] == ["partition", "rows", "staged"], text
    assert top[-2:] == ["delivered", "last"] and bottom[-2:] == ["rows", "delivery"], text


def test_status_wide_shows_every_column(env: dict[str, str]) -> None:
    text = _on_terminal({**env, "COLUMNS": "120"}, "status", "--wide").replace("\n", "")  # the terminal wraps
    for value in ("42/4512567890/UPSERT", "123,456", "12,345,678", "987,654,321", "13,098,832",
                  WRITTEN["published"].strftime("%Y-%m-%d"), FILE):
        assert value in text, f"{value!r} missing from --wide:\n{text}"
    # piped (no terminal), the long file name stays one piece even with a narrow COLUMNS
    piped = subprocess.run([sys.executable, "-m", "filefeed", "status", "--wide"], env={**env, "COLUMNS": "80"},
                           capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert piped.returncode == 0 and FILE in piped.stdout, piped.stdout + piped.stderr
