"""bench/tombstones.py runs real snapshot deliveries: the side with the horizon remembers fewer removals, never fewer
members."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_horizon_side_forgets_old_removals_and_delivers_the_same_members(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "bench/tombstones.py", "--members", "300", "--churn", "30", "--days", "40",
                           "--dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    last = re.search(r"day  40: state rows\s+([\d,]+) vs\s+([\d,]+).*members ([\d,]+)", done.stdout)
    assert last, done.stdout
    on, off, members = (int(x.replace(",", "")) for x in last.groups())
    assert members == 300
    assert off == 300 + 40 * 30  # every removal of the 40 days is remembered without the horizon
    # with it, the removals of days 9 to 40: the horizon is 30 days before the previous state's newest change (day 39)
    assert on == 300 + (40 - (39 - 30) + 1) * 30
    assert not list(tmp_path.iterdir())  # the work folder is removed
