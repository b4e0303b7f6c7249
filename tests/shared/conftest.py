"""The shared-database suites: a fresh PostgreSQL database per test on the project's server (scripts/servers.sh),
owned by the plain `filefeed` role; replicas are `filefeed serve` processes with volumes of their own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.reliability.conftest import group  # noqa: F401 - the server group fixture
from tests.shared.proxy import Proxy


@pytest.fixture
def database(servers) -> Iterator[str]:
    """postgresql:// URL of an empty database for this test (dropped after it)."""
    if "DATABASE_URL" not in servers or "PG_ADMIN_URL" not in servers:
        pytest.fail("the servers' environment has no DATABASE_URL (scripts/servers.sh start runs PostgreSQL)")
    name = f"t_{uuid.uuid4().hex[:12]}"
    owner = psycopg.conninfo.conninfo_to_dict(servers["DATABASE_URL"])["user"]
    with psycopg.connect(servers["PG_ADMIN_URL"], autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    try:
        yield servers["DATABASE_URL"].rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(servers["PG_ADMIN_URL"], autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_proxy(servers) -> Iterator[Proxy]:
    port = int(psycopg.conninfo.conninfo_to_dict(servers["DATABASE_URL"])["port"])
    p = Proxy(port)
    try:
        yield p
    finally:
        p.close()


def via(url: str, proxy: Proxy) -> str:
    """The same database URL, through the proxy."""
    head, _, tail = url.partition("@")
    return f"{head}@{proxy.url_host_port}/{tail.split('/', 1)[1]}"
