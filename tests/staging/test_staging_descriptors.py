"""Out of file descriptors on the hot path: user_segment_update answers `retry` (429 + delay), like a full disk.

EMFILE is injected where staging opens a new journal (a mock, as this is a test of error mapping): the answer is
the protocol's retry, nothing acknowledged is lost, and the platform's retry is accepted once the descriptors are
back. The real-limit test (5,000 partitions under `ulimit -n 1024`) is tests/reliability/test_descriptors.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from config.settings import load_settings
from filefeed.app import create_app
from pipeline.model import Partition
from pipeline.staging import Staging
from tests.conftest import write_feeds

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def _body(ids: list[str]) -> bytes:
    return orjson.dumps({"feed_id": "42", "session_id": "1", "datamart_id": "1023", "segment_id": "7",
                         "ts": 1717494873000, "operation": "UPSERT",
                         "user_identifiers": [{"type": "USER_ACCOUNT", "user_account_id": i, "creation_ts": 1}
                                              for i in ids]})


def test_emfile_on_the_hot_path_answers_429_retry_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feeds = write_feeds(tmp_path / "feeds.toml", {"42": {"destination_uri": (tmp_path / "out").as_uri(),
                                                         "identifier_types": "USER_ACCOUNT"}})
    settings = load_settings(staging_dir=tmp_path / "staging", feeds=feeds, min_free_bytes=0,
                             seal_after_seconds=60, flush_check_seconds=3600)
    real_open = os.open
    starved = False

    def maybe_emfile(path, flags, mode=0o777, **kw):
        if starved and str(path).endswith(".jnl.new"):  # a new staging journal (or, before 1.x, segment)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", maybe_emfile)
    with TestClient(create_app(settings)) as client:
        ok = client.post("/v1/user_segment_update", content=_body(["a1", "a2"]))
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        client.app.state.plugin.staging.seal_all()  # the next update needs a new journal
        starved = True
        answers = [client.post("/v1/user_segment_update", content=_body([f"b{i}"])) for i in range(5)]
        for r in answers:
            assert r.status_code == 429, r.text
            body = r.json()
            assert body["status"] == "retry" and body["next_msg_delay_in_ms"] > 0
            assert r.headers["x-mics-next-msg-delay"] == str(body["next_msg_delay_in_ms"])
        starved = False
        again = [client.post("/v1/user_segment_update", content=_body([f"b{i}"])) for i in range(5)]
        assert [r.status_code for r in again] == [200] * 5
        assert all(r.json()["data"][0]["content"]["identifier"] == f"b{i}" for i, r in enumerate(again))
    staging = Staging(tmp_path / "staging", min_free_bytes=0)
    try:
        from pipeline.staging import iter_rows

        p = Partition("42", "7", "UPSERT")
        staged = sorted(r[1] for path in staging.sealed_segments(p) for r in iter_rows(path))
    finally:
        staging.close()
    assert staged == ["a1", "a2", "b0", "b1", "b2", "b3", "b4"]
