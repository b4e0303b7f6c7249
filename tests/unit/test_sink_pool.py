"""The sink pool: one roll per sink object, no lock waited on without a timeout (issue 13, finding 5)."""

from __future__ import annotations

import threading
import time

import pytest

from config.feed import parse_feed_properties
from pipeline.delivery import SinkPool
from sinks import TransientError
from sinks.local import LocalSink


def test_concurrent_rolls_get_their_own_sinks_and_a_full_pool_answers_busy_in_time(tmp_path, monkeypatch):
    props = parse_feed_properties({"destination_uri": (tmp_path / "out").as_uri()})
    monkeypatch.setattr(LocalSink, "shareable", False)  # as an SSH session: one roll at a time per object
    pool = SinkPool(per_config=2, checkout_seconds=0.3)
    inside = threading.Barrier(3)
    release = threading.Event()
    seen: list[object] = []

    def hold() -> None:
        with pool.sink(props) as sink:
            seen.append(sink)
            inside.wait(5)
            release.wait(5)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(5)
    assert seen[0] is not seen[1]  # a stuck roll never shares its sink (or a lock) with another one
    t0 = time.monotonic()
    with pytest.raises(TransientError) as e, pool.sink(props):
        pass
    assert e.value.kind == "busy" and time.monotonic() - t0 < 2
    release.set()
    for t in threads:
        t.join(5)
    with pool.sink(props) as sink:  # given back: reused
        assert sink in seen
    pool.close()


def test_a_shareable_sink_is_one_object_for_concurrent_rolls(tmp_path):
    props = parse_feed_properties({"destination_uri": (tmp_path / "out").as_uri()})
    pool = SinkPool(per_config=1, checkout_seconds=0.1)
    with pool.sink(props) as a, pool.sink(props) as b:  # never "busy": nothing to wait for
        assert a is b
    pool.close()
