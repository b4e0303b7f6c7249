"""Child process of the snapshot and schedule crash tests, killed at FILEFEED_CRASH_AT when that is set.

Usage: python -m tests.snapshot.child ROOT DEST PHASE WHEN_ISO [SCHEDULE]
PHASE: "apply" (the apply rolls only), "snapshot" (the snapshot roll only, for slot WHEN), "all" (a delivery of
slot WHEN, as delivery.roll does it) or "slots" (the scheduler's pass at time WHEN, with SCHEDULE).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

from pipeline import scheduler, snapshot
from pipeline.rollover import RollMode, roll_partition
from sinks import open_sink
from tests.snapshot.helpers import DELETE, UPSERT, snapshot_props


def main(argv: list[str]) -> int:
    root, dest, phase, when = Path(argv[0]), Path(argv[1]), argv[2], datetime.fromisoformat(argv[3])
    if "FILEFEED_SNAPSHOT_TOMBSTONE_DAYS" in os.environ:  # as the service and the CLI configure it
        snapshot.configure(float(os.environ["FILEFEED_SNAPSHOT_TOMBSTONE_DAYS"]))
    if phase == "slots":
        props = snapshot_props(dest, delivery_schedule=argv[4], delivery_mode=argv[5])
        outcomes = scheduler.deliver_due_slots(root, {UPSERT.feed_id: props}, now=when)
        print(sorted(o.status for o in outcomes.values()))
        return 0
    props = snapshot_props(dest)
    with open_sink(props) as sink:
        if phase == "apply":
            for partition in (UPSERT, DELETE):
                roll_partition(root, partition, props, sink, kind=RollMode(mode="apply"))
        elif phase == "snapshot":
            sdir = snapshot.snapshot_dir(root, UPSERT.feed_id, UPSERT.segment_id)
            kind = RollMode(mode="snapshot", suffix=snapshot.RUN_SUFFIX, slot=when)
            print(roll_partition(root, UPSERT, props, sink, kind=kind, pdir=sdir))
        else:
            print(snapshot.roll_segment(root, UPSERT, props, sink, slot=when))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
