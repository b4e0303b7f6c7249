"""Descriptors stay bounded: 5,000 partitions under a real `ulimit -n 1024` (setrlimit in the server process).

The previous layout kept one open file per partition a writer had rows for: with 5,000 segments and 1,024
descriptors, updates answered 500 "Too many open files". Staging now holds one journal per writer (at most
FILEFEED_MAX_OPEN_FILES descriptors): every answer is 200, or 429 retry; the workers' descriptor counts stay far
below the limit, and every acknowledged row is staged exactly once.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import FilefeedServer, write_feeds
from tests.reliability.helpers import REPO, base_env, descendants, free_port, record_summary

pytestmark = pytest.mark.reliability
SEGMENTS = 5_000
REQUESTS = 6_000
CONCURRENCY = 32
NOFILE = 1024


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def test_5000_partitions_under_ulimit_1024_never_answer_500(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    env = base_env(staging, {"FILEFEED_FEEDS": str(write_feeds(tmp_path / "feeds.toml", {
        "42": {"destination_uri": (tmp_path / "out").as_uri(), "identifier_types": "USER_ACCOUNT"}}))})
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "filefeed", "serve", "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", "2"], env=env, stdout=f, stderr=f, cwd=str(REPO),
                                start_new_session=True, preexec_fn=_limit_descriptors)
    srv = FilefeedServer(f"http://127.0.0.1:{port}", staging, proc, log, env, workers=2)
    statuses: Counter[int] = Counter()
    acked: list[str] = []
    failures: list[str] = []
    max_fds = 0
    try:
        srv.wait_ready(60)
        workers = descendants(proc.pid)
        assert workers, "no worker process found"

        async def main() -> None:
            nonlocal max_fds
            queue = iter(range(REQUESTS))
            # As many keep-alive connections as connections, and no client-side expiry: httpcore's pool can close a
            # connection it has just handed to a request, as a surplus idle one (more connections than
            # max_keepalive_connections, default 20) or an expired one (idle past keepalive_expiry, default 5 s),
            # and that request then fails with a ReadError (encode/httpcore#1110, open in 1.0.9). The server keeps an
            # idle connection 75 s (FILEFEED_KEEP_ALIVE_SECONDS), longer than this test.
            limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY,
                                  keepalive_expiry=None)
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, trust_env=False, limits=limits) as client:
                async def one_client() -> None:
                    nonlocal max_fds
                    for n in queue:
                        ident = f"u{n}"
                        body = {"feed_id": "42", "session_id": "1", "datamart_id": "1023",
                                "segment_id": f"s{n % SEGMENTS}", "ts": 1717494873000, "operation": "UPSERT",
                                "user_identifiers": [{"type": "USER_ACCOUNT", "user_account_id": ident,
                                                      "creation_ts": 1}]}
                        try:
                            r = await client.post("/v1/user_segment_update", content=orjson.dumps(body))
                        except httpx.TransportError as e:  # no answer at all: reported below with the server's log
                            failures.append(f"{ident}: {type(e).__name__} {e}")
                            continue
                        statuses[r.status_code] += 1
                        if r.status_code == 200:
                            acked.append(ident)
                        if n % 500 == 0:
                            max_fds = max(max_fds, *(_fd_count(w) for w in workers))

                await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))

        asyncio.run(main())
    finally:
        srv.stop()
    assert not failures, f"{len(failures)} requests got no answer, e.g. {failures[:3]}\n{srv.log_text()[-2000:]}"
    assert set(statuses) <= {200, 429}, f"answers other than 200/429: {dict(statuses)}\n{srv.log_text()[-2000:]}"
    assert statuses[200] > REQUESTS // 2
    assert max_fds < NOFILE // 4, f"a worker held {max_fds} descriptors"

    from pipeline.model import Partition
    from pipeline.staging import Staging, iter_rows

    reader = Staging(staging, min_free_bytes=0)
    try:
        reader.recover()
        staged = Counter(r[1] for s in range(SEGMENTS) for path in reader.sealed_segments(Partition("42", f"s{s}",
                         "UPSERT")) for r in iter_rows(path))
    finally:
        reader.close()
    missing = [a for a in acked if staged[a] != 1]
    assert not missing, f"{len(missing)} acknowledged rows not staged exactly once, e.g. {missing[:5]}"
    record_summary("descriptors", {"partitions": SEGMENTS, "nofile": NOFILE, "requests": REQUESTS,
                                   "answers": dict(statuses), "max_worker_fds": max_fds})
