"""A partition's roll lease in the shared database: one holder at a time across replicas, with a fencing token.

Time is the database's (`now()`), so replicas' clocks do not matter. A holder knows its lease is valid until
`valid_until`, counted on its own monotonic clock from the moment it *sent* the last renewal: never later than the
database thinks. Every state change the holder makes runs in `fenced()`, a transaction that locks the lease row
and checks token and expiry first: a replica that lost its lease changes nothing, and one taking a lapsed lease
waits for that transaction to end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from pipeline.model import Partition
from pipeline.shared.db import SharedLeaseLost
from pipeline.shared.state import SharedState


class SharedLease:
    def __init__(self, state: SharedState, partition: Partition, partition_id: int, holder: str, token: int,
                 sent_at: float):
        self.state = state
        self.partition = partition
        self.partition_id = partition_id
        self.holder = holder
        self.token = token
        self.valid_until = sent_at + state.lease_seconds
        self.renewed_at = sent_at
        self.roll_row = 0  # the shared ledger's id of the roll running under this lease: its heartbeat is renewed too

    @classmethod
    def acquire(cls, state: SharedState, partition: Partition, *, wait_seconds: float = 0.0) -> SharedLease | None:
        """The partition's lease, or None while another live holder keeps it beyond `wait_seconds`."""
        pid = state.partition_id(partition)
        holder = state.holder()
        deadline = time.monotonic() + wait_seconds
        delay = 0.005
        while True:
            sent = time.monotonic()
            with state.db.transaction("taking a roll lease") as conn:
                row = conn.execute(
                    "INSERT INTO leases (partition_id, holder, token, expires_at) "
                    "VALUES (%s, %s, 1, now() + make_interval(secs => %s)) "
                    "ON CONFLICT (partition_id) DO UPDATE SET holder = EXCLUDED.holder, token = leases.token + 1, "
                    "expires_at = EXCLUDED.expires_at WHERE leases.expires_at < now() RETURNING token",
                    (pid, holder, state.lease_seconds),
                ).fetchone()
            if row is not None:
                return cls(state, partition, pid, holder, int(row[0]), sent)
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)

    def remaining(self) -> float:
        return self.valid_until - time.monotonic()

    @contextmanager
    def fenced(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A transaction that runs only while this lease is ours (and renews it)."""
        sent = time.monotonic()
        with self.state.db.transaction(what) as conn:
            row = conn.execute(
                "UPDATE leases SET expires_at = now() + make_interval(secs => %s) "
                "WHERE partition_id = %s AND token = %s AND holder = %s AND expires_at > now() RETURNING 1",
                (self.state.lease_seconds, self.partition_id, self.token, self.holder),
            ).fetchone()
            if row is None:
                self.valid_until = 0.0
                raise SharedLeaseLost(f"the roll lease lapsed or was taken by another replica "
                                      f"while {what}; the roll stays and resumes")
            if self.roll_row:
                conn.execute("UPDATE rolls SET heartbeat_at = now() WHERE id = %s", (self.roll_row,))
            yield conn
        self.valid_until = sent + self.state.lease_seconds
        self.renewed_at = sent

    def renew(self, what: str = "renewing the roll lease") -> None:
        with self.fenced(what):
            pass

    def renew_before_publishing(self) -> None:
        """Before a file is published: renewed unless that was done within the last second (the transaction that
        recorded the roll's files renews it too), so a publish always starts within a lease known to be valid."""
        if time.monotonic() - self.renewed_at >= min(1.0, self.state.lease_seconds / 4):
            self.renew("renewing the roll lease before publishing")

    def renew_if_due(self) -> None:
        """At most every third of the lease period: cheap enough for every heartbeat of a long encode."""
        if time.monotonic() - self.renewed_at >= self.state.lease_seconds / 3:
            self.renew()

    def release(self) -> None:
        """End the tenure at once (the token stays, so the next holder's is higher). Best effort: a lease that
        cannot be released lapses by itself."""
        try:
            with self.state.db.transaction("releasing a roll lease") as conn:
                conn.execute("UPDATE leases SET expires_at = now() - interval '1 millisecond' "
                             "WHERE partition_id = %s AND token = %s AND holder = %s",
                             (self.partition_id, self.token, self.holder))
        except OSError:
            pass
        self.valid_until = 0.0
