"""The hot path's counters: added up in process memory, written to the labelled metrics by flush_local."""

from __future__ import annotations

from prometheus_client import REGISTRY

from filefeed import metrics


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _stat(identifier: str, id_type: str, result: str = "PROCESSED") -> dict:
    tags = [{"key": "id_type", "value": id_type}]
    if result != "PROCESSED":
        tags.append({"key": "reason", "value": "malformed_hash"})
    return {"identifier": identifier, "sync_result": result, "tags": tags}


def test_rows_are_counted_by_outcome_and_type_once_flushed():
    metrics.flush_local()
    before = {(o, t): _value("filefeed_rows_total", outcome=o, identifier_type=t)
              for o in ("accepted", "rejected") for t in ("USER_EMAIL", "USER_POINT")}
    ok = {"status": "ok", "data": [], "stats": [_stat("a", "USER_EMAIL"), _stat("b", "USER_POINT"),
                                                _stat("c", "USER_EMAIL", "REJECTED")]}
    for _ in range(3):
        metrics.observe_update("42", ok)
    # a retry staged nothing: its accepted identifiers are not counted, its rejected ones are
    metrics.observe_update("42", {"status": "retry", "stats": [_stat("d", "USER_EMAIL"),
                                                              _stat("e", "USER_POINT", "REJECTED")]})
    assert _value("filefeed_rows_total", outcome="accepted", identifier_type="USER_EMAIL") == \
        before["accepted", "USER_EMAIL"]  # nothing reaches the children before the flush
    metrics.flush_local()
    after = {k: _value("filefeed_rows_total", outcome=k[0], identifier_type=k[1]) for k in before}
    assert {k: after[k] - before[k] for k in before} == {
        ("accepted", "USER_EMAIL"): 3, ("accepted", "USER_POINT"): 3,
        ("rejected", "USER_EMAIL"): 3, ("rejected", "USER_POINT"): 1}


def _row_labels() -> set[str]:
    return {sample.labels["identifier_type"] for metric in REGISTRY.collect() if metric.name == "filefeed_rows"
            for sample in metric.samples}


def test_identifier_type_labels_stay_bounded():
    metrics.flush_local()
    stats = [_stat("x", f"TECH_{i}", "REJECTED") for i in range(500)]
    stats += [_stat("y", "bad type!", "REJECTED"), {"sync_result": "REJECTED", "tags": [{"value": ["a list"]}]}]
    invalid = _value("filefeed_rows_total", outcome="rejected", identifier_type="invalid")
    metrics.observe_update("42", {"status": "ok", "data": [], "stats": stats})
    metrics.flush_local()
    labels = _row_labels()
    assert len(labels) <= metrics._MAX_ID_TYPES + 2  # + "other" and "invalid"
    assert "invalid" in labels and "other" in labels
    assert _value("filefeed_rows_total", outcome="rejected", identifier_type="invalid") == invalid + 2


def test_requests_and_retry_answers_are_counted_by_route_and_code():
    metrics.flush_local()
    before = (_value("filefeed_requests_total", route="user_segment_update", code="429"),
              _value("filefeed_retry_answers_total", route="user_segment_update"),
              _value("filefeed_requests_total", route="user_segment_update", code="200"))
    for code in (429, 429, 200):
        metrics.observe_request("user_segment_update", code, 0.001)
    metrics.flush_local()
    after = (_value("filefeed_requests_total", route="user_segment_update", code="429"),
             _value("filefeed_retry_answers_total", route="user_segment_update"),
             _value("filefeed_requests_total", route="user_segment_update", code="200"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 1]
