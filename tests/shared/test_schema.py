"""The shared database's schema and connection handling: `filefeed db upgrade` (idempotent, concurrent replicas
apply it once, no superuser), a newer schema refused, an unreachable database told in one line with no password,
and a frozen one failing calls within their deadline instead of hanging."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from config.settings import ServiceSettings
from pipeline import shared
from pipeline.model import Partition
from pipeline.shared import schema
from pipeline.shared.leases import SharedLease
from tests.reliability.helpers import run_cli
from tests.shared.conftest import via

pytestmark = pytest.mark.reliability


def cli_env(tmp_path, url: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEFEED_")}
    feeds = tmp_path / "feeds.toml"
    feeds.write_text('[feeds."1"]\ndestination_uri = "file:///tmp/x"\nidentifier_types = "USER_ACCOUNT"\n')
    env.update({"FILEFEED_FEEDS": str(feeds), "FILEFEED_STAGING_DIR": str(tmp_path / "staging"),
                "FILEFEED_DATABASE_URL": url, "FILEFEED_DATABASE_TIMEOUT_SECONDS": "2"})
    return env


def test_upgrade_applies_once_and_needs_no_superuser(tmp_path, database):
    env = cli_env(tmp_path, database)
    first = run_cli(env, "db", "upgrade")
    assert first.returncode == 0 and f"version {schema.LATEST}" in first.stdout, first.stdout + first.stderr
    again = run_cli(env, "db", "upgrade")
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
        assert conn.execute("SELECT count(*) FROM filefeed_schema").fetchone() == (schema.LATEST,)


def test_concurrent_upgrades_apply_each_migration_once(tmp_path, database):
    s = ServiceSettings(feeds=tmp_path / "f.toml", database_url=database)
    dbs = [shared.Database(database, pool_size=1, timeout=10) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(schema.upgrade, dbs))
        assert sorted(len(r) for r in results) == [0, 0, 0, schema.LATEST], results
        assert schema.current_version(dbs[0]) == schema.LATEST
    finally:
        for db in dbs:
            db.close()
    assert s.database_url is not None


def test_newer_schema_is_refused_in_one_line(tmp_path, database):
    env = cli_env(tmp_path, database)
    assert run_cli(env, "db", "upgrade").returncode == 0
    with psycopg.connect(database) as conn:
        conn.execute("INSERT INTO filefeed_schema (version) VALUES (%s)", (schema.LATEST + 1,))
    p = run_cli(env, "flush")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "newer than this release" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_unreachable_database_is_one_line_without_the_password(tmp_path):
    env = cli_env(tmp_path, "postgresql://filefeed:hunter2-secret@127.0.0.1:1/filefeed")
    for args in (("db", "upgrade"), ("flush",), ("serve", "--port", "0")):
        p = run_cli(env, *args, timeout=60)
        text = p.stdout + p.stderr
        assert p.returncode == 3, (args, text)
        assert "127.0.0.1:1/filefeed" in text and "hunter2" not in text and "Traceback" not in text, text


def test_frozen_database_fails_calls_within_the_deadline(tmp_path, database, db_proxy):
    db = shared.Database(via(database, db_proxy), pool_size=2, timeout=1.0)
    try:
        schema.upgrade(db)
        state = shared.SharedState(db, "x", lease_seconds=5, orphan_seconds=10)
        lease = SharedLease.acquire(state, Partition("1", "2", "UPSERT"))
        assert lease is not None
        db_proxy.freeze()
        t0 = time.monotonic()
        with pytest.raises(shared.SharedStateError):
            lease.renew()
        assert time.monotonic() - t0 < 5.0  # the watchdog cut it (2 x the 1 s deadline), not a TCP timeout
        with pytest.raises(shared.SharedStateError):  # a new connection through the frozen path: connect_timeout
            SharedLease.acquire(state, Partition("1", "3", "UPSERT"))
        assert time.monotonic() - t0 < 15.0
        db_proxy.thaw()
        other = SharedLease.acquire(state, Partition("1", "4", "UPSERT"))  # the pool recovers by itself
        assert other is not None
    finally:
        db.close()


def test_a_lease_is_exclusive_until_it_lapses_and_tokens_grow(tmp_path, database):
    db = shared.Database(database, pool_size=2, timeout=5)
    try:
        schema.upgrade(db)
        a = shared.SharedState(db, "a", lease_seconds=2, orphan_seconds=4)
        b = shared.SharedState(db, "b", lease_seconds=2, orphan_seconds=4)
        p = Partition("1", "2", "UPSERT")
        la = SharedLease.acquire(a, p)
        assert la is not None
        assert SharedLease.acquire(b, p, wait_seconds=0.5) is None
        lb = SharedLease.acquire(b, p, wait_seconds=10)  # after a's lapses (a renews nothing)
        assert lb is not None and lb.token > la.token
        with pytest.raises(shared.SharedLeaseLost):
            la.renew()  # the zombie's fenced change is refused
        lb.release()
        lc = SharedLease.acquire(a, p)
        assert lc is not None and lc.token > lb.token
    finally:
        db.close()
