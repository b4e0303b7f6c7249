"""Child process of the crash tests: one roll_partition call, killed at FILEFEED_CRASH_AT when that is set.

Usage: python -m tests.rollover.crash_child ROOT DEST NOW_ISO FORMAT COMPRESSION MAX_ROWS [PROPS_JSON]
(PROPS_JSON: more feed properties, e.g. encryption)
Prints the RollOutcome as JSON on success.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path

from pipeline.model import Partition
from pipeline.rollover import roll_partition
from sinks import open_sink
from tests.rollover.helpers import props_for

PARTITION = Partition("feed-1", "seg-1", "UPSERT")


def main(argv: list[str]) -> int:
    root, dest, now, fmt, compression, max_rows, *extra = argv
    more = json.loads(extra[0]) if extra else {}
    props = props_for(Path(dest), file_format=fmt, compression=compression, max_rows_per_file=int(max_rows), **more)
    with open_sink(props) as sink:
        outcome = roll_partition(Path(root), PARTITION, props, sink, now=datetime.fromisoformat(now))
    print(json.dumps(dataclasses.asdict(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
