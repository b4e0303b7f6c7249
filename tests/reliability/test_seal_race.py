"""batch_update must never take a staged segment for unknown while it moves through its states.

A segment moves forward only: open/ -> sealed/ -> rolling/<roll>/segments/ -> (ledger entry written, roll folder
removed). `pipeline.batch.locate_segment` looks in that order, so a segment that moves while it is looked up is
found further on. A segment read as unknown would be staged again from the batch's items and published twice
(seen before the fix in the crash suite and a soak: 64 and 12 rows delivered twice).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from pipeline.batch import locate_segment
from pipeline.ledger import Ledger, LedgerEntry
from pipeline.model import Partition
from pipeline.staging import Staging

pytestmark = pytest.mark.reliability


def test_a_moving_segment_is_never_unknown(tmp_path):
    root = tmp_path / "staging"
    st = Staging(root, min_free_bytes=0)
    part = Partition("42", "7", "UPSERT")
    pdir = root / part.relpath
    for d in ("open", "sealed", "rolling"):
        (pdir / d).mkdir(parents=True)
    stop = threading.Event()
    moved: list[str] = []

    def mover():  # the real forward path of each segment, one after the other
        i = 0
        while not stop.is_set():
            i += 1
            name = f"w1-abc-{i:08d}"
            (pdir / "open" / f"{name}.jnl").write_bytes(b"x")
            moved.append(name)
            os.rename(pdir / "open" / f"{name}.jnl", pdir / "sealed" / f"{name}.jnl")
            roll = pdir / "rolling" / f"r{i}"
            (roll / "segments").mkdir(parents=True)
            os.rename(pdir / "sealed" / f"{name}.jnl", roll / "segments" / f"{name}.jnl")
            Ledger(pdir).record(LedgerEntry(roll_id=f"r{i}", partition=str(part), planned_at="", published_at="",
                                            files=(), manifest=None, rows=1, bytes=1, segments=(f"{name}.jnl",)))
            os.remove(roll / "segments" / f"{name}.jnl")
            os.rmdir(roll / "segments")
            os.rmdir(roll)

    t = threading.Thread(target=mover, daemon=True)
    t.start()
    unknown = checks = 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            if not moved:
                continue
            name = moved[-1]
            checks += 1
            if locate_segment(st, part, name) is None:
                unknown += 1
    finally:
        stop.set()
        t.join(10)
        st.close()
    print(f"[reliability] moving segments: {checks} look-ups over {len(moved)} segments, {unknown} unknown")
    assert checks > 100 and len(moved) > 10
    assert unknown == 0, f"a staged segment read as unknown ({unknown} of {checks} look-ups)"
    assert locate_segment(Staging(tmp_path / "other", min_free_bytes=0), part, "w9-zzz-00000001") is None
