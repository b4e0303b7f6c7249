"""Crash suite: kill -9 at random moments, restart on the same staging folder, then check exactly-once delivery.

(a) ingest: several concurrent clients send user_segment_update calls with unique identifiers to a 2-worker server
    (a batcher sends batch_update calls with the returned items meanwhile, so rolls run when the kill lands); the
    whole process group gets SIGKILL at a random moment; a new server on the same staging folder recovers; rows go
    out through `filefeed flush` (even trials) or batch_update with every acknowledged item + flush (odd trials).
    After each trial every acknowledged row so far must be in exactly one delivered file.
(b) rolls: every FILEFEED_CRASH_AT point of pipeline/rollover.py in `filefeed flush`, a few in the server's
    batch_update, and kill -9 at random moments of a flush of a big partition; then flush again and check.

FILEFEED_RELIABILITY_TRIALS (default 20) sets the number of (a) trials; (b) runs every crash point plus
FILEFEED_RELIABILITY_TRIALS // 4 random kills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from tests.reliability.helpers import (
    REPO,
    batch_body,
    cli_json,
    env_int,
    post,
    read_local,
    record_summary,
    rng,
    run_cli,
    stage_rows,
    status_json,
    update_body,
    wait_all_sealed,
)

pytestmark = pytest.mark.reliability

TRIALS = env_int("FILEFEED_RELIABILITY_TRIALS", 20)
PARTITIONS = [("7", "UPSERT"), ("7", "DELETE"), ("8", "UPSERT")]


def _feeds(dest: Path, **over) -> dict:
    return {"42": {"destination_uri": dest.as_uri(), "identifier_types": "USER_ACCOUNT", **over}}


def _assert_clean_staging(env: dict[str, str], staging: Path) -> dict:
    """Nothing left staged, pending or failed; no segment quarantined."""
    st = status_json(env)
    left = [(p["segment_id"], p["operation"], p["staged_rows"], p["pending_rolls"], len(p["failed_rolls"]))
            for p in st["partitions"] if p["staged_rows"] or p["pending_rolls"] or p["failed_rolls"]]
    assert not left, f"rows left after flush (segment, op, staged, pending, failed): {left}"
    quarantined = [p for p in (staging / "quarantine").rglob("*.jnl")] if (staging / "quarantine").exists() else []
    assert not quarantined, f"segments quarantined after kill -9 (torn tails must be cut, not quarantined): " \
                            f"{quarantined}"
    return st


class Load:
    """Concurrent clients with unique identifiers, and a batcher replaying the returned items."""

    def __init__(self, url: str, trial: int, clients: int = 4):
        self.url = url
        self.trial = trial
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: set[tuple[str, str, str]] = set()
        self.items: dict[tuple[str, str], list[dict]] = {p: [] for p in PARTITIONS}
        self.sent = 0
        self.answers: dict[int, int] = {}
        self.batches: dict[str, int] = {}
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]
        self.threads.append(threading.Thread(target=self._batcher, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _client(self, n: int) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as c:
            while not self.stop.is_set():
                seg, op = PARTITIONS[(n + i) % len(PARTITIONS)]
                ids = [f"t{self.trial}-c{n}-{i}-{k}" for k in range(1 + i % 3)]
                i += 1
                try:
                    with self.lock:
                        self.sent += len(ids)
                    r = post(c, "/v1/user_segment_update", update_body(ids, segment=seg, op=op))
                except httpx.HTTPError:
                    return  # the server is gone: whatever was in flight is not acknowledged
                with self.lock:
                    self.answers[r.status_code] = self.answers.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    contents = [d["content"] for d in r.json()["data"]]
                    with self.lock:
                        self.acked.update((seg, op, x) for x in ids)
                        self.items[(seg, op)].extend(contents)
                else:
                    raise AssertionError(f"user_segment_update answered {r.status_code}: {r.text[:300]}")

    def _batcher(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False) as c:
            while not self.stop.wait(0.05):
                for (seg, op), items in self.items.items():
                    with self.lock:
                        chunk = list(items[-200:])
                    if not chunk:
                        continue
                    try:
                        r = post(c, "/v1/batch_update", batch_body(chunk, segment=seg, op=op))
                    except httpx.HTTPError:
                        with self.lock:  # the kill landed while this batch (and maybe its roll) ran
                            self.batches["cut_by_kill"] = self.batches.get("cut_by_kill", 0) + 1
                        return
                    status = r.json().get("status", str(r.status_code)) if r.content else str(r.status_code)
                    with self.lock:
                        self.batches[status] = self.batches.get(status, 0) + 1

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
            assert not t.is_alive(), "a load thread did not stop"


def test_kill9_during_ingest(group, tmp_path):
    r = rng()
    staging, dest = tmp_path / "staging", tmp_path / "dest"
    dest.mkdir()
    feeds = _feeds(dest, max_rows_per_file=300)
    env = {"FILEFEED_SEAL_AFTER_SECONDS": "0.2", "FILEFEED_BATCH_WAIT_SECONDS": "2",
           "FILEFEED_MAX_SEGMENT_BYTES": "65536"}
    acked: set[tuple[str, str, str]] = set()
    sent = kills = 0
    answers: dict[int, int] = {}
    batches: dict[str, int] = {}
    bad_trials: dict[int, dict] = {}
    srv = group.start(feeds=feeds, env=env, workers=2, staging=staging)
    started = time.monotonic()
    for trial in range(TRIALS):
        load = Load(srv.url, trial)
        load.start()
        # a random moment once the load runs: 0.1-1.2 s (a few hundred to a few thousand acknowledged rows)
        wait_for(lambda ld=load: ld.acked or ld.stop.is_set(), 10, what="a first acknowledged row")
        time.sleep(r.uniform(0.1, 1.2))  # the fault's timing is the random variable here, not a wait for a state
        group.kill9(srv)
        kills += 1
        load.join()
        acked |= load.acked
        sent += load.sent
        for k, v in load.answers.items():
            answers[k] = answers.get(k, 0) + v
        for k, v in load.batches.items():
            batches[k] = batches.get(k, 0) + v
        srv = group.start(feeds=feeds, env=env, workers=2, staging=staging)  # recovers the dead writers' segments
        if trial % 2:
            with srv.client() as c:
                for (seg, op), items in load.items.items():
                    for i in range(0, len(items), 2000):
                        b = post(c, "/v1/batch_update", batch_body(items[i:i + 2000], segment=seg, op=op))
                        assert b.status_code == 200, f"batch_update after restart: {b.status_code} {b.text[:300]}"
                        assert b.json()["sent_items_in_success"] == len(items[i:i + 2000]), b.text
        flushed = run_cli(srv.env, "flush", "--json")
        assert flushed.returncode == 0, f"flush after kill -9 #{trial}: {flushed.stdout}\n{flushed.stderr}"
        got = read_local(dest).check(acked)
        if got["lost"] or got["duplicated"] or got["partial"]:  # checked at the end, so the figures are recorded
            bad_trials[trial] = got
    group.stop(srv)
    _assert_clean_staging(srv.env, staging)
    delivered = read_local(dest)
    got = delivered.check(acked)
    verify = run_cli(srv.env, "verify", "--json")
    assert verify.returncode == 0, f"filefeed verify: {verify.stdout[-2000:]}"
    assert answers.keys() <= {200}, answers
    record_summary("crash_ingest", {
        "trials": TRIALS, "faults_injected": kills, "rows_sent": sent, "rows_checked": len(acked),
        "rows_delivered": sum(delivered.rows.values()), "files": delivered.files, **got,
        "batch_answers": batches, "trials_with_problems": bad_trials, "duplicate_examples": delivered.duplicates(3),
        "seconds": round(time.monotonic() - started, 1)})
    assert got["lost"] == 0 and got["duplicated"] == 0 and got["partial"] == 0, (got, bad_trials)


ROLL_POINTS = ["lease", "plan", "move:1", "move:2", "moves", "encode_file:1", "encode_file:2", "encode",
               "publish:1", "publish:2", "publish:3", "manifest", "ledger"]
SERVER_POINTS = ["move:1", "publish:2", "ledger"]


def test_kill_during_rolls(group, tmp_path):
    """Every crash point of a roll (CLI flush and server batch_update), then random kill -9 during big flushes."""
    r = rng()
    staging, dest = tmp_path / "staging", tmp_path / "dest"
    dest.mkdir()
    feeds = _feeds(dest, max_rows_per_file=1500)
    env = {"FILEFEED_SEAL_AFTER_SECONDS": "0.2", "FILEFEED_BATCH_WAIT_SECONDS": "5"}
    srv = group.start(feeds=feeds, env=env, workers=1, staging=staging)
    acked: set[tuple[str, str, str]] = set()
    faults = 0
    started = time.monotonic()
    outcomes: dict[str, str] = {}

    def stage(tag: str, n: int, parts: int = 2) -> list[dict]:
        items: list[dict] = []
        per = n // parts
        for k in range(parts):  # separate seals: at least `parts` segments, so move:2 exists
            ids = [f"{tag}-{k}-{i}" for i in range(per)]
            items += stage_rows(srv, ids, per_request=1000)
            acked.update(("7", "UPSERT", x) for x in ids)
            wait_all_sealed(staging)
        return items

    def check(what: str) -> None:
        got = read_local(dest).check(acked)
        assert got["lost"] == 0 and got["duplicated"] == 0 and got["partial"] == 0, f"{what}: {got}"

    # 1. FILEFEED_CRASH_AT in `filefeed flush`
    for point in ROLL_POINTS:
        stage(f"p-{point.replace(':', '_')}", 4000)
        crashed = run_cli(srv.env, "flush", "--json", extra_env={"FILEFEED_CRASH_AT": point})
        assert crashed.returncode == 137, f"FILEFEED_CRASH_AT={point} did not crash the flush: " \
                                          f"{crashed.returncode}\n{crashed.stdout}\n{crashed.stderr[-2000:]}"
        faults += 1
        resumed = cli_json(srv.env, "flush")
        outcomes[point] = ",".join(sorted({p["status"] for p in resumed["partitions"].values()}))
        check(f"after a crash at {point} and a new flush")

    # 2. FILEFEED_CRASH_AT in the server's batch_update (the worker dies; the platform retries the batch)
    group.stop(srv)
    for point in SERVER_POINTS:
        srv = group.start(feeds=feeds, env={**env, "FILEFEED_CRASH_AT": point}, workers=1, staging=staging)
        items = stage(f"s-{point.replace(':', '_')}", 4000)
        with srv.client() as c:
            with pytest.raises(httpx.HTTPError):
                post(c, "/v1/batch_update", batch_body(items))
        wait_for(lambda s=srv: s.proc.poll() is not None, 30, what=f"the server to die at {point}")
        group.kill9(srv)  # nothing may survive the master
        faults += 1
        srv = group.start(feeds=feeds, env=env, workers=1, staging=staging)
        with srv.client() as c:
            b = post(c, "/v1/batch_update", batch_body(items))
        assert b.status_code == 200 and b.json() == {"status": "OK", "sent_items_in_success": len(items),
                                                     "sent_items_in_error": 0}, b.text
        check(f"after the server died at {point} and the batch came again")
        group.stop(srv)

    # 3. kill -9 at random moments of a flush of a big partition: the moment is drawn between the roll's start
    # (its lease appears) and its expected end (measured on an uncrashed flush of the same size)
    srv = group.start(feeds=_feeds(dest, max_rows_per_file=10000), env=env, workers=1, staging=staging)
    pdir = staging / "feeds" / "42" / "7" / "UPSERT"
    random_kills = max(2, TRIALS // 4)
    missed = 0

    def flush_in_background() -> tuple[subprocess.Popen, float]:
        proc = subprocess.Popen([sys.executable, "-m", "filefeed", "flush", "--json"], env=srv.env, cwd=str(REPO),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: (pdir / "lease").exists() or proc.poll() is not None, 60, interval=0.002,
                 what="the flush to take the partition lease")
        return proc, time.monotonic()

    stage("calibration", 100000, parts=4)
    proc, t0 = flush_in_background()
    assert proc.wait(120) == 0
    roll_seconds = max(time.monotonic() - t0, 0.05)
    check("after the calibration flush")
    for k in range(random_kills):
        stage(f"r{k}", 100000, parts=4)
        proc, t0 = flush_in_background()
        delay = r.uniform(0, roll_seconds)
        time.sleep(delay)  # the fault's random moment inside the roll, not a wait for a state
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            faults += 1
        else:
            missed += 1  # finished before the kill: not a fault
        proc.wait(30)
        state = sorted(x.name for x in (pdir / "rolling").iterdir()) if (pdir / "rolling").exists() else []
        outcomes[f"random-{k}"] = f"kill at +{delay:.3f}s of ~{roll_seconds:.3f}s rc={proc.returncode} " \
                                  f"rolling={len(state)}"
        cli_json(srv.env, "flush")
        check(f"after kill -9 #{k} of a big flush")
    group.stop(srv)
    _assert_clean_staging(srv.env, staging)
    delivered = read_local(dest)
    got = delivered.check(acked)
    verify = run_cli(srv.env, "verify", "--json")
    assert verify.returncode == 0, f"filefeed verify: {verify.stdout[-2000:]}"
    record_summary("crash_rolls", {
        "crash_points": len(ROLL_POINTS) + len(SERVER_POINTS), "random_kills": random_kills,
        "roll_seconds_100k_rows": round(roll_seconds, 3),
        "random_kills_missed": missed, "faults_injected": faults, "rows_checked": len(acked),
        "rows_delivered": sum(delivered.rows.values()), "files": delivered.files, **got,
        "seconds": round(time.monotonic() - started, 1), "outcomes": outcomes})
    assert got == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": got["temp_leftovers"]}
