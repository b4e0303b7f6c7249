"""The shared database's connections: one psycopg pool per worker process, every call under a deadline.

Deadlines, because "every external call has a deadline": the pool wait and libpq's connect_timeout bound getting a
connection; statement_timeout and lock_timeout bound the server's side; and a watchdog shuts the socket down when a
transaction outlives its deadline, so a database that stops answering (a frozen network path: the kernel still
acknowledges our bytes, so no TCP timeout fires) fails the call instead of hanging the roll.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


class SharedStateError(OSError):
    """The shared database could not be reached or refused a change: transient (the roll stays and resumes, a batch
    answers RETRY)."""


class SharedLeaseLost(SharedStateError):
    """Our partition lease lapsed or was taken by another replica: stop before changing or publishing anything."""


def redact_url(url: str) -> str:
    """The URL as it may be shown: no password."""
    return _PASSWORD.sub(r"\1***@", url)


def _where(url: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class Database:
    """A lazily opened pool (re-opened in a forked worker: a pool never crosses fork)."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 5.0):
        self._url = url
        self.where = _where(url)
        self.pool_size = pool_size
        self.timeout = timeout
        self._pool: ConnectionPool | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _get_pool(self) -> ConnectionPool:
        pid = os.getpid()
        if self._pool is not None and self._pid == pid:
            return self._pool
        with self._lock:
            if self._pool is None or self._pid != pid:
                ms = int(self.timeout * 1000)
                self._pool = ConnectionPool(
                    self._url,
                    min_size=0,
                    max_size=self.pool_size,
                    timeout=self.timeout,
                    max_idle=60.0,
                    reconnect_timeout=self.timeout,
                    open=True,
                    kwargs={
                        "connect_timeout": max(2, int(self.timeout + 0.999)),
                        "options": f"-c statement_timeout={ms} -c lock_timeout={ms} "
                                   f"-c idle_in_transaction_session_timeout={ms * 4}",
                        "application_name": "filefeed",
                        "keepalives": 1,
                        "keepalives_idle": 10,
                        "keepalives_interval": 5,
                        "keepalives_count": 3,
                    },
                )
                self._pid = pid
        return self._pool

    @contextmanager
    def transaction(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """One transaction (committed when the block ends without an error), within the deadline."""
        try:
            with self._get_pool().connection(timeout=self.timeout) as conn:
                watchdog = threading.Timer(self.timeout * 2, _cut, (conn,))
                watchdog.daemon = True
                watchdog.start()
                try:
                    yield conn
                finally:
                    watchdog.cancel()
        except SharedStateError:
            raise
        except PoolTimeout:
            raise SharedStateError(f"shared database {self.where}: no connection within {self.timeout:g} s while "
                                   f"{what} (is it reachable? FILEFEED_DATABASE_URL)") from None
        except psycopg.Error as e:
            first = redact_url(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise SharedStateError(f"shared database {self.where}: {type(e).__name__} while {what}: {first}") from None

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close(timeout=self.timeout)
            self._pool = None


def _cut(conn: psycopg.Connection[Any]) -> None:
    """Shut the connection's socket down: the blocked call returns an error and the pool discards the connection."""
    try:
        fd = conn.pgconn.socket
        s = socket.socket(fileno=os.dup(fd))
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.close()
    except (OSError, psycopg.Error):
        pass
