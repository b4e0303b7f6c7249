"""Answers that never fail after a write, and stay small (issue 13, findings 4 and 7), against `filefeed serve`."""

from __future__ import annotations

import threading
import time

import orjson
import pytest

from tests.reliability.helpers import batch_body, record_summary, update_body

pytestmark = pytest.mark.reliability


def _staged_rows(staging) -> int:
    from pipeline.staging import count_rows

    return sum(count_rows(p) for p in staging.glob("feeds/*/*/*/*/*.jnl"))


def test_an_update_with_ts_1e20_is_rejected_per_identifier_before_anything_is_staged(group, local_feed):
    """Before: staged and fsynced, then 500 internal error (TypeError) when the answer was serialised."""
    srv = group.start(feeds={"42": local_feed})
    body = {**update_body(["u1", "u2"]), "ts": 1e20}
    with srv.client() as c:
        r = c.post("/v1/user_segment_update", content=orjson.dumps(body))
    assert r.status_code == 400, r.text
    answer = r.json()
    assert answer["status"] == "no_eligible_identifier"
    assert [s["sync_result"] for s in answer["stats"]] == ["REJECTED", "REJECTED"]
    assert _staged_rows(srv.staging) == 0


def test_a_batch_item_with_ts_2_63_is_in_error_and_the_others_are_sent(group, local_feed):
    srv = group.start(feeds={"42": local_feed})
    good = {"segment_id": "7", "operation": "UPSERT", "identifier_type": "USER_ACCOUNT", "ts": 1717494873000}
    items = [{**good, "identifier": f"g{i}"} for i in range(50)] + [{**good, "identifier": "bad", "ts": 2**63}]
    with srv.client() as c:
        r = c.post("/v1/batch_update", content=orjson.dumps(batch_body(items)))
    assert r.status_code == 200, r.text
    assert r.json()["sent_items_in_success"] == 50 and r.json()["sent_items_in_error"] == 1


def test_a_huge_update_gets_a_small_error_and_does_not_stall_other_requests(group, local_feed):
    """Before: 100,000 identifiers (3 MB) gave a 47.8 MB answer after 2 s and stalled other requests for 1.7 s."""
    srv = group.start(feeds={"42": local_feed})
    huge = orjson.dumps(update_body([f"user-{i:07d}" for i in range(100_000)]))
    small = orjson.dumps(update_body(["someone"]))
    latencies: list[float] = []
    stop = threading.Event()

    def small_requests() -> None:
        with srv.client() as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.post("/v1/user_segment_update", content=small)
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200

    with srv.client() as c:
        c.post("/v1/user_segment_update", content=small)  # warm: the feed context is built
        t = threading.Thread(target=small_requests, daemon=True)
        t.start()
        time.sleep(0.3)
        t0 = time.perf_counter()
        r = c.post("/v1/user_segment_update", content=huge, timeout=60)
        huge_seconds = time.perf_counter() - t0
        time.sleep(0.3)
        stop.set()
        t.join(30)
    record_summary("huge_update", {"request_bytes": len(huge), "answer_bytes": len(r.content),
                                   "answer_seconds": round(huge_seconds, 3),
                                   "max_other_latency_s": round(max(latencies), 3), "other_requests": len(latencies)})
    assert r.status_code == 500 and r.json()["status"] == "error", r.text[:300]
    assert "FILEFEED_MAX_IDENTIFIERS_PER_UPDATE" in r.json()["message"]
    assert len(r.content) < 1000
    # generous against a loaded 2-core machine; the stall before the fix was 1.7 s
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
