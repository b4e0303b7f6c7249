"""Replicas with volumes of their own, sharing PostgreSQL (FILEFEED_DATABASE_URL): every acknowledged row once.

Each test runs real `filefeed serve` processes (own staging folder, own FILEFEED_REPLICA_ID) against a fresh
database on the project's PostgreSQL server, delivers to one local destination, and reads it back. The control test
shows the defect the shared database fixes: without it, a batch published by another replica duplicates rows.
"""

from __future__ import annotations

import pytest

from tests.reliability.helpers import read_local
from tests.shared.helpers import batch, flush, two_replicas, update

pytestmark = pytest.mark.reliability

ROW = ("7", "UPSERT")


def acked(ids: list[str]) -> set[tuple[str, str, str]]:
    return {(*ROW, i) for i in ids}


def test_without_database_a_batch_on_another_replica_duplicates(group, tmp_path):
    """The defect (issue 16's measurement): rows staged on A, their batch published by B, then A's own flush."""
    dest, a, b = two_replicas(group, tmp_path, None, None)
    ids = [f"u{i}" for i in range(20)]
    items = update(a, ids[:10]) + update(a, ids[10:])
    assert batch(b, items)["status"] == "OK"
    assert flush(a).returncode == 0
    check = read_local(dest).check(acked(ids))
    assert check["lost"] == 0 and check["duplicated"] == 20, check


def test_batch_on_another_replica_is_delivered_once(group, tmp_path, database):
    dest, a, b = two_replicas(group, tmp_path, database, database)
    ids = [f"u{i}" for i in range(20)]
    items = update(a, ids[:10]) + update(a, ids[10:])
    answer = batch(b, items)
    assert answer["status"] == "OK" and answer["sent_items_in_success"] == 20, answer
    for srv in (a, b):
        p = flush(srv)
        assert p.returncode == 0, p.stdout + p.stderr
    check = read_local(dest).check(acked(ids))
    assert check == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}, check
    # the batch answered again on A (its own segments, delivered by B's roll): counted, not published again
    again = batch(a, items)
    assert again["status"] == "OK" and again["sent_items_in_success"] == 20, again
    assert read_local(dest).check(acked(ids))["duplicated"] == 0


def test_update_retried_on_another_replica_is_delivered_once(group, tmp_path, database):
    dest, a, b = two_replicas(group, tmp_path, database, database)
    ids = [f"r{i}" for i in range(30)]
    items_a = update(a, ids)
    items_b = update(b, ids)  # the platform's retry, on another replica
    assert len(items_a) == len(items_b) == 30
    for srv in (b, a):
        p = flush(srv)
        assert p.returncode == 0, p.stdout + p.stderr
    check = read_local(dest).check(acked(ids))
    assert check == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}, check
    # both batches, on either replica: all counted, nothing more published
    for srv, items in ((a, items_b), (b, items_a)):
        answer = batch(srv, items)
        assert answer["status"] == "OK" and answer["sent_items_in_success"] == 30, answer
    assert read_local(dest).check(acked(ids))["duplicated"] == 0


def test_large_batches_meet_on_two_replicas_once(group, tmp_path, database):
    """12,000 rows staged on A, their batch published by B, then A's flush: every row of A's roll conflicts with a
    claim of B's (the lookup of 12,000 holders must stay well inside the 2 s statement deadline)."""
    from tests.reliability.helpers import stage_rows

    dest, a, b = two_replicas(group, tmp_path, database, database)
    ids = [f"big{i}" for i in range(12_000)]
    items = stage_rows(a, ids, per_request=1000)
    answer = batch(b, items, timeout=120)
    assert answer["status"] == "OK" and answer["sent_items_in_success"] == len(ids), answer
    p = flush(a)
    assert p.returncode == 0, p.stdout + p.stderr
    check = read_local(dest).check(acked(ids))
    assert check == {"lost": 0, "duplicated": 0, "partial": 0, "temp_leftovers": 0}, check
