"""Soak: a steady user_segment_update rate (FILEFEED_SOAK_RATE, default 500 req/s) for FILEFEED_SOAK_SECONDS
(default 60) against a 2-worker server, with a batch_update every 2 s carrying the items returned meanwhile.

Checks: no error answer at all, the rate held, RSS of the master and the workers flat (after a warm-up), the oldest
staged row never older than a bound, and at the end every acknowledged row delivered exactly once.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from pipeline.rollover import oldest_staged_row_ms
from tests.reliability.helpers import (
    batch_body,
    env_float,
    env_int,
    group_pids,
    post,
    read_local,
    record_summary,
    rss_kb,
    update_body,
)

pytestmark = pytest.mark.reliability

SECONDS = env_float("FILEFEED_SOAK_SECONDS", 60)
RATE = env_int("FILEFEED_SOAK_RATE", 500)
THREADS = 8
BATCH_EVERY = 2.0
PARTITIONS = [("7", "UPSERT"), ("7", "DELETE")]
MAX_STAGED_AGE = 15.0  # seconds: batch interval + seal + roll, with a wide margin for a loaded 2-core machine


@pytest.mark.timeout(int(SECONDS) + 300)  # the soak itself, plus start, warm-up and the final delivery check
def test_soak(group, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    ff = group.start(feeds={"42": {"destination_uri": dest.as_uri(), "identifier_types": "USER_ACCOUNT"}},
                     workers=2, env={"FILEFEED_SEAL_AFTER_SECONDS": "0.5", "FILEFEED_BATCH_WAIT_SECONDS": "5"})
    stop = threading.Event()
    lock = threading.Lock()
    acked: set[tuple[str, str, str]] = set()
    pending: dict[tuple[str, str], list[dict]] = {p: [] for p in PARTITIONS}
    answers: dict[str, int] = {}
    batch_answers: dict[str, int] = {}
    latencies: list[float] = []
    errors: list[str] = []

    def count(d: dict, k: str) -> None:
        with lock:
            d[k] = d.get(k, 0) + 1

    def client(n: int) -> None:
        period = THREADS / RATE
        next_t = time.monotonic()
        i = 0
        with httpx.Client(base_url=ff.url, timeout=30, trust_env=False) as c:
            while not stop.is_set():
                seg, op = PARTITIONS[i % len(PARTITIONS)]
                ident = f"s{n}-{i}"
                i += 1
                t0 = time.monotonic()
                try:
                    r = post(c, "/v1/user_segment_update", update_body([ident], segment=seg, op=op))
                except httpx.HTTPError as e:
                    errors.append(f"update: {type(e).__name__}: {e}")
                    count(answers, "exception")
                    continue
                count(answers, str(r.status_code))
                if r.status_code != 200:
                    errors.append(f"update {r.status_code}: {r.text[:200]}")
                else:
                    with lock:
                        latencies.append(time.monotonic() - t0)
                        acked.add((seg, op, ident))
                        pending[(seg, op)].extend(d["content"] for d in r.json()["data"])
                next_t += period
                delay = next_t - time.monotonic()
                if delay > 0:
                    stop.wait(delay)  # the pacing of a steady rate
                elif delay < -1:
                    next_t = time.monotonic()  # fell behind by a second: do not burst to catch up

    def send_batches(c: httpx.Client) -> None:
        for (seg, op) in PARTITIONS:
            with lock:
                items, pending[(seg, op)] = pending[(seg, op)], []
            for k in range(0, len(items), 5000):
                chunk = items[k:k + 5000]
                r = post(c, "/v1/batch_update", batch_body(chunk, segment=seg, op=op))
                body = r.json()
                count(batch_answers, body.get("status", str(r.status_code)))
                if r.status_code != 200 or body.get("sent_items_in_success") != len(chunk):
                    errors.append(f"batch {r.status_code}: {r.text[:200]}")

    def batcher() -> None:
        with httpx.Client(base_url=ff.url, timeout=60, trust_env=False) as c:
            while not stop.wait(BATCH_EVERY):
                send_batches(c)

    samples: list[dict] = []

    def sample(t: float) -> None:
        pids = group_pids(ff.proc.pid)
        ages = []
        for pdir in (ff.staging / "feeds").glob("*/*/*"):
            oldest = oldest_staged_row_ms(pdir)
            if oldest is not None:
                ages.append(time.time() - oldest / 1000)
        samples.append({"t": round(t, 1), "rss_kb": {p: rss_kb(p) for p in pids},
                        "oldest_staged_age_s": round(max(ages), 2) if ages else 0.0})

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(THREADS)]
    threads.append(threading.Thread(target=batcher, daemon=True))
    started = time.monotonic()
    sample(0)
    for t in threads:
        t.start()
    while (elapsed := time.monotonic() - started) < SECONDS:
        stop.wait(min(5.0, SECONDS - elapsed))  # the sampling period
        sample(time.monotonic() - started)
    stop.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a soak thread did not stop"
    duration = time.monotonic() - started
    with httpx.Client(base_url=ff.url, timeout=60, trust_env=False) as c:
        send_batches(c)  # the rest
    group.stop(ff)
    delivered = read_local(dest)
    got = delivered.check(acked)

    warm = next((s for s in samples if s["t"] >= min(10.0, SECONDS / 4)), samples[0])
    end = samples[-1]
    rss_start = sum(warm["rss_kb"].values())
    rss_end = sum(end["rss_kb"].values())
    lat = sorted(latencies)
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else None
    max_age = max(s["oldest_staged_age_s"] for s in samples)
    requests = sum(v for v in answers.values())
    figures = {"seconds": round(duration, 1), "target_rate": RATE, "achieved_rate": round(requests / duration, 1),
               "requests": requests, "answers": answers, "batch_answers": batch_answers, "errors": len(errors),
               "p99_ms": round(p99, 1) if p99 else None, "rss_kb_after_warmup": rss_start, "rss_kb_end": rss_end,
               "rss_kb_first_sample": sum(samples[0]["rss_kb"].values()), "processes": len(end["rss_kb"]),
               "max_oldest_staged_age_s": max_age, "rows_checked": len(acked), **got,
               "rss_series_kb": [(s["t"], sum(s["rss_kb"].values())) for s in samples]}
    record_summary("soak", figures)
    assert not errors, f"{len(errors)} errors, first: {errors[:5]}"
    assert requests / duration >= 0.9 * RATE, f"the rate was not held: {requests / duration:.0f} < 90% of {RATE}"
    assert rss_end <= rss_start * 1.3 + 30_000, f"RSS grew from {rss_start} kB to {rss_end} kB"
    assert max_age <= MAX_STAGED_AGE, f"a staged row waited {max_age}s (bound {MAX_STAGED_AGE}s)"
    assert got["lost"] == 0 and got["duplicated"] == 0 and got["partial"] == 0, (got, delivered.duplicates())
