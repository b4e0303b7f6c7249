"""Issue 16's acceptance run: 3 replicas with volumes of their own sharing PostgreSQL, updates spread round-robin
and every one retried once on another replica, one replica killed (-9) mid-load and restarted, one cut off from
the database (its proxy frozen) mid-load and restored, batches spread over the replicas (RETRY answers sent again
elsewhere), then a flush on every volume: every acknowledged row once, no partial file.

Bounded: FILEFEED_ACCEPTANCE_UPDATES updates (default 600, 2 identifiers each), at most 240 s.
"""

from __future__ import annotations

import itertools
import time

import httpx
import orjson
import pytest

from tests.reliability.helpers import batch_body, env_int, read_local, record_summary, update_body
from tests.shared.conftest import via
from tests.shared.helpers import flush, start_replica
from tests.shared.proxy import Proxy

pytestmark = pytest.mark.reliability


def post(url: str, path: str, body: dict, timeout: float = 30) -> httpx.Response | None:
    try:
        with httpx.Client(base_url=url, timeout=timeout, trust_env=False) as c:
            return c.post(path, content=orjson.dumps(body))
    except httpx.HTTPError:
        return None  # a replica down: the platform tries another one


def test_three_replicas_kill_cut_retry_every_row_once(group, tmp_path, database, servers):
    n_updates = env_int("FILEFEED_ACCEPTANCE_UPDATES", 600)
    deadline = time.monotonic() + 240
    dest = tmp_path / "out"
    pg_port = int(database.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    proxies = [Proxy(pg_port) for _ in range(3)]
    try:
        names = ["r0", "r1", "r2"]
        reps = [start_replica(group, tmp_path, dest, via(database, proxies[i]), names[i]) for i in range(3)]
        acked: set[tuple[str, str, str]] = set()
        items_pending: list[dict] = []
        events: dict[str, int] = {}
        answers = {"update_ok": 0, "update_failed": 0, "batch_ok": 0, "batch_retry": 0, "batch_error": 0}

        def send_batches(items: list[dict], rr) -> list[dict]:
            """Post `items` to the next replica; what is not OK comes back to be sent again later."""
            target = reps[next(rr)]
            r = post(target.url, "/v1/batch_update", batch_body(items), timeout=60)
            status = r.json().get("status") if r is not None else None
            if status == "OK":
                answers["batch_ok"] += 1
                assert r.json()["sent_items_in_success"] == len(items), r.json()
                return []
            answers["batch_retry" if status in ("RETRY", None) else "batch_error"] += 1
            return items

        rr = itertools.cycle(range(3))
        for i in range(n_updates):
            assert time.monotonic() < deadline, "acceptance run over its time budget"
            if i == n_updates // 3:
                group.kill9(reps[1])
                events["killed_r1_at"] = i
            if i == n_updates // 2:
                proxies[2].freeze()
                events["cut_r2_at"] = i
            if i == 2 * n_updates // 3:
                reps[1] = start_replica(group, tmp_path, dest, via(database, proxies[1]), "r1")
                events["restarted_r1_at"] = i
            if i == 5 * n_updates // 6:
                proxies[2].thaw()
                events["restored_r2_at"] = i
            ids = [f"u{i}-a", f"u{i}-b"]
            body = update_body(ids)
            kept: list[dict] | None = None
            for k in (i % 3, (i + 1) % 3):  # the first try, then the platform's retry on another replica
                r = post(reps[k].url, "/v1/user_segment_update", body)
                if r is not None and r.status_code == 200:
                    kept = [d["content"] for d in r.json()["data"]]  # the answer the platform keeps: the last
            if kept is None:
                answers["update_failed"] += 1
                continue
            answers["update_ok"] += 1
            acked.update(("7", "UPSERT", x) for x in ids)
            items_pending.extend(kept)
            if len(items_pending) >= 40:
                items_pending = send_batches(items_pending, rr)
        for _ in range(30):  # the platform's batches retried until they are OK
            if not items_pending or time.monotonic() > deadline:
                break
            items_pending = send_batches(items_pending, rr)
            if items_pending:
                time.sleep(0.5)
        assert not items_pending, f"{len(items_pending)} items never answered OK: {answers}"
        for srv in reps:  # rows whose batch never came, and rolls left by the kill: flushed on every volume
            for _ in range(10):
                p = flush(srv)
                if p.returncode == 0:
                    break
                time.sleep(1)
            assert p.returncode == 0, p.stdout + p.stderr
        delivered = read_local(dest)
        check = delivered.check(acked)
        summary = {"updates": n_updates, "acknowledged_rows": len(acked), "delivered_rows": sum(delivered.rows.values()),
                   "files": delivered.files, **check, **answers, **events}
        record_summary("shared_acceptance", summary)
        assert check == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}, (summary,
                                                                                          delivered.duplicates())
        assert answers["update_ok"] >= n_updates * 0.95 and answers["batch_ok"] > 0, summary
    finally:
        for p in proxies:
            p.close()
