"""batch_update items -> rows: what counts as a row, what counts in sent_items_in_error."""

from __future__ import annotations

import random

import orjson

from pipeline.batch import parse_items
from pipeline.journal import iter_payload_lines
from pipeline.model import Partition

CONTEXT = {"feed_id": "42", "feed_session_id": "s-1", "segment_id": "451256", "datamart_id": "1023",
           "grouping_key": "UPSERT"}
GOOD = {"identifier_type": "USER_EMAIL", "identifier": "ab" * 32, "ts": 1717494873000, "user_point_id": "up-1"}


def rows_of(items: list) -> tuple[list[tuple], int]:
    """The staged rows (as tuples, read back from their TSV lines) and the items in error."""
    work, invalid = parse_items(CONTEXT, items)
    lines = "".join(line for w in work.values() for line, _ in w.rows)
    return list(iter_payload_lines(lines.encode())), invalid


def test_json_strings_objects_and_bytes_give_the_same_row() -> None:
    text = orjson.dumps(GOOD).decode()
    rows, invalid = rows_of([text, GOOD, text.encode()])
    assert invalid == 0
    assert rows == [("USER_EMAIL", "ab" * 32, 1717494873000, "s-1", "1023", "up-1")] * 3


def test_separator_characters_are_refused_whether_escaped_or_raw() -> None:
    escaped_tab = orjson.dumps({**GOOD, "identifier": "a\tb"}).decode()  # JSON text holds the escape \t
    unicode_nul = '{"identifier_type":"USER_EMAIL","identifier":"a\\u0000b","ts":1}'
    items = [escaped_tab, unicode_nul, {**GOOD, "user_point_id": "x\ny"}, {**GOOD, "identifier": "c\rd"}]
    rows, invalid = rows_of(items + [GOOD])
    assert invalid == 4 and len(rows) == 1
    # a backslash that is not a separator is a value like any other
    rows, invalid = rows_of([orjson.dumps({**GOOD, "identifier": "back\\slash"}).decode()])
    assert invalid == 0 and rows[0][1] == "back\\slash"


def test_invalid_items_are_counted_and_leave_no_partition_behind() -> None:
    items = ["not json", 7, [1], {**GOOD, "ts": "1"}, {**GOOD, "ts": True}, {**GOOD, "identifier": ""},
             {**GOOD, "operation": "MERGE"}, {**GOOD, "segment_id": "../x"}, {**GOOD, "identifier": "x" * 1025}]
    work, invalid = parse_items(CONTEXT, items)
    assert invalid == len(items) and work == {}


def test_rows_group_by_partition_with_refs_counted() -> None:
    ref = "w1-00000001"
    items = [{**GOOD, "ref": ref}, {**GOOD, "ref": ref}, {**GOOD, "operation": "DELETE", "ref": "../bad"},
             {**GOOD, "segment_id": 99}]
    work, invalid = parse_items(CONTEXT, items)
    assert invalid == 0
    upsert, delete, other = Partition("42", "451256", "UPSERT"), Partition("42", "451256", "DELETE"), \
        Partition("42", "99", "UPSERT")
    assert set(work) == {upsert, delete, other}
    assert dict(work[upsert].refs) == {ref: 2} and [r for _, r in work[upsert].rows] == [ref, ref]
    assert dict(work[delete].refs) == {} and [r for _, r in work[delete].rows] == [None]  # malformed ref: none


def test_items_with_every_field_and_items_relying_on_the_context_give_the_same_rows() -> None:
    # every field present is read in one call; a missing one falls back to the batch's context, as before
    full = {**GOOD, "segment_id": "451256", "operation": "UPSERT", "session_id": "s-1", "datamart_id": "1023"}
    rows, invalid = rows_of([full, GOOD, orjson.dumps(full).decode(), {**full, "session_id": 7, "datamart_id": ""}])
    assert invalid == 0
    assert rows[:3] == [("USER_EMAIL", "ab" * 32, 1717494873000, "s-1", "1023", "up-1")] * 3
    assert rows[3] == ("USER_EMAIL", "ab" * 32, 1717494873000, "7", "1023", "up-1")


def test_unhashable_or_non_text_envelope_values_are_items_in_error() -> None:
    items = [{**GOOD, "operation": ["UPSERT"]}, {**GOOD, "segment_id": {"a": 1}}, {**GOOD, "operation": 5},
             {**GOOD, "session_id": 1.5}, {**GOOD, "user_point_id": [1]}, {**GOOD, "identifier_type": None}]
    work, invalid = parse_items(CONTEXT, items + [GOOD])
    assert invalid == len(items)
    assert [len(w.rows) for w in work.values()] == [1]


