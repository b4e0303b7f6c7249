from __future__ import annotations

import hashlib

import pytest

from config.feed import IdentifierSelector
from pipeline.identifiers import IdentifierRules, RequestError, hash_email, normalize_email

ALL = (
    IdentifierSelector("USER_EMAIL"),
    IdentifierSelector("USER_ACCOUNT", "7"),
    IdentifierSelector("USER_DEVICE_TECHNICAL_ID", "MOBILE_ADVERTISING_ID"),
    IdentifierSelector("USER_AGENT"),
    IdentifierSelector("USER_POINT"),
)
H = "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"


def extract(ids, selectors=ALL):
    return IdentifierRules(selectors).extract(ids, 1717494873000, "s1", "1023")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # golden vectors: sha256 hex of the trimmed, lowercased address
        ("alice@example.com", "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"),
        ("  Alice@Example.COM \n", "ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976"),
        ("test@example.com", "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"),
    ],
)
def test_email_hash_golden_vectors(raw, expected):
    assert hash_email(raw) == expected
    assert hashlib.sha256(normalize_email(raw).encode()).hexdigest() == expected


def test_hash_preferred_over_clear_email_and_lowercased():
    ex = extract([{"type": "USER_EMAIL", "hash": H.upper(), "email": "someone@else.com"}])
    assert [r[:2] for r in ex.rows] == [("USER_EMAIL", H)]


def test_clear_email_hashed_when_no_hash():
    ex = extract([{"type": "USER_EMAIL", "email": " Alice@Example.com"}])
    assert ex.rows[0][1] == H


def test_malformed_hash_rejected_with_reason():
    ex = extract([{"type": "USER_EMAIL", "hash": "not-a-hash"}, {"type": "USER_POINT", "user_point_id": "up-1"}])
    assert [r[0] for r in ex.rows] == ["USER_POINT"]
    rejected = [s for s in ex.stats if s["sync_result"] == "REJECTED"]
    assert rejected and {"key": "reason", "value": "malformed_hash"} in rejected[0]["tags"]
    assert ex.rejected == 1


def test_account_only_from_selected_compartment():
    ids = [{"type": "USER_ACCOUNT", "user_account_id": "a7", "compartment_id": 7},
           {"type": "USER_ACCOUNT", "user_account_id": "a8", "compartment_id": "8"}]
    assert [r[1] for r in extract(ids).rows] == ["a7"]
    any_comp = (IdentifierSelector("USER_ACCOUNT"),)
    assert [r[1] for r in extract(ids, any_comp).rows] == ["a7", "a8"]


def test_device_ids_of_selected_registry_type_with_technical_type():
    ids = [{"type": "USER_DEVICE_POINT", "technical_identifiers": [
        {"type": "MOBILE_ADVERTISING_ID", "user_agent_id": "mob:ios:raw:6D92"},
        {"type": "MOBILE_VENDOR_ID", "user_agent_id": "vendor-1"}]}]
    assert [(r[0], r[1]) for r in extract(ids).rows] == [("MOBILE_ADVERTISING_ID", "mob:ios:raw:6D92")]


def test_user_point_id_column_and_agent():
    ids = [{"type": "USER_AGENT", "vector_id": "vec:1"}, {"type": "USER_POINT", "user_point_id": "up-9"}]
    rows = extract(ids).rows
    assert ("USER_AGENT", "vec:1", 1717494873000, "s1", "1023", "up-9") in rows


def test_unknown_types_and_unselected_types_ignored():
    ex = extract([{"type": "USER_SOMETHING_NEW", "x": 1}, {"type": "USER_AGENT", "vector_id": "v"}, "junk", 3],
                 (IdentifierSelector("USER_POINT"),))
    assert ex.rows == [] and ex.ignored == 4 and ex.rejected == 0


def test_duplicates_in_one_request_give_one_row():
    ex = extract([{"type": "USER_EMAIL", "hash": H}, {"type": "USER_EMAIL", "hash": H.upper()}])
    assert len(ex.rows) == 1


@pytest.mark.parametrize("bad", ["a\tb", "a\nb", "x" * 2000, "", None, True, {"x": 1}])
def test_values_that_cannot_be_staged_are_rejected(bad):
    ex = extract([{"type": "USER_ACCOUNT", "user_account_id": bad, "compartment_id": "7"}])
    assert ex.rows == [] and ex.rejected == 1


def test_identifiers_must_be_a_list():
    with pytest.raises(RequestError):
        extract({"type": "USER_POINT"})


@pytest.mark.parametrize("value", ["plain-id_1", "a b", "~!@#$%^&*()", "é-accent", "id\u2028sep", "\u00a0nbsp", "\x7f",
                                   "a\x1fb", "é\x00", "ok\x7f", 12345, "x" * 1024, "x" * 1025, "\ud800"])
def test_a_value_is_kept_exactly_when_it_has_no_control_character(value):
    """The ASCII fast path (isprintable) and the regex agree: only C0 controls and DEL are refused, length 1-1024."""
    import re

    s = str(value)
    expected = s if 0 < len(s) <= 1024 and not re.search(r"[\x00-\x1f\x7f]", s) else None
    ex = extract([{"type": "USER_ACCOUNT", "user_account_id": value, "compartment_id": "7"}])
    assert [r[1] for r in ex.rows] == ([] if expected is None else [expected])
    assert ex.rejected == (expected is None)


def test_accepted_stats_of_one_type_serialize_alike_and_rejections_carry_their_reason():
    import orjson

    ex = extract([{"type": "USER_POINT", "user_point_id": "up-1"}, {"type": "USER_EMAIL", "hash": H},
                  {"type": "USER_EMAIL", "hash": "zz"}])
    again = extract([{"type": "USER_EMAIL", "hash": H.upper()}])
    assert orjson.loads(orjson.dumps(ex.stats)) == [
        {"identifier": "up-1", "sync_result": "PROCESSED", "tags": [{"key": "id_type", "value": "USER_POINT"}]},
        {"identifier": H, "sync_result": "PROCESSED", "tags": [{"key": "id_type", "value": "USER_EMAIL"}]},
        {"identifier": "zz", "sync_result": "REJECTED",
         "tags": [{"key": "id_type", "value": "USER_EMAIL"}, {"key": "reason", "value": "malformed_hash"}]},
    ]
    assert again.stats == [ex.stats[1]]
    assert [r[5] for r in ex.rows] == ["up-1", "up-1"]  # every row carries the request's user point
