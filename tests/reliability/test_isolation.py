"""A stuck partner delays only its own work (issue 13, finding 5).

Our own SeaweedFS is frozen with SIGSTOP (connections are accepted by the kernel, then nothing answers, the worst kind
of slow partner). Against one filefeed worker:
- a batch for segment A and a batch for segment B of the same S3 feed both answer RETRY (503, the protocol's batch
  shape, `x-mics-next-msg-delay`) within FILEFEED_BATCH_DEADLINE_SECONDS, while their rolls go on in the background;
- with 40 more such batches pending, a batch_update of a local feed, troubleshoot, /v1/status and /metrics answer at
  once;
- the server thawed, the platform's retries of A and B count every item, and every row is delivered exactly once.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.reliability.helpers import (
    ExtraServer,
    batch_body,
    descendants,
    extra_server,
    feed_props,
    post,
    read_local,
    read_s3,
    record_summary,
    stage_rows,
    wait_all_sealed,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

DEADLINE = 4.0
DELAY_MS = "1234"
ENV = {"FILEFEED_SEAL_AFTER_SECONDS": "0.2", "FILEFEED_BATCH_WAIT_SECONDS": "2", "FILEFEED_RETRY_DELAY_MS": DELAY_MS,
       "FILEFEED_BATCH_DEADLINE_SECONDS": str(DEADLINE), "FILEFEED_SINK_READ_TIMEOUT_SECONDS": "8",
       "FILEFEED_DESTINATION_CONCURRENCY": "4", "FILEFEED_DESTINATION_QUEUE": "16"}
PENDING = 40
# seconds: what "at once" means for the routes another partner's trouble must not touch, on a machine other work
# loads (3 x the same call's time measured just before, if that is more). On main these calls got no answer in 30 s;
# a local feed sharing the S3 feed's lane would get RETRY, not 200.
FAST = 5.0


@pytest.fixture
def s3_server(tmp_path_factory):
    with extra_server("s3", tmp_path_factory.mktemp("isolation-s3")) as srv:
        try:
            yield srv
        finally:
            _signal(srv, signal.SIGCONT)  # never leave it frozen, whatever failed


def _signal(srv: ExtraServer, sig: int) -> None:
    if srv.pid is None:
        return
    for pid in [srv.pid, *descendants(srv.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _timed_post(url: str, path: str, body: dict, timeout: float) -> tuple[float, httpx.Response | None]:
    with httpx.Client(base_url=url, timeout=timeout, trust_env=False) as c:  # built before the clock starts
        t0 = time.monotonic()
        try:
            r = post(c, path, body)
        except httpx.TimeoutException:
            return time.monotonic() - t0, None
        return time.monotonic() - t0, r


def _assert_retry(took: float, r: httpx.Response | None, what: str) -> None:
    assert r is not None, f"{what}: no answer after {took:.1f} s (deadline {DEADLINE} s)"
    assert r.status_code == 503, f"{what}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert body["status"] == "RETRY" and body["sent_items_in_success"] == 0, body
    assert r.headers.get("x-mics-next-msg-delay") == DELAY_MS, dict(r.headers)
    assert took < DEADLINE + 3, f"{what}: RETRY after {took:.1f} s, deadline {DEADLINE} s"


def _loose_items(template: dict, n: int, tag: str, segment: str) -> list[dict]:
    """Batch items without ref (staged by the batch itself): each batch then has its own partition and rows."""
    base = {k: v for k, v in template.items() if k != "ref"}
    return [{**base, "segment_id": segment, "identifier": f"{tag}-{i}-{secrets.token_hex(3)}"} for i in range(n)]


def test_stuck_partner_delays_only_its_own_work(s3_server, group, tmp_path: Path):
    prefix = f"iso-{secrets.token_hex(4)}"
    local_root = tmp_path / "delivery"
    local_root.mkdir()
    feeds = {"42": feed_props("s3", s3_server.info, prefix),
             "43": {"destination_uri": f"file://{local_root}", "identifier_types": "USER_ACCOUNT"}}
    ff = group.start(feeds=feeds, env=ENV, workers=1)
    a_ids = [f"a-{i}" for i in range(300)]
    b_ids = [f"b-{i}" for i in range(300)]
    l_ids = [f"l-{i}" for i in range(200)]
    a_items = stage_rows(ff, a_ids, per_request=150, segment="51")
    b_items = stage_rows(ff, b_ids, per_request=150, segment="52")
    l_items = stage_rows(ff, l_ids, per_request=100, segment="61", feed="43")
    warm_items = stage_rows(ff, [f"w-{i}" for i in range(200)], per_request=100, segment="62", feed="43")
    wait_all_sealed(ff.staging)
    # the same calls with every partner healthy: what "at once" means on this machine right now
    t_batch, r = _timed_post(ff.url, "/v1/batch_update", batch_body(warm_items, segment="62", feed="43"), 30)
    assert r is not None and r.status_code == 200, r and r.text[:300]
    t_trouble, r = _timed_post(ff.url, "/v1/troubleshoot", {"feed_id": "42", "action": "FETCH_DESTINATION_AUDIENCE"},
                               30)
    assert r is not None and r.status_code == 200
    fast_batch, fast_trouble = max(FAST, 3 * t_batch), max(FAST, 3 * t_trouble)

    figures: dict = {"deadline_seconds": DEADLINE, "pending_batches": PENDING}
    _signal(s3_server, signal.SIGSTOP)
    took, r = _timed_post(ff.url, "/v1/batch_update", batch_body(a_items, segment="51"), DEADLINE + 20)
    _assert_retry(took, r, "segment A, destination frozen")
    figures["segment_a_retry_seconds"] = round(took, 2)
    took, r = _timed_post(ff.url, "/v1/batch_update", batch_body(b_items, segment="52"), DEADLINE + 20)
    _assert_retry(took, r, "segment B of the same feed, A's roll stuck")
    figures["segment_b_retry_seconds"] = round(took, 2)

    # many more batches for the frozen partner, all in flight at once
    pending_answers: list[tuple[float, httpx.Response | None]] = []
    pool = ThreadPoolExecutor(max_workers=PENDING)
    started = threading.Barrier(PENDING + 1)

    def pending(k: int) -> tuple[float, httpx.Response | None]:
        started.wait(30)
        body = batch_body(_loose_items(a_items[0], 5, f"p{k}", str(100 + k)), segment=str(100 + k))
        return _timed_post(ff.url, "/v1/batch_update", body, DEADLINE + 30)

    futures = [pool.submit(pending, k) for k in range(PENDING)]
    started.wait(30)
    time.sleep(3.0)  # let them reach the server and wait there; what follows must not wait for them
    try:
        took, r = _timed_post(ff.url, "/v1/batch_update", batch_body(l_items, segment="61", feed="43"), 30)
        assert r is not None and r.status_code == 200, f"local feed batch: {took:.1f} s, {r and r.text[:300]}"
        assert r.json()["sent_items_in_success"] == len(l_items), r.text[:300]
        figures.update(local_batch_seconds=round(took, 2), local_batch_seconds_before=round(t_batch, 2))
        assert took < fast_batch, f"local feed's batch took {took:.1f} s behind a stuck S3 partner ({t_batch:.2f} s " \
            "before)"
        took, r = _timed_post(ff.url, "/v1/troubleshoot", {"feed_id": "42", "action": "FETCH_DESTINATION_AUDIENCE"},
                              30)
        assert r is not None and r.status_code == 200 and r.json()["status"] == "ok", f"troubleshoot: {took:.1f} s"
        assert took < fast_trouble, f"troubleshoot took {took:.1f} s ({t_trouble:.2f} s before)"
        figures.update(troubleshoot_seconds=round(took, 3), troubleshoot_seconds_before=round(t_trouble, 3))
        # the frozen partner's own connection check: bounded too, an error in the route's shape
        took, r = _timed_post(ff.url, "/v1/external_segment_connection", {"feed_id": "42"}, DEADLINE + 20)
        assert r is not None and r.json()["status"] == "error", f"connection check: {took:.1f} s"
        assert took < DEADLINE + 3 and "not reachable right now" in r.json()["message"], (took, r.text[:300])
        with httpx.Client(base_url=ff.url, timeout=30, trust_env=False) as c:
            for path in ("/v1/status", "/metrics"):
                t0 = time.monotonic()
                assert c.get(path).status_code == 200
                assert time.monotonic() - t0 < FAST, f"{path} took {time.monotonic() - t0:.1f} s"
    finally:
        answers = [f.result(timeout=DEADLINE + 60) for f in futures]
        pool.shutdown()
    pending_answers.extend(answers)
    for k, (took, r) in enumerate(pending_answers):
        _assert_retry(took, r, f"pending batch {k}")
    figures["pending_retry_seconds_max"] = round(max(t for t, _ in pending_answers), 2)

    _signal(s3_server, signal.SIGCONT)
    deadline = time.monotonic() + 120
    for items, segment in ((a_items, "51"), (b_items, "52")):
        while True:
            took, r = _timed_post(ff.url, "/v1/batch_update", batch_body(items, segment=segment), 60)
            if r is not None and r.status_code == 200:
                break
            assert r is not None and r.status_code == 503, f"segment {segment}: {r and r.text[:300]}"
            assert time.monotonic() < deadline, f"segment {segment} never delivered: {r.text[:300]}"
            time.sleep(0.5)
        assert r.json()["sent_items_in_success"] == len(items), r.text[:300]
    acked = {("51", "UPSERT", x) for x in a_ids} | {("52", "UPSERT", x) for x in b_ids}
    got = read_s3(s3_server.info, prefix)
    delivered = {k for k in got.rows if k[0] in ("51", "52")}
    assert delivered == acked and all(got.rows[k] == 1 for k in acked), got.check(acked)
    assert got.partial == []
    local = read_local(local_root).check({("61", "UPSERT", x) for x in l_ids})
    assert local["lost"] == 0 and local["duplicated"] == 0, local
    figures.update(s3_rows_checked=len(acked), s3_lost=0, s3_duplicated=0)
    record_summary("isolation", figures)
