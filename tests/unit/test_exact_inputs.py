"""Inputs checked once, before any write (issue 13, findings 2-4 and 7): temp names, ts range, identifier cap."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from config.feed import IdentifierSelector
from pipeline.batch import batch_answer, parse_items
from pipeline.durable import atomic_write_bytes, create_only_bytes, is_temp_name, remove_stale_temps, temp_path
from pipeline.identifiers import (
    MAX_TS_MS,
    IdentifierRules,
    RequestError,
    check_identifier_count,
)

CONTEXT = {"feed_id": "42", "segment_id": "7", "grouping_key": "UPSERT", "feed_session_id": "1",
           "datamart_id": "1023"}


def test_two_threads_writing_one_file_never_lose_their_temp(tmp_path: Path) -> None:
    """Before: both threads used .<name>.<pid>.tmp; one's rename took the other's file (FileNotFoundError)."""
    target = tmp_path / "state.json"
    errors: list[BaseException] = []

    def writer(tag: bytes) -> None:
        for _ in range(300):
            try:
                atomic_write_bytes(target, tag * 100)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)
                return

    threads = [threading.Thread(target=writer, args=(t,)) for t in (b"a", b"b", b"c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert target.read_bytes() in (b"a" * 100, b"b" * 100, b"c" * 100)
    assert not [p for p in tmp_path.iterdir() if p != target]


def test_temp_names_are_unique_and_recognised_as_leftovers(tmp_path: Path) -> None:
    a, b = temp_path(tmp_path / "x.jnl"), temp_path(tmp_path / "x.jnl")
    assert a != b and is_temp_name(a.name) and is_temp_name(b.name)
    a.write_bytes(b"left by a crash")
    assert remove_stale_temps(tmp_path, older_than=3600) == 0  # fresh: maybe a live write
    assert remove_stale_temps(tmp_path, older_than=-1) == 1 and not a.exists()


def test_create_only_creates_once(tmp_path: Path) -> None:
    target = tmp_path / "seg.jnl"
    assert create_only_bytes(target, b"first")
    assert not create_only_bytes(target, b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.jnl"]


@pytest.mark.parametrize("ts", [2**63, 10**25, -1, MAX_TS_MS + 1, 1e20, "1717494873000", True])
def test_a_batch_item_with_a_bad_ts_is_an_item_in_error_and_the_rest_is_staged(ts: object) -> None:
    good = {"identifier_type": "USER_EMAIL", "identifier": "a" * 64, "ts": 1717494873000}
    work, invalid = parse_items(CONTEXT, [good, {**good, "identifier": "b" * 64, "ts": ts}])
    assert invalid == 1
    (w,) = work.values()
    assert [line.split("\t")[1] for line, _ in w.rows] == ["a" * 64]


@pytest.mark.parametrize("ts", [10**25, 10**20, -5, MAX_TS_MS + 1])
def test_an_update_with_a_bad_ts_rejects_each_identifier_before_staging(ts: int) -> None:
    rules = IdentifierRules((IdentifierSelector("USER_ACCOUNT", None), IdentifierSelector("USER_POINT", None)))
    ex = rules.extract([{"type": "USER_ACCOUNT", "user_account_id": "u1"},
                        {"type": "USER_POINT", "user_point_id": "p1"}], ts, "1", "1023")
    assert ex.rows == [] and ex.rejected == 2
    assert {s["sync_result"] for s in ex.stats} == {"REJECTED"}
    assert all({"key": "reason", "value": "invalid_ts"} in s["tags"] for s in ex.stats)


def test_the_largest_ts_is_accepted() -> None:
    rules = IdentifierRules((IdentifierSelector("USER_ACCOUNT", None),))
    assert rules.extract([{"type": "USER_ACCOUNT", "user_account_id": "u1"}], MAX_TS_MS, "1", "1").rows


def test_too_many_identifiers_is_a_request_error() -> None:
    check_identifier_count([{}] * 10, 10)
    with pytest.raises(RequestError, match="more than the 10"):
        check_identifier_count([{}] * 11, 10)


def test_batch_answer_has_the_protocol_shape() -> None:
    assert batch_answer("OK", sent=3) == {"status": "OK", "sent_items_in_success": 3, "sent_items_in_error": 0}
    assert batch_answer("RETRY", message="busy", delay_ms=5) == {
        "status": "RETRY", "sent_items_in_success": 0, "sent_items_in_error": 0, "message": "busy",
        "next_msg_delay_in_ms": 5}


def test_an_unexpected_batch_failure_still_answers_in_the_batch_shape(tmp_path: Path, monkeypatch) -> None:
    """Before: a bare 500 {"status":"error"} (e.g. FileNotFoundError from a shared temp name)."""
    import orjson
    from starlette.testclient import TestClient

    from config.settings import ServiceSettings
    from filefeed.app import create_app
    from pipeline import batch
    from tests.conftest import write_feeds

    feeds = write_feeds(tmp_path / "feeds.toml", {"42": {"destination_uri": (tmp_path / "out").as_uri()}})
    settings = ServiceSettings(feeds=feeds, staging_dir=tmp_path / "staging", min_free_bytes=0)

    def broken(*args, **kwargs):
        raise FileNotFoundError("a temp file vanished")

    monkeypatch.setattr(batch, "deliver_batch", broken)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/batch_update", content=orjson.dumps(
            {"batch_content": [], "context": {"feed_id": "42", "segment_id": "7", "grouping_key": "UPSERT"}}))
    assert r.status_code == 503
    assert r.json() == {"status": "RETRY", "sent_items_in_success": 0, "sent_items_in_error": 0,
                        "message": "internal error (FileNotFoundError)"}
    assert r.headers["x-mics-next-msg-delay"]
