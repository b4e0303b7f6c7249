"""A staging writer run as a separate process by the multi-process and kill -9 tests.

python child_writer.py ROOT count TAG N     append N one-row appends (16 at a time), close, print "done"
python child_writer.py ROOT ack TAG         append forever; print "<segment> <row id>" after each acknowledgement
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pipeline.model import Partition
from pipeline.staging import Staging

PARTITIONS = (Partition("feed1", "seg1", "UPSERT"), Partition("feed1", "seg1", "DELETE"))


def row(tag: str, i: int) -> tuple[str, str, int, str, str, str]:
    return ("email_sha256", f"{tag}-{i}", i, "sess", "dm1", f"up{i}")


async def count(staging: Staging, tag: str, n: int) -> None:
    async def one(i: int) -> None:
        await staging.append(PARTITIONS[i % 2], [row(tag, i)])

    for start in range(0, n, 16):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 16))))


async def ack_forever(staging: Staging, tag: str) -> None:
    out = sys.stdout

    async def producer(k: int) -> None:
        i = k
        while True:
            res = await staging.append(PARTITIONS[i % 2], [row(tag, i)])
            out.write(f"{res.segment} {tag}-{i}\n")
            out.flush()
            i += 8

    await asyncio.gather(*(producer(k) for k in range(8)))


def main() -> None:
    root, mode, tag = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    staging = Staging(root, seal_after_seconds=0.05, min_free_bytes=0)
    staging.recover()  # every worker recovers at start, concurrently with the others writing
    if mode == "count":
        asyncio.run(count(staging, tag, int(sys.argv[4])))
        staging.close()
        print("done", flush=True)
    else:
        asyncio.run(ack_forever(staging, tag))


if __name__ == "__main__":
    main()
