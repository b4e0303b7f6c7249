"""Replicas for the shared-database suites: `filefeed serve` processes, each with its own staging volume and
replica id, all delivering to one destination folder."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson

from tests.conftest import FilefeedServer
from tests.reliability.helpers import batch_body, run_cli, update_body

FEED = "42"


def feed_props(dest: Path, **extra) -> dict:
    return {"destination_uri": dest.as_uri(), "identifier_types": "USER_ACCOUNT", **extra}


def shared_env(url: str, replica: str, **extra: str) -> dict[str, str]:
    env = {"FILEFEED_DATABASE_URL": url, "FILEFEED_REPLICA_ID": replica, "FILEFEED_DATABASE_TIMEOUT_SECONDS": "2",
           "FILEFEED_DATABASE_LEASE_SECONDS": "3", "FILEFEED_DATABASE_ORPHAN_SECONDS": "8",
           "FILEFEED_BATCH_WAIT_SECONDS": "5", "FILEFEED_DEDUP_SECONDS": "0"}
    env.update(extra)
    return env


def start_replica(group, tmp: Path, dest: Path, url: str | None, replica: str, workers: int = 1,
                  props: dict | None = None, **extra: str) -> FilefeedServer:
    env = shared_env(url, replica, **extra) if url else {"FILEFEED_REPLICA_ID": replica, **extra}
    return group.start(feeds={FEED: feed_props(dest, **(props or {}))}, env=env, staging=tmp / f"staging-{replica}",
                       workers=workers)


def update(srv: FilefeedServer, ids: list[str], timeout: float = 30) -> list[dict]:
    """One user_segment_update; the BATCH_DELIVERY contents it answered."""
    with httpx.Client(base_url=srv.url, timeout=timeout, trust_env=False) as c:
        r = c.post("/v1/user_segment_update", content=orjson.dumps(update_body(ids)))
    assert r.status_code == 200, r.text[:300]
    return [d["content"] for d in r.json()["data"]]


def batch(srv: FilefeedServer, items: list, timeout: float = 60) -> dict:
    with httpx.Client(base_url=srv.url, timeout=timeout, trust_env=False) as c:
        r = c.post("/v1/batch_update", content=orjson.dumps(batch_body(items)))
    body = r.json()
    body["http"] = r.status_code
    return body


def flush(srv: FilefeedServer, *extra: str, timeout: float = 120, env: dict[str, str] | None = None):
    p = run_cli({**srv.env, **(env or {})}, "flush", *extra, timeout=timeout)
    return p


def two_replicas(group, tmp: Path, url_a: str | None, url_b: str | None, **kw) -> tuple[Path, FilefeedServer,
                                                                                       FilefeedServer]:
    """Replicas "a" and "b" delivering to one folder: (that folder, a, b)."""
    dest = tmp / "out"
    return (dest, start_replica(group, tmp, dest, url_a, "a", **kw), start_replica(group, tmp, dest, url_b, "b", **kw))
