"""user_segment_update envelopes: checked once per distinct envelope, and a cached one never lets a bad one in."""

from __future__ import annotations

import pytest

from pipeline.identifiers import RequestError
from pipeline.ingest import update_partition
from pipeline.model import Partition

BODY = {"feed_id": "42", "segment_id": "451256", "session_id": "s-1", "datamart_id": "1023", "operation": "UPSERT",
        "ts": 1717494873000}


def test_the_same_envelope_gives_the_same_answer_twice() -> None:
    first = update_partition(dict(BODY))
    assert first == (Partition("42", "451256", "UPSERT"), "s-1", "1023", 1717494873000)
    assert update_partition(dict(BODY, ts=5)) == (first[0], "s-1", "1023", 5)
    assert update_partition(dict(BODY, feed_id=42)) == first  # ids as numbers (some SDK typings)


@pytest.mark.parametrize("change", [{"feed_id": True}, {"segment_id": 1.0}, {"session_id": "../x"},
                                    {"operation": "MERGE"}, {"ts": "soon"}, {"ts": True}, {"datamart_id": None}])
def test_a_bad_envelope_is_refused_even_after_a_good_one_was_cached(change: dict) -> None:
    update_partition(dict(BODY, feed_id="1"))
    update_partition(dict(BODY))
    with pytest.raises(RequestError):
        update_partition(dict(BODY, **change))


def test_a_bad_ts_is_refused_on_a_cached_envelope() -> None:
    update_partition(dict(BODY))
    with pytest.raises(RequestError, match="ts"):
        update_partition(dict(BODY, ts=[1]))