def test_items_as_json_text_are_answered_as_the_same_items_as_objects() -> None:
    """JSON text in the platform's shape takes a typed decode, anything else the general path: never another answer."""
    variants = [GOOD, {**GOOD, "segment_id": 451256}, {**GOOD, "segment_id": None}, {**GOOD, "segment_id": ""},
                {**GOOD, "ts": 1.0}, {**GOOD, "ts": True}, {**GOOD, "ts": -1},
                {**GOOD, "ts": None}, {**GOOD, "identifier": 5}, {**GOOD, "identifier_type": ["x"]},
                {**GOOD, "session_id": 17}, {**GOOD, "datamart_id": 1.5}, {**GOOD, "user_point_id": False},
                {**GOOD, "operation": "DELETE"}, {**GOOD, "operation": 3}, {**GOOD, "operation": ""},
                {**GOOD, "ref": "w1-aaa-00000001"}, {**GOOD, "ref": 12}, {**GOOD, "ref": "../x"},
                {**GOOD, "unknown": {"nested": [1, 2]}}, {**GOOD, "identifier": "é" * 10}, {},
                # at and past the bounds the typed decode checks itself (past one, the general rules judge the item)
                {**GOOD, "identifier": "é" * 1024}, {**GOOD, "identifier": "é" * 1025}, {**GOOD, "identifier": ""},
                {**GOOD, "identifier_type": ""}, {**GOOD, "identifier_type": "T" * 1100},
                {**GOOD, "session_id": "s" * 1500}, {**GOOD, "session_id": "s" * 5000},
                {**GOOD, "datamart_id": "d" * 1025, "user_point_id": "u" * 1025},
                {**GOOD, "ts": 0}, {**GOOD, "ts": 253_402_300_799_999}, {**GOOD, "ts": 253_402_300_800_000}]
    texts = [orjson.dumps(v).decode() for v in variants]
    texts += ['{"identifier_type":"T","identifier":"a","identifier":"b","ts":1717494873000}', "[1]", "1", "null",
              '{"identifier_type":"T","identifier":"a","ts":100000000000000000000000000000}',
              '{"identifier_type":"T","identifier":"a","ts":1717494873000} x', '{"a":[1,]}']
    objects = [orjson.loads(t) if t not in ('{"identifier_type":"T","identifier":"a","ts":1717494873000} x',
                                            '{"a":[1,]}') else 7 for t in texts]

    def answer(items: list) -> tuple:
        work, invalid = parse_items(CONTEXT, items)
        return {p: (w.rows, dict(w.refs)) for p, w in work.items()}, invalid

    assert answer(texts) == answer(objects)
    for text, obj in zip(texts, objects, strict=True):
        assert answer([text]) == answer([obj]), text
    # defaults longer than a value's bound: the sum of the lengths still decides, in both forms
    long_context = {**CONTEXT, "feed_session_id": "z" * 1500, "datamart_id": "d" * 1500}
    for variant in ({**GOOD, "identifier": "i" * 1000}, {**GOOD, "identifier": "i" * 1024, "user_point_id": "u" * 1024},
                    {**GOOD, "identifier_type": "T" * 1024, "identifier": "i" * 1024, "user_point_id": "u" * 1024}):
        got = [parse_items(long_context, [form]) for form in (orjson.dumps(variant).decode(), variant)]
        assert [(invalid, [w.rows for w in work.values()]) for work, invalid in got][0] == \
            [(invalid, [w.rows for w in work.values()]) for work, invalid in got][1]


def test_random_items_get_the_same_answer_as_json_text_and_as_objects() -> None:
    """The short branch (JSON text in the platform's shape) against the general one (the same items as objects),
    over seeded random items and contexts: the same rows, refs and items in error."""
    rng = random.Random(17)
    values = [None, "", "a", "x" * 1024, "x" * 1025, "y" * 2000, 5, 0, True, 1.5, [1], {"a": 1}, "a\tb", "é" * 1025,
              "UPSERT", "DELETE", "MERGE", "../x", "451256", "batch_" + "a" * 24 + "-00000000", "w1-00000001"]
    stamps = [None, 0, -1, 1717494873000, 253_402_300_799_999, 253_402_300_800_000, "1", True, 1.0]
    names = ["segment_id", "operation", "identifier_type", "identifier", "ts", "session_id", "datamart_id",
             "user_point_id", "ref", "extra"]
    contexts = [CONTEXT, {**CONTEXT, "segment_id": 7, "feed_session_id": 12, "datamart_id": None},
                {"feed_id": 42, "grouping_key": None}, {**CONTEXT, "grouping_key": 5},
                {**CONTEXT, "feed_session_id": "z" * 1500, "datamart_id": "d" * 1500}]
    rows = 0
    for _ in range(400):
        items = []
        for _ in range(rng.randint(1, 25)):
            item = {k: rng.choice(stamps if k == "ts" else values) for k in names if rng.random() < 0.7}
            if rng.random() < 0.6:
                item.update(identifier_type="USER_EMAIL", identifier="ab" * 32, ts=1717494873000)
            items.append(item)
        context = rng.choice(contexts)
        as_text = parse_items(context, [orjson.dumps(i).decode() for i in items])
        as_objects = parse_items(context, items)
        assert as_text[1] == as_objects[1]
        assert {p: (w.rows, dict(w.refs)) for p, w in as_text[0].items()} == \
            {p: (w.rows, dict(w.refs)) for p, w in as_objects[0].items()}
        rows += sum(len(w.rows) for w in as_text[0].values())
    assert rows > 300  # the seeds give rows, not only items in error
