"""JSON log lines, and PUT /v1/log_level on one worker changing the level of every worker."""

from __future__ import annotations

import httpx

from tests.conftest import wait_for
from tests.ops.helpers import FEED, log_lines, send_batch, send_users


def _pids(srv, pred) -> set[int]:
    return {line["pid"] for line in log_lines(srv) if pred(line)}


def test_log_level_changes_in_every_worker(tmp_path, filefeed_factory):
    out = tmp_path / "out"
    srv = filefeed_factory(workers=2, feeds={FEED: {"destination_uri": out.as_uri()}})
    def ready_workers() -> set[int] | None:
        pids = _pids(srv, lambda x: x["logger"] == "filefeed" and " ready " in x["message"])
        return pids if len(pids) == 2 else None

    workers = wait_for(ready_workers, 20, what="two workers ready")

    # a roll's line carries feed, segment and outcome
    items = send_users(srv, range(3))
    assert send_batch(srv, items)["status"] == "OK"
    rolled = [x for x in log_lines(srv) if x.get("outcome") == "published"]
    assert rolled and rolled[0]["feed_id"] == FEED and rolled[0]["segment_id"] == "451256"
    assert rolled[0]["level"] == "info" and rolled[0]["pid"] in workers

    def scrape_many(n: int = 8) -> None:  # fresh connections: the kernel spreads them over both workers
        for _ in range(n):
            with httpx.Client(base_url=srv.url, trust_env=False, timeout=10) as c:
                assert c.get("/metrics").status_code == 200

    def debug_scrapes() -> set[int]:
        return _pids(srv, lambda x: x["level"] == "debug" and x.get("route") == "metrics")

    scrape_many()
    assert debug_scrapes() == set()  # INFO: no debug line

    with srv.client() as c:
        assert c.put("/v1/log_level", json={"level": "DEBUG"}).status_code == 200
        assert c.put("/v1/log_level", json={"level": "LOUD"}).status_code == 400
    # every worker records the switch, the one that answered and the other one
    wait_for(lambda: _pids(srv, lambda x: x.get("route") == "log_level" and x.get("outcome") == "debug") == workers,
             10, what="both workers switching to debug")
    for _ in range(4):
        with httpx.Client(base_url=srv.url, trust_env=False, timeout=10) as c:
            assert c.get("/v1/log_level").json() == {"level": "DEBUG"}
    wait_for(lambda: scrape_many(2) or debug_scrapes() == workers, 20, what="debug lines from both workers")

    with srv.client() as c:
        assert c.put("/v1/log_level", json={"level": "error"}).status_code == 200
    wait_for(lambda: _pids(srv, lambda x: x.get("route") == "log_level" and x.get("outcome") == "error") == workers,
             10, what="both workers switching to error")
    before = len([x for x in log_lines(srv) if x["level"] in ("debug", "info")])
    scrape_many()
    more = send_users(srv, range(10, 12))
    assert send_batch(srv, more)["status"] == "OK"
    after = [x for x in log_lines(srv) if x["level"] in ("debug", "info")]
    assert len(after) == before, after[before:]


def test_restart_starts_at_the_configured_level(tmp_path, filefeed_factory):
    feeds = {FEED: {"destination_uri": (tmp_path / "out").as_uri()}}
    srv = filefeed_factory(feeds=feeds)
    with srv.client() as c:
        assert c.put("/v1/log_level", json={"level": "debug"}).status_code == 200
    srv.stop()
    again = filefeed_factory(feeds=feeds, staging=srv.staging)
    with again.client() as c:
        assert c.get("/v1/log_level").json() == {"level": "INFO"}
