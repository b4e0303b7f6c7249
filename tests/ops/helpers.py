"""Helpers of the operator tests: the CLI as a subprocess, platform calls over HTTP, delivered files, /metrics."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from filefeed.simulate import user_identifiers
from tests.conftest import ROOT, FilefeedServer
from tests.servers import sink_props

FEED = "42"
SEGMENT = "451256"


def cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`python -m filefeed ARGS` with the server's environment, as an operator runs it beside the server."""
    return subprocess.run([sys.executable, "-m", "filefeed", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def cli_json(env: dict[str, str], *args: str) -> Any:
    p = cli(env, *args, "--json")
    assert p.returncode == 0, f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def update_body(i: int, *, op: str = "UPSERT", feed: str = FEED, segment: str = SEGMENT) -> dict[str, Any]:
    return {"feed_id": feed, "datamart_id": "1023", "segment_id": segment, "session_id": "1717494873",
            "ts": 1717494873000 + i, "operation": op, "user_identifiers": user_identifiers(i, random.Random(i)),
            "user_profiles": []}


def send_users(srv: FilefeedServer, users: range, *, op: str = "UPSERT", feed: str = FEED,
               segment: str = SEGMENT) -> list[dict[str, Any]]:
    """user_segment_update per user on a fresh connection each (so every worker gets some); the returned items."""
    items: list[dict[str, Any]] = []
    for i in users:
        with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
            r = c.post("/v1/user_segment_update", content=orjson.dumps(update_body(i, op=op, feed=feed,
                                                                                    segment=segment)))
        assert r.status_code == 200, r.text
        items.extend(x["content"] for x in r.json()["data"])
    return items


def send_batch(srv: FilefeedServer, items: list[dict[str, Any]], *, op: str = "UPSERT", feed: str = FEED,
               segment: str = SEGMENT) -> dict[str, Any]:
    body = {"batch_content": [orjson.dumps(x).decode() for x in items], "ts": int(time.time() * 1000),
            "context": {"endpoint": "/v1/user_segment_update", "feed_id": feed, "feed_session_id": "1717494873",
                        "segment_id": segment, "datamart_id": "1023", "grouping_key": op}}
    return srv.post("/v1/batch_update", body).json()


def troubleshoot(srv: FilefeedServer, feed: str = FEED, segment: str | None = SEGMENT) -> dict[str, Any]:
    body = {"feed_id": feed, "datamart_id": "1023", "action": "FETCH_DESTINATION_AUDIENCE"}
    if segment:
        body["segment_id"] = segment
    r = srv.post("/v1/troubleshoot", body)
    assert r.status_code == 200, r.text
    return r.json()


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".manifest.json")
                  and not p.name.startswith("."))


def read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.name.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return pacsv.read_csv(path).to_pylist()


def delivered_rows(folder: Path) -> list[dict[str, Any]]:
    return [r for p in data_files(folder) for r in read_rows(p)]


def raw_props(scheme: str, servers: dict[str, str], prefix: str, **overrides: Any) -> dict[str, Any]:
    """The raw property table (feeds.toml) behind tests.servers.sink_props, secrets in clear."""
    props = sink_props(scheme, servers, prefix)
    raw = {k: (v.get_secret_value() if isinstance(v, SecretStr) else v)
           for k, v in props.model_dump(exclude_unset=True).items() if v is not None}
    raw.update(overrides)
    return raw


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """One /metrics scrape on a fresh connection, as {(sample name, sorted labels): value}."""
    with httpx.Client(timeout=30, trust_env=False) as c:
        r = c.get(f"{url}/metrics")
    assert r.status_code == 200, r.text
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == want for k, want in labels.items()))


def log_lines(srv: FilefeedServer) -> list[dict[str, Any]]:
    out = []
    for line in srv.log_text().splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))  # every line is one JSON object
    return out
